"""ONNX export of a (compressed) model, with sparse linears lowered to what ONNX Runtime runs fastest.

``export_onnx(module, example_inputs, path)`` captures the model (``sparsecomp.capture``), exports the
``ExportedProgram`` with ``torch.onnx.export(..., dynamo=True)`` and writes a checked ``.onnx`` file.
Pruned and low-rank models are plain ATen graphs and become standard ONNX ops.

The ``torch.ops.sparsecomp.sparse_linear_{csr,bsr,nm}`` operators have no ONNX equivalent that ONNX
Runtime runs well on CPU: sparse initializers are densified at load, and ``com.microsoft``
``SparseToDenseMatMul`` only accepts a sparse *graph input* (a ``Constant(sparse_value=...)`` is
densified too) and then loses to a dense ``MatMul`` (2.2 ms vs 0.56 ms for a 95%-sparse 3072x768 weight,
batch 8, 1 thread). So they are exported in two steps:

1. a translation (``custom_translation_table``) emits a placeholder node ``sparsecomp.SparseLinear``
   that keeps the packed weight tensors as initializers;
2. each placeholder is replaced by the fastest of the applicable standard-ONNX forms, chosen by timing
   a one-layer model in ONNX Runtime at the layer's example row count (a few ms per layer, cached):

   ``dense``         ``MatMul`` with the densified weight. When that is smaller, the weight is stored as
                     a bitmask plus the nonzero values and densified in the graph
                     (``BitShift -> CumSum -> Gather``); ONNX Runtime constant-folds that subgraph when
                     the session is created, so it runs exactly as a dense initializer would.
   ``block_gather``  for ``r x c`` blocks: ``Gather`` the rows of ``x^T`` each block row uses (``K`` =
                     most blocks in a block row), then one batched ``MatMul``
                     (``[nbr, r, K*c] @ [nbr, K*c, rows]``): one gathered input serves ``r`` outputs.
   ``ell``           padded rows (ELLPACK), i.e. ``block_gather`` with 1x1 blocks; N:M rows hold exactly
                     ``in*n/m`` entries. ONNX Runtime's ``Gather`` costs tens of ns per element, so one
                     gather per kept weight loses to dense except at extreme sparsity.

   A sparse form is kept only when it beats ``dense`` by more than ``margin``; otherwise the layer is
   dense. The choice, the timings and the reason are in ``OnnxExport.report``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import statistics
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..capture.export import Captured, capture, concrete_shape
from ..errors import ConfigError, MissingDependencyError, UnsupportedError

__all__ = [
    "OnnxExport",
    "LayerChoice",
    "REPRESENTATIONS",
    "choose_sparse_linear",
    "export_onnx",
    "format_timings",
]

#: Forms a sparse linear can take in the exported model (``"auto"`` picks among them by timing).
REPRESENTATIONS = ("dense", "ell", "block_gather")

_DOMAIN = "sparsecomp"
_PLACEHOLDER = "SparseLinear"
# Above this many bytes of weights the model is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def _require_onnx():
    try:
        import onnx

        for name in ("onnxruntime", "onnxscript"):
            importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependencyError(exc.name or "onnx", "onnx", "ONNX export") from exc
    return onnx


# --------------------------------------------------------------------------------------------------
# step 1: sparse ops -> placeholder nodes
# --------------------------------------------------------------------------------------------------


def _register_placeholder_schema() -> None:
    """The exporter traces translations against ONNX schemas, so the placeholder op needs one."""
    onnx = _require_onnx()
    from onnx.defs import OpSchema

    if onnx.defs.has(_PLACEHOLDER, _DOMAIN):
        return
    floats = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    anything = floats + ["tensor(int8)", "tensor(uint8)", "tensor(int16)", "tensor(int32)", "tensor(int64)"]
    attr = OpSchema.Attribute
    schema = OpSchema(
        _PLACEHOLDER,
        _DOMAIN,
        1,
        doc="Placeholder for a sparsecomp sparse linear; replaced by standard ONNX ops before saving.",
        inputs=[OpSchema.FormalParameter("inputs", "T", param_option=OpSchema.FormalParameterOption.Variadic,
                                         is_homogeneous=False)],
        outputs=[OpSchema.FormalParameter("y", "F")],
        type_constraints=[("T", anything, ""), ("F", floats, "")],
        attributes=[
            attr("format", OpSchema.AttrType.STRING, "csr | bsr | nm"),
            attr("has_bias", OpSchema.AttrType.INT, "1 if the last input is the bias"),
            attr("out_features", OpSchema.AttrType.INT, "", required=False),
            attr("in_features", OpSchema.AttrType.INT, "", required=False),
            attr("block", OpSchema.AttrType.INTS, "", required=False),
            attr("n", OpSchema.AttrType.INT, "", required=False),
            attr("m", OpSchema.AttrType.INT, "", required=False),
        ],
    )
    onnx.defs.register_schema(schema)


def _translation_table() -> dict:
    import onnxscript

    _register_placeholder_schema()
    placeholder = onnxscript.values.Op(onnxscript.values.Opset(_DOMAIN, 1), _PLACEHOLDER)

    def typed(y, x):
        y.dtype = x.dtype  # the placeholder has no type inference; the output has x's dtype
        return y

    def csr(x, crow, col, values, bias=None, out_features: int = 0, in_features: int = 0):
        extra = [bias] if bias is not None else []
        return typed(placeholder(x, crow, col, values, *extra, format="csr", has_bias=int(bias is not None),
                           out_features=out_features, in_features=in_features), x)

    def bsr(x, crow, col, values, bias=None, out_features: int = 0, in_features: int = 0,
            block_r: int = 1, block_c: int = 1):
        extra = [bias] if bias is not None else []
        return typed(placeholder(x, crow, col, values, *extra, format="bsr", has_bias=int(bias is not None),
                                 out_features=out_features, in_features=in_features, block=[block_r, block_c]), x)

    def nm(x, values, indices, bias=None, n: int = 2, m: int = 4, in_features: int = 0):
        extra = [bias] if bias is not None else []
        return typed(placeholder(x, values, indices, *extra, format="nm", has_bias=int(bias is not None),
                                 n=n, m=m, in_features=in_features), x)

    ops = torch.ops.sparsecomp
    return {ops.sparse_linear_csr.default: csr, ops.sparse_linear_bsr.default: bsr,
            ops.sparse_linear_nm.default: nm}


def _sparse_ops() -> tuple:
    importlib.import_module("sparsecomp.ops")  # registers torch.ops.sparsecomp.*

    o = torch.ops.sparsecomp
    return (o.sparse_linear_csr.default, o.sparse_linear_bsr.default, o.sparse_linear_nm.default)


def _sparse_layer_rows(captured: Captured) -> dict[str, int]:
    """Example row count (product of leading dims of ``x``) of every sparse linear, keyed by its
    ``values`` attribute name (which is also the ONNX initializer name)."""
    targets = _sparse_ops()
    rows: dict[str, int] = {}
    for node in captured.module.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        values = node.args[1] if node.target == targets[2] else node.args[3]
        shape = concrete_shape(node.args[0]) if hasattr(node.args[0], "meta") else None
        n = math.prod(shape[:-1]) if shape else 1
        key = values.target if getattr(values, "op", None) == "get_attr" else str(values)
        rows[key] = max(rows.get(key, 0), n)
    return rows


# --------------------------------------------------------------------------------------------------
# step 2: standard-ONNX forms of a sparse linear
# --------------------------------------------------------------------------------------------------


class _Builder:
    """Collects nodes and initializers with names unique under ``prefix``."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}/{hint}_{self._n}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], output: str | None = None, **attrs) -> str:
        from onnx import helper

        out = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out


def _dense_weight_bytes(w: np.ndarray) -> int:
    return w.size * w.itemsize


def _bitmask_bytes(w: np.ndarray) -> int:
    return int(np.count_nonzero(w)) * w.itemsize + (w.size + 7) // 8


def _densified(b: _Builder, wt: np.ndarray, compact: bool) -> str:
    """The weight ``wt`` as a graph value: a plain initializer, or a bitmask plus the nonzeros densified
    in the graph. The densifying ops (unpack bits, ``CumSum`` of the mask = index of each nonzero,
    ``Gather``) only read constants, so ONNX Runtime folds them into one dense tensor at session creation
    (``NonZero``/``ScatterND`` would not be folded: ORT cannot size ``NonZero`` ahead of time)."""
    if not compact:
        return b.const("weight", wt)
    from onnx import TensorProto

    mask = wt.reshape(-1) != 0
    bits = b.const("mask_bits", np.packbits(mask))  # big-endian bit order inside each byte
    values = b.const("nonzeros", np.concatenate([np.zeros(1, wt.dtype), wt.reshape(-1)[mask]]))
    shifts = b.const("shifts", np.arange(7, -1, -1, dtype=np.uint8))
    col = b.op("Unsqueeze", [bits, b.const("axis1", np.array([1], dtype=np.int64))])
    unpacked = b.op("BitwiseAnd", [b.op("BitShift", [col, shifts], direction="RIGHT"),
                                   b.const("one", np.array(1, dtype=np.uint8))])
    flat = b.op("Reshape", [unpacked, b.const("minus1", np.array([-1], dtype=np.int64))])
    flat = b.op("Slice", [flat, b.const("start", np.array([0], dtype=np.int64)),
                          b.const("stop", np.array([wt.size], dtype=np.int64))])
    as_int = b.op("Cast", [flat], to=TensorProto.INT32 if mask.size < 2**31 else TensorProto.INT64)
    # 1-based position of each nonzero among the nonzeros, 0 for zeros: index into [0, nonzeros...]
    index = b.op("Mul", [b.op("CumSum", [as_int, b.const("axis0", np.array(0, dtype=np.int64))]), as_int])
    dense = b.op("Gather", [values, index], axis=0)
    return b.op("Reshape", [dense, b.const("shape", np.array(wt.shape, dtype=np.int64))])


def _emit_dense(b, x, y, w, bias, compact):
    wt = np.ascontiguousarray(w.T)
    out = b.op("MatMul", [x, _densified(b, wt, compact)])
    if bias is None:
        return b.op("Identity", [out], y)
    return b.op("Add", [out, b.const("bias", bias)], y)


def _block_arrays(w: np.ndarray, r: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Block rows padded to the most blocks: input columns ``[nbr, K*c]`` and values ``[nbr, K*c, r]``."""
    out_f, in_f = w.shape
    nbr, nbc = out_f // r, in_f // c
    blocks = w.reshape(nbr, r, nbc, c).transpose(0, 2, 1, 3)  # [nbr, nbc, r, c]
    nonzero = np.abs(blocks).reshape(nbr, nbc, -1).max(-1) != 0
    k = max(1, int(nonzero.sum(1).max(initial=0)))
    order = np.argsort(~nonzero, axis=1, kind="stable")[:, :k]  # [nbr, K] block columns
    keep = np.take_along_axis(nonzero, order, axis=1)
    picked = blocks[np.arange(nbr)[:, None], order] * keep[..., None, None]  # [nbr, K, r, c]
    cols = (order[..., None] * c + np.arange(c)).reshape(nbr, k * c)
    vals = picked.transpose(0, 1, 3, 2).reshape(nbr, k * c, r)  # [i, k*c + j, a] = block[a, j]
    return cols.astype(np.int32 if in_f < 2**31 else np.int64), np.ascontiguousarray(vals)


def _emit_block_gather(b, x, y, w, bias, _compact, block=(1, 1)):
    """Gather rows of ``x^T`` (``rows`` contiguous floats per index: ONNX Runtime's ``Gather`` is far
    slower on an inner axis), then ``[nbr, r, K*c] @ [nbr, K*c, rows]``."""
    r, c = block
    out_f, in_f = w.shape
    cols, vals = _block_arrays(w, r, c)
    x2 = b.op("Reshape", [x, b.const("rows_in", np.array([-1, in_f], dtype=np.int64))])
    g = b.op("Gather", [b.op("Transpose", [x2], perm=[1, 0]), b.const("cols", cols)], axis=0)  # [nbr, Kc, rows]
    vt = np.ascontiguousarray(vals.transpose(0, 2, 1))  # [nbr, r, K*c]
    z = b.op("MatMul", [b.const("blocks", vt), g])  # [nbr, r, rows]
    z = b.op("Transpose", [b.op("Reshape", [z, b.const("out_rows", np.array([out_f, -1], dtype=np.int64))])],
             perm=[1, 0])  # [rows, out]
    lead = b.op("Slice", [b.op("Shape", [x]), b.const("s0", np.array([0], dtype=np.int64)),
                          b.const("s1", np.array([-1], dtype=np.int64))])
    shape = b.op("Concat", [lead, b.const("out", np.array([out_f], dtype=np.int64))], axis=0)
    z = b.op("Reshape", [z, shape])
    if bias is None:
        return b.op("Identity", [z], y)
    return b.op("Add", [z, b.const("bias", bias)], y)


def _emit_ell(b, x, y, w, bias, compact):
    """Padded rows (ELLPACK): the block form with 1x1 blocks, ``K`` = most nonzeros in a row."""
    return _emit_block_gather(b, x, y, w, bias, compact, block=(1, 1))


_EMIT = {"dense": _emit_dense, "ell": _emit_ell, "block_gather": _emit_block_gather}


# Gather forms materialise a [blocks, K*c, rows] tensor; above this many elements they are not tried.
GATHER_LIMIT = 1 << 24


def _gathered_elements(w: np.ndarray, block: tuple[int, int], rows: int) -> int:
    r, c = block
    nbr, nbc = w.shape[0] // r, w.shape[1] // c
    nonzero_blocks = np.abs(w).reshape(nbr, r, nbc, c).max(axis=(1, 3)) != 0
    return nbr * int(nonzero_blocks.sum(1).max(initial=1)) * c * rows


def _candidates(fmt: str, block: tuple[int, int], w: np.ndarray, rows: int) -> tuple[list[str], list[str]]:
    """Forms worth timing, and notes on the gather forms left out."""
    out, notes = ["dense"], []
    density = np.count_nonzero(w) / max(1, w.size)
    forms = []
    if density <= 0.5:  # padded rows: one gathered input per kept weight, 2x the flops of dense at 50%
        forms.append(("ell", (1, 1)))
    if fmt == "bsr" and block[0] > 1:
        forms.append(("block_gather", block))
    for rep, blk in forms:
        n = _gathered_elements(w, blk, rows)
        if n > GATHER_LIMIT:
            notes.append(f"{rep} not tried: it would gather {n / 1e6:.0f}M elements at {rows} rows")
        else:
            out.append(rep)
    return out, notes


def _emit(rep: str, b: _Builder, x: str, y: str, w: np.ndarray, bias, compact: bool, block):
    if rep == "block_gather":
        return _emit_block_gather(b, x, y, w, bias, compact, block=block)
    return _EMIT[rep](b, x, y, w, bias, compact)


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    """How one sparse linear was exported.

    ``timings_us`` holds the median ONNX Runtime latency of each candidate form at ``rows`` input rows
    (empty when the form was forced); forms in ``single_call`` were abandoned after one call that took
    more than 3x the dense time (that call is their timing).
    """

    layer: str
    shape: tuple[int, int]
    format: str
    density: float
    rows: int
    representation: str
    storage: str
    timings_us: dict[str, float]
    reason: str
    single_call: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["single_call"] = list(self.single_call)
        return d


_TIMING_CACHE: dict[tuple, tuple[float, bool]] = {}


def _session(model_bytes: bytes, num_threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = num_threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _one_layer_model(rep, w, bias, block, compact, dtype) -> bytes:
    from onnx import helper

    b = _Builder("layer")
    _emit(rep, b, "x", "y", w, bias, compact, block)
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    graph = helper.make_graph(
        b.nodes, "layer", [helper.make_tensor_value_info("x", elem, ["rows", w.shape[1]])],
        [helper.make_tensor_value_info("y", elem, ["rows", w.shape[0]])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model.SerializeToString()


def _time_rep(rep, w, bias, block, rows, num_threads, budget_s, key, give_up_us=None) -> tuple[float, bool]:
    """``(median latency in us, fully timed)`` of one form. A form whose first call is slower than
    ``give_up_us`` is not timed further (its first call is its timing): hopeless candidates stay cheap."""
    cache_key = (rep, key, rows, num_threads)
    if cache_key in _TIMING_CACHE:
        return _TIMING_CACHE[cache_key]
    
    sess = _session(_one_layer_model(rep, w, bias, block, False, w.dtype), num_threads)
    x = np.random.default_rng(0).standard_normal((rows, w.shape[1])).astype(w.dtype)
    feed = {"x": x}
    t = time.perf_counter()
    sess.run(None, feed)
    first = (time.perf_counter() - t) * 1e6
    if give_up_us is not None and first > give_up_us:
        _TIMING_CACHE[cache_key] = (first, False)
        return _TIMING_CACHE[cache_key]
    sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < 50 and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    _TIMING_CACHE[cache_key] = (statistics.median(times) * 1e6, True)
    return _TIMING_CACHE[cache_key]


def choose_sparse_linear(
    weight: np.ndarray | torch.Tensor,
    bias: np.ndarray | torch.Tensor | None = None,
    *,
    format: str = "csr",
    block: tuple[int, int] = (1, 1),
    rows: int = 1,
    num_threads: int = 1,
    representation: str = "auto",
    margin: float = 0.05,
    budget_ms: float = 5.0,
    layer: str = "linear",
) -> LayerChoice:
    """Pick the ONNX form of ``y = x @ weight.T + bias`` for a (pruned) dense ``weight``.

    Every applicable form of :data:`REPRESENTATIONS` is timed in ONNX Runtime on ``rows`` input rows with
    ``num_threads`` threads (each for about ``budget_ms``, results cached per process); a sparse form is
    chosen only when it is more than ``margin`` faster than ``dense``. ``representation`` forces a form.
    """
    w = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    b = bias.detach().cpu().numpy() if isinstance(bias, torch.Tensor) else bias
    if w.ndim != 2:
        raise ConfigError(f"{layer}: weight must be 2-D, got shape {w.shape}")
    block = tuple(int(v) for v in block)
    cands, notes = _candidates(format, block, w, rows)
    density = float(np.count_nonzero(w)) / max(1, w.size)
    compact = _bitmask_bytes(w) < 0.9 * _dense_weight_bytes(w)
    storage = "bitmask+nonzeros" if compact else "dense"
    common = dict(layer=layer, shape=tuple(w.shape), format=format, density=round(density, 4), rows=rows)
    if representation != "auto":
        if representation not in REPRESENTATIONS:
            raise ConfigError(f"unknown sparse representation {representation!r}; "
                              f"known: {('auto',) + REPRESENTATIONS}")
        applicable = ["dense", "ell"] + (["block_gather"] if format == "bsr" and block[0] > 1 else [])
        if representation not in applicable:
            raise ConfigError(f"{layer}: representation {representation!r} does not apply to a "
                              f"{format} weight with block {block}; applicable: {applicable}")
        st = storage if representation == "dense" else "gather tables"
        return LayerChoice(**common, representation=representation, storage=st, timings_us={},
                           reason="forced by the representation option")
    mask = w != 0
    key = (w.shape, format, block, int(mask.sum()), hash(np.packbits(mask).tobytes()), w.dtype.str,
           None if b is None else b.shape)
    timings = {"dense": round(_time_rep("dense", w, b, block, rows, num_threads, budget_ms / 1e3, key)[0], 1)}
    single_call = []
    for rep in cands[1:]:  # a form 3x slower than dense on its first call is not worth timing further
        us, complete = _time_rep(rep, w, b, block, rows, num_threads, budget_ms / 1e3, key,
                                 give_up_us=3 * timings["dense"])
        timings[rep] = round(us, 1)
        if not complete:
            single_call.append(rep)
    best = min(timings, key=timings.get)
    dense = timings["dense"]
    if best != "dense" and timings[best] < (1 - margin) * dense:
        return LayerChoice(**common, representation=best, storage="gather tables", timings_us=timings,
                           reason=f"{best} {dense / timings[best]:.2f}x faster than dense",
                           single_call=tuple(single_call))
    if len(cands) == 1:
        why = "; ".join(notes) or "no sparse form applies at this density/format"
    else:
        runner = min((r for r in cands if r != "dense"), key=timings.get)
        why = "; ".join([f"no sparse form wins (best: {runner} at {timings[runner] / dense:.2f}x dense time)"]
                        + notes)
    return LayerChoice(**common, representation="dense", storage=storage, timings_us=timings, reason=why,
                       single_call=tuple(single_call))


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


def format_timings(choice: LayerChoice) -> str:
    """``"dense 412, ell >9100, block_gather 230"`` (``>``: abandoned after one call)."""
    return ", ".join(f"{k} {'>' if k in choice.single_call else ''}{v:.0f}" for k, v in choice.timings_us.items())


@dataclasses.dataclass
class OnnxExport:
    """Result of :func:`export_onnx`.

    ``input_names`` are the ONNX inputs in the order of the model's flattened tensor inputs
    (``(args, kwargs)``); ``out_spec`` is the pytree spec of the outputs; ``report`` has one
    :class:`LayerChoice` per sparse linear.
    """

    path: str
    input_names: list[str]
    output_names: list[str]
    in_spec: Any
    out_spec: Any
    report: list[LayerChoice]
    external_data: bool

    def report_table(self) -> str:
        """Markdown table: per sparse layer, the chosen form and why."""
        from ..app.metrics import markdown_table

        body = [[c.layer, "x".join(map(str, c.shape)), c.format, f"{1 - c.density:.0%}", str(c.rows),
                 c.representation, c.storage,
                 format_timings(c), c.reason] for c in self.report]
        return markdown_table(["layer", "shape", "format", "sparsity", "rows", "chosen", "storage",
                               "timings (us)", "why"], body, text_columns=9)


def _tensor_of(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _dense_from_placeholder(node, arrays: list[np.ndarray], attrs: dict) -> tuple[np.ndarray, Any, tuple]:
    from ..ops.formats import BSRWeight, CSRWeight, NMWeight

    fmt = attrs["format"]
    t = [torch.from_numpy(np.array(a)) for a in arrays]
    bias = arrays[-1] if attrs.get("has_bias") else None
    if fmt == "csr":
        shape = (attrs["out_features"], attrs["in_features"])
        return CSRWeight(t[0], t[1], t[2], shape).to_dense().numpy(), bias, (1, 1)
    if fmt == "bsr":
        shape = (attrs["out_features"], attrs["in_features"])
        block = tuple(attrs["block"])
        return BSRWeight(t[0], t[1], t[2], shape, block).to_dense().numpy(), bias, block
    if fmt == "nm":
        n, m = attrs["n"], attrs["m"]
        shape = (t[0].shape[0], attrs["in_features"])
        return NMWeight(t[0], t[1], n, m, shape).to_dense().numpy(), bias, (1, 1)
    raise UnsupportedError(f"sparse linear node {node.name!r} has unknown format {fmt!r}")


def _lower_placeholders(model, rows: dict[str, int], num_threads: int, representation: str,
                        margin: float, budget_ms: float) -> list[LayerChoice]:
    """Replace every ``sparsecomp.SparseLinear`` node of ``model`` (in place) by standard ONNX ops."""
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    choices: list[LayerChoice] = []
    new_nodes = []
    used_by_placeholders: set[str] = set()
    out_types: dict[str, tuple[str, np.dtype, int]] = {}
    for node in graph.node:
        if node.domain != _DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type != _PLACEHOLDER:
            raise UnsupportedError(f"unexpected node {node.op_type!r} in domain {_DOMAIN!r}")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs["format"] = attrs["format"].decode() if isinstance(attrs["format"], bytes) else attrs["format"]
        x, *params = node.input
        missing = [p for p in params if p not in inits]
        if missing:
            raise UnsupportedError(
                f"sparse linear node {node.name!r}: its weight tensors {missing} are not constants of the "
                "exported graph; only frozen (buffer/parameter) sparse weights can be exported")
        arrays = [_tensor_of(inits[p]) for p in params]
        w, bias, block = _dense_from_placeholder(node, arrays, attrs)
        values_name = params[0] if attrs["format"] == "nm" else params[2]
        layer = values_name.rsplit(".", 1)[0] if "." in values_name else values_name
        choice = choose_sparse_linear(w, bias, format=attrs["format"], block=block,
                                      rows=rows.get(values_name, 1), num_threads=num_threads,
                                      representation=representation, margin=margin, budget_ms=budget_ms,
                                      layer=layer)
        b = _Builder(f"{layer}/{choice.representation}")
        _emit(choice.representation, b, x, node.output[0], w, bias, choice.storage != "dense", block)
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.inits)
        used_by_placeholders.update(params)
        out_types[node.output[0]] = (x, w.dtype, w.shape[0])
        choices.append(choice)
    if not choices:
        return choices
    # the exporter could not type the placeholders' outputs: drop those value_infos, type graph outputs
    typed = [vi for vi in graph.value_info if vi.type.WhichOneof("value") is not None]
    del graph.value_info[:]
    graph.value_info.extend(typed)
    known = {v.name: v.type for v in list(graph.input) + list(graph.value_info) + list(graph.output)
             if v.type.WhichOneof("value") is not None}
    for out in graph.output:
        if out.name in out_types and out.type.WhichOneof("value") is None:
            x, dtype, out_features = out_types[out.name]
            tt = out.type.tensor_type
            tt.elem_type = helper.np_dtype_to_tensor_dtype(dtype)
            if x not in known or not known[x].tensor_type.HasField("shape"):
                raise UnsupportedError(f"sparse linear output {out.name!r} is a graph output whose input "
                                       f"{x!r} has no shape in the exported graph")
            dims = list(known[x].tensor_type.shape.dim)
            for d in dims[:-1]:
                tt.shape.dim.add().CopyFrom(d)
            tt.shape.dim.add().dim_value = out_features
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name not in used_by_placeholders or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    keep_opsets = [o for o in model.opset_import if o.domain != _DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep_opsets)
    return choices


def _tensor_input_names(captured: Captured) -> list[str]:
    """Graph-input names of the model's tensor inputs, in flattened ``(args, kwargs)`` order (an input the
    graph does not use keeps its name but is absent from the ONNX graph)."""
    from torch.export.graph_signature import InputKind

    specs = [s for s in captured.exported.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    leaves = pytree.tree_leaves((tuple(captured.example_args), dict(captured.example_kwargs)))
    if len(specs) != len(leaves):
        raise UnsupportedError(f"the exported program has {len(specs)} user inputs for {len(leaves)} input leaves")
    return [s.arg.name for s, leaf in zip(specs, leaves) if isinstance(leaf, torch.Tensor)]


def _flat_tensor_inputs(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)], spec


def export_onnx(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    *,
    example_kwargs: dict | None = None,
    num_threads: int = 1,
    sparse_representation: str = "auto",
    margin: float = 0.05,
    budget_ms: float = 5.0,
    external_data: bool | None = None,
    opset_version: int | None = None,
) -> OnnxExport:
    """Export ``module`` (an ``nn.Module``, a compressed module or a ``Captured``) to ONNX at ``path``.

    The file passes ``onnx.checker`` and runs in ONNX Runtime. With ``dynamic_batch`` dim 0 of every
    input is dynamic. Sparse linears become the form ONNX Runtime runs fastest on ``num_threads``
    threads at the example row count (see the module docstring; ``sparse_representation`` forces one of
    :data:`REPRESENTATIONS`). ``external_data`` (default: when the weights exceed 1 GiB) writes the
    weights to ``<path>.data`` next to the model.

    Examples
    --------
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    >>> exp = export_onnx(m, (torch.randn(2, 8),), "/tmp/m.onnx")
    >>> exp.input_names
    ['input']
    """
    onnx = _require_onnx()
    if sparse_representation != "auto" and sparse_representation not in REPRESENTATIONS:
        raise ConfigError(f"unknown sparse_representation {sparse_representation!r}; "
                          f"known: {('auto',) + REPRESENTATIONS}")
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
    captured = module if isinstance(module, Captured) else capture(
        module, example_inputs, example_kwargs, dynamic_batch=dynamic_batch, dynamic_dims=False)
    rows = _sparse_layer_rows(captured)
    table = _translation_table()
    # the exporter's chatter (typeless placeholder outputs, optional torchvision ops, folding attempts)
    quiet = [logging.getLogger(n) for n in ("onnx_ir.serde", "torch.onnx._internal.exporter._registration",
                                            "onnxscript.optimizer._constant_folding")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(captured.exported, captured.example_args, kwargs=captured.example_kwargs,
                                        dynamo=True, custom_translation_table=table, verbose=False,
                                        opset_version=opset_version, optimize=True)
            model = program.model_proto
        except Exception as exc:  # the exporter raises many types; report its reason
            raise UnsupportedError(f"torch.onnx.export could not export {type(module).__name__}: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from exc
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    choices = _lower_placeholders(model, rows, num_threads, sparse_representation, margin, budget_ms)

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    weight_bytes = sum(len(i.raw_data) for i in model.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    location = os.path.basename(path) + ".data"
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), location)):
        os.remove(os.path.join(os.path.dirname(os.path.abspath(path)), location))
    onnx.save_model(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    onnx.checker.check_model(path)

    _, in_spec = _flat_tensor_inputs(captured.example_args, captured.example_kwargs)
    out_spec = pytree.tree_flatten(captured.run())[1]
    return OnnxExport(path=path, input_names=_tensor_input_names(captured),
                      output_names=[o.name for o in model.graph.output], in_spec=in_spec, out_spec=out_spec,
                      report=choices, external_data=external)
