"""torch.export -> Relax, with our converters for ``linear``, convolutions, norms and ``sparsecomp::`` ops.

The converters are methods of ``_Lowering`` (lowering.py), one mixin per op family: linear.py (dense and
sparse products), conv.py (convolutions, norms, folding and fusion), index.py (checked indexing),
elementwise.py (dtype promotion, integer division, reductions).

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
``sparsecomp::sparse_linear_csr``  SELL-8 kernel on ``x^T`` (rows sorted into 8-row slices at compile
                                   time); columns int16 when ``in_features < 32768``
``sparsecomp::sparse_linear_nm``   AVX2 and ``m`` in 2/4/8: rows in lanes, ``vpermps`` on 8-column windows
                                   of ``x``; else a row kernel, columns from the uint8 positions
``aten.to.device``                 CPU only: a dtype cast or nothing (left by un-decomposed graphs)
``aten.convolution`` (constant W)  1-3 spatial dims. 1x1 stride-1 ungrouped: pointwise kernel (``W`` as
                                   ``[OC/MB, IC, MB]``, ``pointwise_tile``); depthwise (``groups ==
                                   IC``): row kernel; other
                                   (groups with ``OC/g % 4 == 0``): direct kernel, ``W`` as
                                   ``[OC/NB, IC/g, KD, KH, KW, NB]``; padding is a separate ``pad``.
                                   An inference BatchNorm consuming it alone is folded into ``W``/bias,
                                   a following ReLU / hardswish / hardsigmoid is fused into the store.
                                   Transposed with ``kernel == stride`` (no padding, one group):
                                   pointwise to ``OC*k^d`` channels + pixel shuffle
``aten.native_group_norm``         group-norm kernel (+ a following ReLU fused)
``aten.native_layer_norm``         layer-norm kernel on ``[rows, D]``
``aten.embedding``,                the importer's ``take`` / ``gather_elements``, after an index-check
``aten.index_select``,             kernel: an index out of range raises as in torch instead of being
``aten.index.Tensor`` (1 index),   read; ``x[..., i, ...]`` keeps negative indices. ``select`` with a
``aten.gather``,                   tensor's value (``x[i]``, ``i`` 0-d) is the same checked take
``aten.select.int`` (tensor i)
``aten.index.Tensor`` (several)    each index checked, then one ``take`` of a flat index over the indexed
                                   axes merged, in torch's advanced-indexing layout (the importer's was
                                   wrong in shape and values for most layouts)
``aten.index_put`` (index_add)     each index checked, with ``arange`` over the sliced axes one flat
                                   position per element, the flat scatter below (the importer's refused
                                   ``x[i] = v`` on 2-D+)
``aten.scatter``, ``scatter_add``  index checked, ``scatter_elements`` on a flat view (Relax misplaced
``aten.scatter_reduce`` (sum,      writes for an index smaller than ``self`` on a middle axis); ``src``
prod, amax, amin; include_self)    cut to the index's shape. A boolean mask: the importer's
``aten.div`` (all modes)           torch's result dtype (integer true division is float32); integer
                                   ``trunc`` is ``|a| // |b|`` with the sign of ``a * b``
binary elementwise ops             operands cast to torch's result dtype first (``_PROMOTED``; the
                                   importer made ``i * 0.5`` on integers an integer product)
integer divisions by a tensor      divisor through ``nonzero_check_kernel`` (division by 0 trapped)
``aten.clamp`` (integer result)    ``maximum`` / ``minimum`` (the importer's infinite bound failed)
``aten.elu``                       with ``scale`` / ``input_scale`` (``selu``; the importer dropped them)
``aten.amax``, ``amin``, ``prod``  Relax ``max`` / ``min`` / ``prod`` (the importer had none)
``aten.fmax``, ``fmin``, shifts    NaN-ignoring ``maximum`` / ``minimum``; ``left_shift`` / ``right_shift``
``_native_batch_norm_legit``       ``no_stats`` (``instance_norm``): the input's own mean / variance
``aten.upsample_nearest*.vec``     one ``take`` per axis with torch's ``floor(i * scale)`` indices
``aten.mean.dim`` (trailing dims)  float32 mean over the last ``k`` static dims: mean kernel on
                                   ``[rows, S]`` (the legalized reduction was scalar)
=================================  =====================================================================

Every converter, ours and the importer's, runs behind :func:`_guarded`: a failure raises
``UnsupportedError`` naming the node and op. Anything else (and a ``linear``/``mm``/``bmm``/convolution/norm outside those conditions) goes to the
importer's own converter: a convolution our kernels refuse is still computed, only slower. Indices are narrowed at compile time (they were validated when packed, so the narrowing is
exact). A sparse op whose packed tensors are not constants, or whose dtype is not float32, raises
``UnsupportedError`` naming the node: there is no silent fallback that could compute something else.

``linear`` is kept out of ``run_decompositions`` (:func:`decomposition_table`) so that it reaches its
converter whole instead of as ``permute + addmm``.
"""

from __future__ import annotations

import copy

import torch

import tvm
from tvm import relax

from ....errors import UnsupportedError
from .. import kernels
from .lowering import _Lowering


def decomposition_table() -> dict:
    """torch.export's default decompositions, minus ``aten.linear`` (lowered by our dense kernel)."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.linear.default, None)
    return table


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


def import_program(ep: torch.export.ExportedProgram, parallel: bool = True,
                   target: tvm.target.Target | None = None,
                   prefetch: kernels.PrefetchPlan | None = None) -> tuple[tvm.IRModule, dict[str, int]]:
    """Relax module of ``ep`` and how many times each of our kernels was used (``{"dense": 3, ...}``).

    ``parallel=False`` generates single-threaded kernels (for models lowered with one thread).
    ``target`` (the compilation target) enables ISA-specific kernels (AVX2 N:M, BMI in CSR); ``None``:
    generic ones. ``prefetch``: the sparse kernels' software prefetch; ``None``: the plan calibrated
    for ``target`` on this machine if there is one (:func:`.calibrate.plan_for`), else the default.
    """
    from ..calibrate import plan_for

    from tvm.relax.frontend.torch import from_exported_program

    ep = _decompose(ep)

    def has(feature: str) -> bool:
        return target is not None and bool(tvm.target.codegen.target_has_features(feature, target))

    if prefetch is None:
        prefetch = plan_for(target) if target is not None else kernels.DEFAULT_PLAN
    lowering = _Lowering(ep, parallel, has("avx2"), has("bmi"), has("avx512f"), prefetch)
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


def specialize_example(mod: tvm.IRModule, example: list[torch.Tensor]) -> list[tuple] | None:
    """Add ``main_static``: ``main`` with its symbolic dims bound to the example inputs' sizes.

    With static shapes the Relax VM plans memory at compile time and drops the per-call shape
    arithmetic (``make_shape`` / ``alloc_storage`` per intermediate): 4-12 % of a zoo CNN's 0.2-0.3 ms.
    The model then runs ``main_static`` when the inputs have exactly the example's shapes and ``main``
    otherwise. Returns the static input shapes, or ``None`` when there is nothing to specialise (already
    static, or the parameters do not line up with the example tensors).
    """
    main = mod["main"]
    if len(main.params) < len(example):
        return None
    binds: dict = {}
    # parameters after the inputs are lifted weights (static shapes): nothing to bind there
    for param, tensor in zip(main.params, example):
        ty = param.ty
        if not isinstance(ty, relax.TensorType) or ty.ndim != tensor.dim():
            return None
        for dim, size in zip(ty.shape.values, tensor.shape):
            if isinstance(dim, tvm.tirx.Var):
                if binds.setdefault(dim, int(size)) != int(size):
                    return None
            elif not isinstance(dim, tvm.tirx.IntImm) or int(dim) != int(size):
                return None
    if not binds:
        return None
    # fresh vars: parameters whose shapes have no symbol (lifted weights) would otherwise be the
    # same Var objects in both functions, which FuseOps rejects
    mod["main_static"] = relax.utils.copy_with_new_vars(main.bind_symbolic_vars(binds)).with_attr(
        "global_symbol", "main_static")
    return [tuple(int(d) for d in t.shape) for t in example]


__all__ = ["import_program", "decomposition_table", "specialize_example"]
