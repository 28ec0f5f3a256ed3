"""torch.export -> Relax, with our converters for ``linear`` and every ``sparsecomp::`` operator.

:func:`import_program` calls ``tvm.relax.frontend.torch.from_exported_program`` with a
``custom_convert_map`` built here (one converter per op, keyed by the op's overload name as the importer
sees it). The converters read the *constant* weights straight from the ``ExportedProgram`` (the importer
only binds them after conversion), pack them for our kernels at compile time, and emit
``call_tir`` to the kernels of :mod:`.kernels`:

=================================  =====================================================================
``aten.linear`` (constant fp32 W)  packed dense kernel; ``W`` as ``[N/16, K, 16]`` panels, bias fused
``aten.addmm`` / ``aten.mm``       the same, for a constant ``W [K, N]`` (HF ``Conv1D``)
``aten.bmm`` (static M, K, N)      batched-matmul kernel (attention products)
``sparsecomp::sparse_linear_bsr``  ``r >= c``: blocks transposed to ``[nnzb, c, r]``, ``r``-vector FMA;
                                   ``c > r``: ``[nnzb, r, c]``, ``c``-vector FMA + horizontal sum
``sparsecomp::sparse_linear_csr``  row kernel on ``x^T``; columns int16 when ``in_features < 32768``
``sparsecomp::sparse_linear_nm``   row kernel, columns from the uint8 positions
``aten.to.device``                 CPU only: a dtype cast or nothing (left by un-decomposed graphs)
=================================  =====================================================================

Anything else (and a ``linear``/``mm``/``bmm`` outside those conditions) goes to the importer's own
converter. Indices are narrowed at compile time (they were validated when packed, so the narrowing is
exact). A sparse op whose packed tensors are not constants, or whose dtype is not float32, raises
``UnsupportedError`` naming the node: there is no silent fallback that could compute something else.

``linear`` is kept out of ``run_decompositions`` (:func:`decomposition_table`) so that it reaches its
converter whole instead of as ``permute + addmm``.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from torch import fx

import tvm
from tvm import relax

from ...errors import UnsupportedError
from . import kernels


def decomposition_table() -> dict:
    """torch.export's default decompositions, minus ``aten.linear`` (lowered by our dense kernel)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)
    return table


def _constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor for every parameter, buffer and lifted constant of ``ep``."""
    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(ep.constants)
    out = {}
    for spec in sig.input_specs:
        target = getattr(spec, "target", None)
        if target is not None and target in state and isinstance(state[target], torch.Tensor):
            out[spec.arg.name] = state[target]
    return out


class _Lowering:
    """Converters bound to one exported program (to read its constant tensors)."""

    def __init__(self, ep: torch.export.ExportedProgram, parallel: bool = True):
        self.consts = _constants(ep)
        self.parallel = parallel
        self.fired: dict[str, int] = {}

    # ----------------------------------------------------------------- helpers
    def const(self, arg) -> torch.Tensor | None:
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.consts.get(arg.name)
        return None

    def need_const(self, node: fx.Node, index: int, what: str) -> torch.Tensor:
        value = self.const(node.args[index]) if index < len(node.args) else None
        if value is None:
            raise UnsupportedError(
                f"TVM backend: {what} of {node.target} at node {node.name!r} is not a constant; "
                "sparse kernels are specialised on constant packed weights"
            )
        return value.detach()

    def _count(self, kind: str) -> None:
        self.fired[kind] = self.fired.get(kind, 0) + 1

    @staticmethod
    def _check_float32(node: fx.Node, x: relax.Expr) -> None:
        if x.ty.dtype != "float32":
            raise UnsupportedError(
                f"TVM backend: {node.target} at node {node.name!r} has dtype {x.ty.dtype}; "
                "the sparse TIR kernels are float32 only"
            )

    def _bias(self, node: fx.Node, index: int, n_out: int, padded: int) -> relax.Constant:
        arg = node.args[index] if index < len(node.args) else None
        bias = np.zeros(padded, np.float32)
        if arg is not None:
            b = self.const(arg)
            if b is None:
                raise UnsupportedError(
                    f"TVM backend: bias of {node.target} at node {node.name!r} is not a constant"
                )
            bias[:n_out] = b.detach().float().numpy()
        return relax.const(bias)

    @staticmethod
    def _index(t: torch.Tensor, dtype: torch.dtype = torch.int32) -> relax.Constant:
        return relax.const(np.ascontiguousarray(t.detach().to(dtype).numpy()))

    @staticmethod
    def _flatten(bb: relax.BlockBuilder, x: relax.Expr, k: int):
        """``x [..., K]`` -> (``x2 [R, K]``, leading shape, R)."""
        shape = list(x.ty.shape.values)
        lead = shape[:-1]
        rows = tvm.tirx.const(1, "int64")
        for d in lead:
            rows = rows * d
        if len(shape) == 2:
            return x, lead, lead[0]
        return bb.emit(relax.op.reshape(x, relax.ShapeExpr([rows, k]))), lead, rows

    @staticmethod
    def _restore(bb, y, lead, n_out: int, padded: int):
        if padded != n_out:
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[n_out]))
        if len(lead) != 1:
            y = bb.emit(relax.op.reshape(y, relax.ShapeExpr([*lead, n_out])))
        return y

    def _emit(self, imp, node, x, k: int, n_out: int, padded: int, kernel, name: str,
              consts: list, transpose_x: bool):
        bb = imp.block_builder
        x2, lead, rows = self._flatten(bb, x, k)
        if transpose_x:
            x2 = bb.emit(relax.op.permute_dims(x2, [1, 0]))
        gv = bb.add_func(kernel, name)
        y = bb.emit(relax.call_tir(gv, [x2, *consts], relax.TensorType([rows, padded], "float32")))
        return self._restore(bb, y, lead, n_out, padded)

    # --------------------------------------------------------------- converters
    def linear(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        w = self.const(node.args[1])
        bias_arg = node.args[2] if len(node.args) > 2 else None
        if (
            w is None
            or w.dim() != 2
            or w.dtype != torch.float32
            or x.ty.dtype != "float32"
            or x.ty.ndim < 2  # a 1-D input has no rows to tile over
            or (bias_arg is not None and self.const(bias_arg) is None)
        ):
            return type(imp)._linear(imp, node)  # the importer's own lowering
        bias = None if bias_arg is None else self.const(bias_arg)
        return self._dense(imp, node, x, w, bias)

    def _dense(self, imp, node, x, w: torch.Tensor, bias: torch.Tensor | None) -> relax.Var:
        """``x @ w.T + bias`` through the packed dense kernel (``w`` constant ``[N, K]``)."""
        n_out, k = w.shape
        nb = kernels.DENSE_NB
        padded = -(-n_out // nb) * nb
        wp = torch.zeros(padded, k)
        wp[:n_out] = w.detach()
        packed = wp.reshape(padded // nb, nb, k).permute(0, 2, 1).contiguous().numpy()
        b = np.zeros(padded, np.float32)
        if bias is not None:
            b[:n_out] = bias.detach().float().numpy()
        self._count("dense")
        return self._emit(imp, node, x, k, n_out, padded, kernels.dense_kernel(k, padded, parallel=self.parallel),
                          f"sc_dense_{k}x{padded}", [relax.const(packed), relax.const(b)], False)

    def addmm(self, node: fx.Node, imp) -> relax.Var:
        """``addmm(bias, x, W)`` / ``mm(x, W)`` with a constant ``W [K, N]`` (HF ``Conv1D``)."""
        is_mm = node.target is torch.ops.aten.mm.default
        bias_arg, x_arg, w_arg = (None, *node.args[:2]) if is_mm else node.args[:3]
        x = imp.env[x_arg]
        w = self.const(w_arg)
        bias = None if bias_arg is None else self.const(bias_arg)
        plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
        if (
            w is None or w.dim() != 2 or w.dtype != torch.float32 or x.ty.dtype != "float32"
            or x.ty.ndim != 2 or not plain
            or (bias_arg is not None and (bias is None or bias.shape != (w.shape[1],)))
        ):
            if is_mm:
                return imp.block_builder.emit(relax.op.matmul(x, imp.env[w_arg]))
            return type(imp)._addmm(imp, node)  # the importer's own lowering
        return self._dense(imp, node, x, w.t(), bias)

    def sparse_bsr(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        crow = self.need_const(node, 1, "crow_indices")
        col = self.need_const(node, 2, "col_indices")
        values = self.need_const(node, 3, "values").float()
        n_out, k, r, c = (int(a) for a in node.args[5:9])
        nnzb = values.shape[0]
        if nnzb == 0:
            values = torch.zeros(1, r, c)  # keep buffers non-empty; crow bounds every loop to 0 trips
            col = torch.zeros(1, dtype=torch.int32)
        if r >= c:
            kernel = kernels.bsr_row_vector_kernel(n_out, k, r, c, values.shape[0], "int32",
                                                  parallel=self.parallel)
            vals = values.permute(0, 2, 1).contiguous()
        else:
            kernel = kernels.bsr_col_vector_kernel(n_out, k, r, c, values.shape[0], "int32",
                                                  parallel=self.parallel)
            vals = values.contiguous()
        self._count(f"bsr{r}x{c}")
        consts = [self._index(crow), self._index(col), relax.const(vals.numpy()),
                  self._bias(node, 4, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, f"sc_bsr{r}x{c}_{n_out}x{k}",
                          consts, False)

    def sparse_csr(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        crow = self.need_const(node, 1, "crow_indices")
        col = self.need_const(node, 2, "col_indices")
        values = self.need_const(node, 3, "values").float()
        n_out, k = int(node.args[5]), int(node.args[6])
        if values.numel() == 0:
            values, col = torch.zeros(1), torch.zeros(1, dtype=torch.int32)
        # columns < in_features: int16 when they fit (6 instead of 8 bytes streamed per nonzero)
        narrow = k <= np.iinfo(np.int16).max
        kernel = kernels.csr_kernel(n_out, k, values.numel(), "int16" if narrow else "int32",
                                    parallel=self.parallel)
        self._count("csr")
        name = f"sc_csr_{n_out}x{k}"
        consts = [self._index(crow), self._index(col, torch.int16 if narrow else torch.int32),
                  relax.const(values.contiguous().numpy()), self._bias(node, 4, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, name, consts, True)

    def sparse_nm(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        values = self.need_const(node, 1, "values").float()
        positions = self.need_const(node, 2, "indices")
        n, m, k = int(node.args[4]), int(node.args[5]), int(node.args[6])
        n_out = values.shape[0]
        pos = positions.to(torch.uint8) if positions.numel() == 0 or int(positions.max()) < 256 else positions.to(torch.int32)
        kernel = kernels.nm_kernel(n_out, k, n, m, "uint8" if pos.dtype == torch.uint8 else "int32",
                                   parallel=self.parallel)
        self._count(f"nm{n}:{m}")
        name = f"sc_nm{n}_{m}_{n_out}x{k}"
        consts = [relax.const(values.contiguous().numpy()), relax.const(pos.contiguous().numpy()),
                  self._bias(node, 3, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, name, consts, True)

    def bmm(self, node: fx.Node, imp) -> relax.Var:
        """``aten.bmm`` with static ``M, K, N`` (``N % 8 == 0``) -> :func:`.kernels.bmm_kernel`."""
        a, b = imp.env[node.args[0]], imp.env[node.args[1]]
        sa, sb = a.ty.shape.values, b.ty.shape.values
        dims = [sa[1], sa[2], sb[2]]
        if (
            a.ty.dtype != "float32" or b.ty.dtype != "float32"
            or not all(isinstance(d, tvm.tirx.IntImm) for d in dims)
            or int(dims[2]) % 8
        ):
            return imp.block_builder.emit(relax.op.matmul(a, b))
        m, k, n = (int(d) for d in dims)
        self._count("bmm")
        gv = imp.block_builder.add_func(kernels.bmm_kernel(m, k, n, parallel=self.parallel), f"sc_bmm_{m}x{k}x{n}")
        return imp.block_builder.emit(
            relax.call_tir(gv, [a, b], relax.TensorType([sa[0], m, n], "float32"))
        )

    @staticmethod
    def to_device(node: fx.Node, imp) -> relax.Var:
        """``aten.to.device`` (left by un-decomposed graphs): CPU only, so at most a dtype cast."""
        x = imp.env[node.args[0]]
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if dtype is None:
            return x
        target = imp._convert_data_type(dtype)
        return x if target == x.ty.dtype else imp.block_builder.emit(relax.op.astype(x, target))

    def convert_map(self) -> dict[str, Callable]:
        return {
            "to.device": self.to_device,
            "bmm.default": self.bmm,
            "addmm.default": self.addmm,
            "mm.default": self.addmm,
            "linear.default": self.linear,
            "sparse_linear_bsr.default": self.sparse_bsr,
            "sparse_linear_csr.default": self.sparse_csr,
            "sparse_linear_nm.default": self.sparse_nm,
        }


def _decompose(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Core-ATen decomposition (``linear`` kept), working around torch's failure on some ``view``s.

    Re-tracing an ``aten.view`` of a non-contiguous tensor fails inside ``run_decompositions`` on some
    graphs (HF GPT-2's attention); there, a copy of the program has its views turned into reshapes
    (same values; a reshape copies only when it must). If that fails too, the program is imported
    un-decomposed: the importer converts most ATen ops directly and names any it cannot.
    """
    table = decomposition_table()
    try:
        return ep.run_decompositions(table)
    except Exception:  # noqa: BLE001 - torch raises assorted errors from its re-trace
        pass
    patched = copy.deepcopy(ep)
    for node in patched.graph.nodes:
        if node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    patched.graph_module.recompile()
    try:
        return patched.run_decompositions(table)
    except Exception:  # noqa: BLE001
        return ep


def import_program(ep: torch.export.ExportedProgram, parallel: bool = True
                   ) -> tuple[tvm.IRModule, dict[str, int]]:
    """Relax module of ``ep`` and how many times each of our kernels was used (``{"dense": 3, ...}``).

    ``parallel=False`` generates single-threaded kernels (for models lowered with one thread).
    """
    from tvm.relax.frontend.torch import from_exported_program

    ep = _decompose(ep)
    lowering = _Lowering(ep, parallel)
    try:
        mod = from_exported_program(
            ep, custom_convert_map=lowering.convert_map(), run_ep_decomposition=False
        )
    except AssertionError as err:  # the importer asserts on ops it has no converter for
        raise UnsupportedError(f"TVM backend: {err}") from err
    main = mod["main"]
    if main.attrs is not None and "tir_var_upper_bound" in main.attrs:
        # torch.export's bound on the batch dim (65536) would make StaticPlanBlockMemory reserve
        # every intermediate at that size; without it memory is allocated per call at the real size.
        mod["main"] = main.without_attr("tir_var_upper_bound")
    return mod, dict(lowering.fired)


__all__ = ["import_program", "decomposition_table"]
