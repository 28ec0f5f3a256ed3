"""torch.export -> Relax, with our converters for ``linear``, convolutions, norms and ``sparsecomp::`` ops.

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

import contextlib
import copy
import math
from typing import Callable, NamedTuple

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

    def __init__(self, ep: torch.export.ExportedProgram, parallel: bool = True, avx2: bool = False,
                 bmi: bool = False, avx512: bool = False, prefetch: kernels.PrefetchPlan = kernels.DEFAULT_PLAN):
        self.consts = _constants(ep)
        self.prefetch = prefetch  # the sparse kernels' software prefetch (see .calibrate)
        self.parallel = parallel
        self.avx2 = avx2  # the target has AVX2 (x86 permute kernels)
        self.bmi = bmi  # ... and BMI (bextr in the CSR kernel)
        # rows per dense register tile: 8 accumulator vectors either way (see kernels.DENSE_MB_AVX512)
        self.dense_mb = kernels.DENSE_MB_AVX512 if avx512 else kernels.DENSE_MB
        self.avx512 = avx512  # ... and AVX-512 (16-channel conv vectors)
        self.fired: dict[str, int] = {}
        # nodes folded into one of our kernels -> the node whose (kernel) output they equal
        self.identity: dict[fx.Node, fx.Node] = {}
        self._defaults: dict | None = None  # the importer's own converters (see _default)

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
        return self._emit(imp, node, x, k, n_out, padded, kernels.dense_kernel(k, padded, self.dense_mb, parallel=self.parallel),
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

    def _compressed_rows(self, node: fx.Node, imp) -> tuple[relax.Expr, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float32 input and the constant ``(crow_indices, col_indices, values)`` of a CSR/BSR op."""
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        return (x, self.need_const(node, 1, "crow_indices"), self.need_const(node, 2, "col_indices"),
                self.need_const(node, 3, "values").float())

    def sparse_bsr(self, node: fx.Node, imp) -> relax.Var:
        x, crow, col, values = self._compressed_rows(node, imp)
        n_out, k, r, c = (int(a) for a in node.args[5:9])
        nnzb = values.shape[0]
        if nnzb == 0:
            values = torch.zeros(1, r, c)  # keep buffers non-empty; crow bounds every loop to 0 trips
            col = torch.zeros(1, dtype=torch.int32)
        kernel = kernels.bsr_kernel(n_out, k, r, c, values.shape[0], "int32", parallel=self.parallel,
                                    pf=self.prefetch.bsr(r, c))
        stored = kernels.bsr_stored(col.numpy(), values.numpy(), r, c)
        self._count(f"bsr{r}x{c}")
        consts = [self._index(crow), *(relax.const(a) for a in stored), self._bias(node, 4, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, f"sc_bsr{r}x{c}_{n_out}x{k}",
                          consts, False)

    def sparse_csr(self, node: fx.Node, imp) -> relax.Var:
        x, crow, col, values = self._compressed_rows(node, imp)
        n_out, k = int(node.args[5]), int(node.args[6])
        # columns < in_features: int16 when they fit (6 instead of 8 bytes streamed per nonzero)
        narrow = k <= np.iinfo(np.int16).max
        sptr, cols, vals, perm = kernels.sell_layout(
            crow.numpy(), col.numpy().astype(np.int16 if narrow else np.int32), values.numpy())
        kernel = kernels.csr_kernel(n_out, k, len(sptr) - 1, cols.shape[0], "int16" if narrow else "int32",
                                    parallel=self.parallel, bmi=self.bmi, pf=self.prefetch.csr)
        self._count("csr")
        name = f"sc_csr_{n_out}x{k}"
        consts = [relax.const(sptr), relax.const(cols), relax.const(vals), relax.const(perm),
                  self._bias(node, 4, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, name, consts, True)

    def sparse_nm(self, node: fx.Node, imp) -> relax.Var:
        x = imp.env[node.args[0]]
        self._check_float32(node, x)
        values = self.need_const(node, 1, "values").float()
        positions = self.need_const(node, 2, "indices")
        n, m, k = int(node.args[4]), int(node.args[5]), int(node.args[6])
        n_out = values.shape[0]
        self._count(f"nm{n}:{m}")
        name = f"sc_nm{n}_{m}_{n_out}x{k}"
        if kernels.nm_lanes_supported(n_out, k, n, m, self.avx2):
            vals, pos = kernels.nm_lane_layout(values.numpy(), positions.numpy())
            padded = vals.shape[0] * kernels.SELL_R
            kernel = kernels.nm_lanes_kernel(n_out, k, n, m, parallel=self.parallel, pf=self.prefetch.nm)
            consts = [relax.const(vals), relax.const(pos), self._bias(node, 3, n_out, padded)]
            return self._emit(imp, node, x, k, n_out, padded, kernel, name + "_lanes", consts, False)
        pos = positions.to(torch.uint8) if positions.numel() == 0 or int(positions.max()) < 256 else positions.to(torch.int32)
        kernel = kernels.nm_kernel(n_out, k, n, m, "uint8" if pos.dtype == torch.uint8 else "int32",
                                   parallel=self.parallel)
        consts = [relax.const(values.contiguous().numpy()), relax.const(pos.contiguous().numpy()),
                  self._bias(node, 3, n_out, n_out)]
        return self._emit(imp, node, x, k, n_out, n_out, kernel, name, consts, True)

    def bmm(self, node: fx.Node, imp) -> relax.Var:
        """``aten.bmm`` with static ``M, K, N`` -> :func:`.kernels.bmm_kernel`."""
        a, b = imp.env[node.args[0]], imp.env[node.args[1]]
        sa, sb = a.ty.shape.values, b.ty.shape.values
        dims = [sa[1], sa[2], sb[2]]
        if (
            a.ty.dtype != "float32" or b.ty.dtype != "float32"
            or not all(isinstance(d, tvm.tirx.IntImm) for d in dims)
        ):
            return imp.block_builder.emit(relax.op.matmul(a, b))
        m, k, n = (int(d) for d in dims)
        self._count("bmm")
        gv = imp.block_builder.add_func(kernels.bmm_kernel(m, k, n, parallel=self.parallel), f"sc_bmm_{m}x{k}x{n}")
        return imp.block_builder.emit(
            relax.call_tir(gv, [a, b], relax.TensorType([sa[0], m, n], "float32"))
        )

    # ------------------------------------------------------------- convolutions
    def convolution(self, node: fx.Node, imp) -> relax.Var:
        """``aten.convolution`` with constant fp32 weights -> our conv kernels (else the importer's).

        A ``BatchNorm`` (inference) that is the convolution's only consumer is folded into its weights
        and bias, and a ReLU / hardswish / hardsigmoid applied to the result alone is fused into the
        kernel's store (:meth:`_fused_activation`); the folded nodes convert as identities
        (:meth:`passthrough`). Transposed convolutions fold nothing.
        """
        spec = _conv_spec(node, imp.env[node.args[0]], self.const(node.args[1]),
                          self._opt_const(node.args[2] if len(node.args) > 2 else None))
        if spec is None:
            return type(imp)._convolution(imp, node)
        if spec.transposed:
            return self._conv_transpose(imp, node, spec)
        w, b = spec.weight, spec.bias
        folded = self._fold_batch_norm(node, w, b)
        last = node
        if folded is not None:
            w, b, last = folded
        residual = None
        if not spec.depthwise:
            residual = self._residual_add(imp, last, node)
            if residual is not None:
                last, residual = residual
        act = self._fused_activation(last, node)
        return self._conv_forward(imp, node, spec, w, b, act, residual)

    def _residual_add(self, imp, last: fx.Node, into: fx.Node):
        """``(add_node, other)`` when ``last``'s only consumer is ``last + other`` (or ``other +
        last``) with ``other`` already converted and of the same static shape: the addition is
        fused into the conv kernel's store (a ResNet / MobileNet skip connection)."""
        users = list(last.users)
        if len(users) != 1 or _op(users[0]) != "add.Tensor" or users[0].kwargs or len(users[0].args) != 2:
            return None
        add = users[0]
        other = add.args[1] if add.args[0] is last else add.args[0]
        if other is last or last not in add.args or not isinstance(other, fx.Node) or other not in imp.env:
            return None
        value = imp.env[other]
        out_meta, other_meta = last.meta.get("val"), other.meta.get("val")
        if (not isinstance(value, relax.Expr) or not isinstance(value.ty, relax.TensorType)
                or value.ty.dtype != "float32" or not isinstance(out_meta, torch.Tensor)
                or not isinstance(other_meta, torch.Tensor) or out_meta.shape != other_meta.shape
                or other_meta.dtype != torch.float32):
            return None
        self._fold([add], into)
        return add, value

    def group_norm(self, node: fx.Node, imp) -> relax.Var:
        """``aten.native_group_norm`` (fp32, static C and spatial dims, constant or no affine) ->
        :func:`.kernels.group_norm_kernel`, with a following ``ReLU`` fused; else the importer's."""
        x = imp.env[node.args[0]]
        args = list(node.args) + [None] * (8 - len(node.args))
        gamma, beta = self._opt_const(args[1]), self._opt_const(args[2])
        ty = x.ty
        groups = args[6]
        if (gamma is False or beta is False or not isinstance(groups, int)
                or not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.ndim < 3
                or not all(isinstance(v, tvm.tirx.IntImm) for v in ty.shape.values[1:])):
            return type(imp)._native_group_norm(imp, node)
        dims = [int(v) for v in ty.shape.values[1:]]
        c, spatial = dims[0], int(np.prod(dims[1:]))
        if c % groups or any(getattr(u.target, "__name__", "") != "getitem" or u.args[1] != 0
                             for u in node.users):
            return type(imp)._native_group_norm(imp, node)
        relu = None
        if len(node.users) == 1:
            relu = self._fused_activation(next(iter(node.users)), node, ("relu",))
        eps = float(args[7]) if args[7] is not None else 1e-5
        g = np.ones(c, np.float32) if gamma is None else gamma.detach().float().numpy()
        b = np.zeros(c, np.float32) if beta is None else beta.detach().float().numpy()
        bb = imp.block_builder
        n = ty.shape.values[0]
        kernel = kernels.group_norm_kernel(c, groups, spatial, eps, relu=relu is not None,
                                           dims=tuple(dims))
        gv = bb.add_func(kernel, f"sc_group_norm_{c}x{spatial}")
        self._count("group_norm")
        return bb.emit(relax.call_tir(gv, [x, relax.const(g), relax.const(b)],
                                      relax.TensorType([n, *dims], "float32")))

    def layer_norm(self, node: fx.Node, imp) -> relax.Var:
        """``aten.native_layer_norm`` over static trailing dims (fp32, constant or no affine) ->
        :func:`.kernels.layer_norm_kernel` on the input viewed as ``[rows, D]``; else the importer's."""
        x = imp.env[node.args[0]]
        args = list(node.args) + [None] * (5 - len(node.args))
        shape, gamma, beta = args[1], self._opt_const(args[2]), self._opt_const(args[3])
        ty = x.ty
        if (gamma is False or beta is False or not isinstance(shape, (list, tuple))
                or not isinstance(ty, relax.TensorType) or ty.dtype != "float32"
                or not 0 < len(shape) < ty.ndim
                or any(getattr(u.target, "__name__", "") != "getitem" or u.args[1] != 0
                       for u in node.users)):
            return type(imp)._native_layer_norm(imp, node)
        dims = ty.shape.values
        tail = dims[ty.ndim - len(shape):]
        if not all(isinstance(d, tvm.tirx.IntImm) for d in tail) or [int(d) for d in tail] != list(shape):
            return type(imp)._native_layer_norm(imp, node)
        d = int(np.prod(shape))
        rows = tvm.tirx.const(1, "int64")
        for lead in dims[: ty.ndim - len(shape)]:
            rows = rows * lead
        g = np.ones(d, np.float32) if gamma is None else gamma.detach().float().reshape(-1).numpy()
        b = np.zeros(d, np.float32) if beta is None else beta.detach().float().reshape(-1).numpy()
        eps = float(args[4]) if args[4] is not None else 1e-5
        bb = imp.block_builder
        x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([rows, d])))
        gv = bb.add_func(kernels.layer_norm_kernel(d, eps, parallel=self.parallel), f"sc_layer_norm_{d}")
        self._count("layer_norm")
        y = bb.emit(relax.call_tir(gv, [x2, relax.const(g), relax.const(b)],
                                   relax.TensorType([rows, d], "float32")))
        return bb.emit(relax.op.reshape(y, relax.ShapeExpr(list(dims))))

    def _opt_const(self, arg):
        """``None`` for a missing argument, the tensor for a constant, ``False`` for anything else."""
        if arg is None:
            return None
        value = self.const(arg)
        return False if value is None else value

    def _fold_batch_norm(self, node: fx.Node, w: torch.Tensor, b: torch.Tensor | None):
        """``(w', b', bn_output_node)`` when ``node``'s only consumer is an inference BatchNorm with
        constant statistics (folded: ``w * g/sqrt(v+eps)``, ``(b - m) * g/sqrt(v+eps) + beta``)."""
        users = list(node.users)
        if len(users) != 1:
            return None
        bn = users[0]
        if getattr(bn.target, "__name__", "") != "_native_batch_norm_legit_no_training.default":
            return None
        if bn.args[0] is not node or any(
            getattr(u.target, "__name__", "") != "getitem" or u.args[1] != 0 for u in bn.users
        ):
            return None
        params = []
        for arg in bn.args[1:5]:
            value = self._opt_const(arg)
            if value is False:
                return None
            params.append(None if value is None else value.detach().double())
        gamma, beta, mean, var = params
        if mean is None or var is None:
            return None
        eps = float(bn.args[6]) if len(bn.args) > 6 else 1e-5
        scale = (var + eps).rsqrt() * (gamma if gamma is not None else 1.0)
        shift = (-mean * scale) + (beta if beta is not None else 0.0)
        if b is not None:
            shift = shift + b.double() * scale
        w2 = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).float()
        self._fold([bn, *bn.users], node)
        out = next(iter(bn.users)) if len(bn.users) == 1 else None
        return w2, shift.float(), out if out is not None else bn

    def _fold(self, nodes, into: fx.Node) -> None:
        """Convert ``nodes`` as the value of ``into`` (they were folded into its kernel)."""
        for n in nodes:
            self.identity[n] = into

    def _fused_activation(self, last: fx.Node, into: fx.Node,
                          allowed: tuple = kernels.ACTIVATIONS) -> str | None:
        """The activation applied to ``last`` and nothing else (``relu``, or torch's decompositions of
        ``hardswish`` / ``hardsigmoid``), fused into the producing kernel: its nodes are then
        converted as identities. ``None`` when ``last`` has other consumers or no such chain."""
        users = list(last.users)
        if "relu" in allowed and len(users) == 1 and _op(users[0]) == "relu.default":
            self._fold(users, into)
            return "relu"
        gate = _relu6_plus_3(last)
        if gate is None:
            return None
        chain, end = gate
        after = list(end.users)
        if "hardsigmoid" in allowed and len(users) == 1 and len(after) == 1 and _is_div6(after[0], end):
            self._fold([*chain, after[0]], into)
            return "hardsigmoid"
        if "hardswish" in allowed and len(users) == 2 and len(after) == 1:
            mul = after[0]
            if (_op(mul) == "mul.Tensor" and set(mul.args) == {last, end} and mul in users
                    and len(mul.users) == 1 and _is_div6(next(iter(mul.users)), mul)):
                self._fold([*chain, mul, next(iter(mul.users))], into)
                return "hardswish"
        return None

    def passthrough(self, key: str, own: Callable | None = None) -> Callable:
        """Converter for ``key`` that returns the input of nodes folded into one of our kernels, and
        converts every other node with ``own`` (when given) or the importer's own converter."""

        def convert(node: fx.Node, imp) -> relax.Var:
            if node in self.identity:
                return imp.env[self.identity[node]]
            return own(node, imp) if own is not None else self._default(imp, key, node)

        return convert

    def _check(self, imp, node: fx.Node, kind: str, make: Callable, args: list, flat: relax.Expr,
               dtype: str) -> relax.Expr:
        """``call_tir`` of the check kernel ``make(what)`` (``what``: the op and node its error names) on
        ``args``, the last of which is ``flat`` (1-D); returns the checked values (``dtype``, ``flat``'s
        length). ``kind`` names the count in :attr:`fired` and the function."""
        bb = imp.block_builder
        op = str(node.target).split(".")[-2]  # aten.embedding.default -> embedding
        gv = bb.add_func(make(f"{op} at node {node.name!r}"), f"sc_{kind}_{op}")
        self._count(kind)
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(list(flat.ty.shape.values), dtype)))

    def _nonzero(self, imp, node: fx.Node, divisor: relax.Expr) -> relax.Expr:
        """``divisor`` (an integer tensor) after :func:`.kernels.nonzero_check_kernel`."""
        shape = list(divisor.ty.shape.values)
        flat = imp.block_builder.emit(relax.op.reshape(divisor, [_prod(shape)]))
        dtype = divisor.ty.dtype
        checked = self._check(imp, node, "zero_check", lambda what: kernels.nonzero_check_kernel(dtype, what),
                              [flat], flat, dtype)
        return imp.block_builder.emit(relax.op.reshape(checked, shape))

    def int_division(self, convert: Callable) -> Callable:
        """``convert`` (an integer-capable division: ``floor_divide``, ``remainder``, ``fmod``, ``div``
        with a rounding mode) with an integer tensor divisor checked nonzero first, and a constant
        integer divisor of 0 refused: the CPU's integer division by zero kills the process."""

        def run(node: fx.Node, imp) -> relax.Var:
            divisor = node.args[1] if len(node.args) > 1 else None
            mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
            result = _result_dtype(node, (0, 1))
            true_div = _op(node).startswith("div.") and mode is None
            if result is None or result.is_floating_point or result.is_complex or true_div:
                return convert(node, imp)
            if not isinstance(divisor, fx.Node):
                if divisor == 0:
                    raise UnsupportedError(f"TVM backend: integer division by the constant 0 at node "
                                           f"{node.name!r} (torch raises ZeroDivisionError)")
                return convert(node, imp)
            if not isinstance(imp.env[divisor].ty, relax.TensorType):  # a symbolic size: never 0
                return convert(node, imp)
            with _substituted(imp, {divisor: self._nonzero(imp, node, _operand(imp, divisor, result))}):
                return convert(node, imp)

        return run

    def clamp(self, node: fx.Node, imp) -> relax.Var:
        """``clamp`` of an integer result: ``maximum`` / ``minimum`` with integer constants (the
        importer's ``clip`` put an infinite bound on a missing side, which failed to build for
        integers); float results: the importer's."""
        dtype = node.meta["val"].dtype if isinstance(node.meta.get("val"), torch.Tensor) else None
        if dtype is None or dtype.is_floating_point or dtype == torch.bool:
            return self._default(imp, "clamp.default", node)
        args = list(node.args) + [None] * (3 - len(node.args))
        lo, hi = node.kwargs.get("min", args[1]), node.kwargs.get("max", args[2])
        if not all(b is None or isinstance(b, int) for b in (lo, hi)):
            return self._default(imp, "clamp.default", node)
        bb, rd = imp.block_builder, _relax_dtype(dtype)
        x = _operand(imp, node.args[0], dtype)
        if lo is not None:
            x = bb.emit(relax.op.maximum(x, relax.const(lo, rd)))
        if hi is not None:
            x = bb.emit(relax.op.minimum(x, relax.const(hi, rd)))
        return x

    def _conv_forward(self, imp, node: fx.Node, spec: "_ConvSpec", w: torch.Tensor,
                      b: torch.Tensor | None, act: str | None,
                      residual: relax.Expr | None = None) -> relax.Var:
        """Emit the pointwise or direct conv kernel for a (non-transposed) convolution."""
        bb = imp.block_builder
        x = imp.env[node.args[0]]
        n = x.ty.shape.values[0]
        oc = spec.out_channels
        if spec.pointwise:
            p = int(np.prod(spec.in_spatial))
            mb, pb = kernels.pointwise_tile(p, self.avx512)
            ocp = -(-oc // mb) * mb
            wp = torch.zeros(ocp, spec.in_channels)
            wp[:oc] = w.reshape(oc, spec.in_channels)
            packed = wp.reshape(ocp // mb, mb, spec.in_channels).permute(0, 2, 1).contiguous()
            kernel = kernels.pointwise_conv_kernel(
                spec.in_channels, p, oc, mb, pb, act=act, x_dims=(spec.in_channels, *spec.in_spatial),
                y_dims=(oc, *spec.out_spatial), parallel=self.parallel, residual=residual is not None)
            name = f"sc_conv1x1_{spec.in_channels}x{oc}x{p}"
            self._count("conv1x1")
            args = [x, relax.const(packed.numpy()), relax.const(_padded_bias(b, ocp))]
        else:
            xp = self._padded(bb, x, spec)
            padded = tuple(d + 2 * p for d, p in zip(spec.in_spatial, spec.padding))
            in5 = _to3(padded, 1)
            k5, s5, d5 = _to3(spec.kernel, 1), _to3(spec.stride, 1), _to3(spec.dilation, 1)
            dims = {"x_dims": (spec.in_channels, *padded), "y_dims": (oc, *spec.out_spatial)}
            if spec.depthwise:
                kernel = kernels.depthwise_conv_kernel(spec.in_channels, in5, oc, k5, s5, d5,
                                                       act=act, parallel=self.parallel, **dims)
                name = f"sc_dwconv_{oc}_k{'x'.join(map(str, spec.kernel))}"
                self._count("dwconv")
                packed = w.reshape(oc, *k5).contiguous()
                args = [xp, relax.const(packed.numpy()), relax.const(_padded_bias(b, oc))]
            else:
                nb, tw = kernels.conv_tile(oc // spec.groups, spec.groups, spec.out_spatial[-1], self.avx512)
                ocp = -(-oc // nb) * nb
                wp = torch.zeros(ocp, spec.in_channels // spec.groups, *k5)
                wp[:oc] = w.reshape(oc, spec.in_channels // spec.groups, *k5)
                packed = wp.reshape(ocp // nb, nb, *wp.shape[1:]).permute(0, 2, 3, 4, 5, 1).contiguous()
                kernel = kernels.conv_kernel(spec.in_channels, in5, oc, k5, s5, d5, spec.groups, nb,
                                             tw, act=act, parallel=self.parallel,
                                             residual=residual is not None, **dims)
                name = f"sc_conv_{spec.in_channels}x{oc}_k{'x'.join(map(str, spec.kernel))}"
                self._count("conv")
                args = [xp, relax.const(packed.numpy()), relax.const(_padded_bias(b, ocp))]
        if residual is not None:
            args.append(residual)
            name += "_res"
        gv = bb.add_func(kernel, name)
        return bb.emit(relax.call_tir(gv, args, relax.TensorType([n, oc, *spec.out_spatial], "float32")))

    @staticmethod
    def _padded(bb: relax.BlockBuilder, x: relax.Expr, spec: "_ConvSpec") -> relax.Expr:
        """``x`` zero-padded by the conv's padding (a separate, fusable injective op)."""
        if not any(spec.padding):
            return x
        widths = [0, 0, 0, 0]
        for p in spec.padding:
            widths += [p, p]
        return bb.emit(relax.op.nn.pad(x, widths))

    def _conv_transpose(self, imp, node: fx.Node, spec: "_ConvSpec") -> relax.Var:
        """Transposed conv with ``kernel == stride`` (no overlap, no padding): a pointwise conv to
        ``OC * prod(k)`` channels, then the pixel shuffle back to ``[N, OC, H*k, W*k]``."""
        bb = imp.block_builder
        x = imp.env[node.args[0]]
        n = x.ty.shape.values[0]
        ic, oc, k = spec.in_channels, spec.out_channels, spec.kernel
        taps = int(np.prod(k))
        w = spec.weight  # [IC, OC, *k]
        oc2 = oc * taps
        w2 = w.reshape(ic, oc2).t().contiguous()  # row (o, *tap) of the pointwise weight
        b2 = None if spec.bias is None else spec.bias.repeat_interleave(taps)
        p = int(np.prod(spec.in_spatial))
        mb, pb = kernels.pointwise_tile(p, self.avx512)
        ocp = -(-oc2 // mb) * mb
        wp = torch.zeros(ocp, ic)
        wp[:oc2] = w2
        packed = wp.reshape(ocp // mb, mb, ic).permute(0, 2, 1).contiguous()
        gv = bb.add_func(kernels.pointwise_conv_kernel(ic, p, oc2, mb, pb, x_dims=(ic, *spec.in_spatial),
                                                       y_dims=(oc, *k, *spec.in_spatial),
                                                       parallel=self.parallel),
                         f"sc_convT_{ic}x{oc2}x{p}")
        self._count("conv_transpose")
        y = bb.emit(relax.call_tir(gv, [x, relax.const(packed.numpy()),
                                        relax.const(_padded_bias(b2, ocp))],
                                   relax.TensorType([n, oc, *k, *spec.in_spatial], "float32")))
        d = len(k)
        # [N, OC, k1..kd, s1..sd] -> [N, OC, s1, k1, ..., sd, kd] -> [N, OC, s1*k1, ...]
        order = [0, 1]
        for i in range(d):
            order += [2 + d + i, 2 + i]
        y = bb.emit(relax.op.permute_dims(y, order))
        return bb.emit(relax.op.reshape(
            y, relax.ShapeExpr([n, oc, *(s * kk for s, kk in zip(spec.in_spatial, k))])))

    @staticmethod
    def to_device(node: fx.Node, imp) -> relax.Var:
        """``aten.to.device`` (left by un-decomposed graphs): CPU only, so at most a dtype cast."""
        x = imp.env[node.args[0]]
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if dtype is None:
            return x
        target = imp._convert_data_type(dtype)
        return x if target == x.ty.dtype else imp.block_builder.emit(relax.op.astype(x, target))

    # ------------------------------------------------ indices checked as torch checks them
    def _default(self, imp, key: str, node: fx.Node) -> relax.Var:
        """``node`` converted by the importer's own converter for ``key``."""
        if self._defaults is None:
            self._defaults = imp.create_convert_map()
        return self._defaults[key](node)

    def _checked_index(self, imp, node: fx.Node, data: relax.Expr, index: relax.Expr, axis: int,
                       wrap: bool) -> relax.Expr | None:
        """``index`` (int64, same shape) after :func:`.kernels.index_check_kernel` against axis ``axis``
        of ``data``: an index out of range raises as in torch, where Relax ``take`` /
        ``gather_elements`` would read past the end (garbage or a segfault); negative indices come
        out counted from the end when ``wrap``. ``None`` (the caller defers to the importer) for
        dtypes this does not cover."""
        if (data.ty.ndim < 1 or data.ty.dtype not in _INDEXED_DATA
                or index.ty.dtype not in _INDEX_DTYPES):
            return None
        bb = imp.block_builder
        shape = list(data.ty.shape.values)
        ishape = list(index.ty.shape.values)
        axis %= len(shape)
        x3 = bb.emit(relax.op.reshape(data, [_prod(shape[:axis]), shape[axis], _prod(shape[axis + 1:])]))
        i1 = bb.emit(relax.op.reshape(index, [_prod(ishape)]))
        checked = self._check(
            imp, node, "index_check",
            lambda what: kernels.index_check_kernel(data.ty.dtype, index.ty.dtype, wrap, what), [x3, i1], i1,
            "int64")
        return bb.emit(relax.op.reshape(checked, ishape))

    def _take(self, imp, node: fx.Node, key: str, data: relax.Expr, index: relax.Expr, axis: int,
              wrap: bool) -> relax.Var:
        checked = self._checked_index(imp, node, data, index, axis, wrap)
        if checked is None:
            return self._default(imp, key, node)
        return imp.block_builder.emit(relax.op.take(data, checked, axis=axis))

    def embedding(self, node: fx.Node, imp) -> relax.Var:
        return self._take(imp, node, "embedding.default", imp.env[node.args[0]], imp.env[node.args[1]],
                          0, False)

    def index_select(self, node: fx.Node, imp) -> relax.Var:
        return self._take(imp, node, "index_select.default", imp.env[node.args[0]],
                          imp.env[node.args[2]], node.args[1], False)

    def index(self, node: fx.Node, imp) -> relax.Var:
        """``x[..., i, ...]`` with integer index tensors (negative indices count from the end), each
        checked against its axis. One: a ``take``. Several: one ``take`` of a flat index over the
        indexed axes merged into one, laid out as torch lays out advanced indexing (adjacent index
        tensors keep their place, separated ones go first). The importer's own converter got both
        the shape (``x[i, :, j]``, ``x[:, i, j]``) and the values (``x[i, j, j]``) wrong. A boolean
        mask goes to the importer."""
        given = [(axis, i) for axis, i in enumerate(node.args[1]) if i is not None]
        data = imp.env[node.args[0]]
        if any(imp.env[i].ty.dtype not in _INDEX_DTYPES for _, i in given):  # a boolean mask
            return self._default(imp, "index.Tensor", node)
        if len(given) == 1:
            axis, i = given[0]
            return self._take(imp, node, "index.Tensor", data, imp.env[i], axis, True)
        if data.ty.dtype not in _INDEXED_DATA:
            raise UnsupportedError(f"TVM backend: indexing {data.ty.dtype} data at node {node.name!r}")
        bb = imp.block_builder
        shape = list(data.ty.shape.values)
        axes = [axis for axis, _ in given]
        if any(not isinstance(shape[a], tvm.tirx.IntImm) for a in axes[1:]):
            raise UnsupportedError(
                f"TVM backend: indexing at node {node.name!r}: a symbolic size on an indexed axis "
                f"after the first ({[shape[a] for a in axes]})")
        flat = _flat_position(bb, [self._checked_index(imp, node, data, imp.env[i], axis, True)
                                   for axis, i in given], [shape[a] for a in axes])
        first, last = axes[0], axes[-1]
        merged = [_prod([shape[a] for a in axes])]
        if last - first + 1 == len(axes):  # adjacent: the merged axis stays in place
            x = bb.emit(relax.op.reshape(data, shape[:first] + merged + shape[last + 1:]))
            out = bb.emit(relax.op.take(x, flat, axis=first))
        else:  # separated: the indexed axes go first
            rest = [d for d in range(len(shape)) if d not in axes]
            x = bb.emit(relax.op.permute_dims(data, axes + rest))
            x = bb.emit(relax.op.reshape(x, merged + [shape[d] for d in rest]))
            out = bb.emit(relax.op.take(x, flat, axis=0))
        self._count("index_gather")
        return out

    def select(self, node: fx.Node, imp) -> relax.Var:
        """``x.select(dim, i)`` where ``i`` is a tensor's value (``x[i]`` with a 0-d index tensor
        exports as ``select(x, dim, _local_scalar_dense(i))``): a checked ``take`` with the 0-d
        index; the importer only takes a constant ``i`` (it failed with ``ValueError`` here)."""
        src = node.args[2]
        if not (isinstance(src, fx.Node) and _op(src) == "_local_scalar_dense.default"):
            return self._default(imp, "select.int", node)
        index = imp.env[src.args[0]]
        if index.ty.ndim != 0:
            index = imp.block_builder.emit(relax.op.reshape(index, []))
        return self._take(imp, node, "select.int", imp.env[node.args[0]], index, node.args[1], True)

    def index_put(self, node: fx.Node, imp) -> relax.Var:
        """``x[indices] = values`` (``accumulate``: ``+=``, as ``index_add`` decomposes), integer index
        tensors only: each checked against its axis (negative ones count from the end), then one flat
        position per written element (``arange`` over the sliced axes, laid out as torch lays out
        advanced indexing: adjacent index tensors keep their place, separated ones go first) and a
        1-D ``scatter_elements`` (see :func:`_flat_scatter`). The importer's own converter refused
        fewer index tensors than dimensions and laid out ``None`` (slice) axes wrongly where they
        follow an index tensor. A boolean mask, a symbolic broadcast or a symbolic size after the
        first goes to the importer."""
        key = "index_put_.default" if "index_put_" in str(node.target) else "index_put.default"
        x, values = imp.env[node.args[0]], imp.env[node.args[2]]
        accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
        given = [(axis, i) for axis, i in enumerate(node.args[1]) if i is not None]
        exprs = [imp.env[i] for _, i in given]
        if (not given or x.ty.ndim < 1 or x.ty.dtype not in _INDEXED_DATA
                or any(e.ty.dtype not in _INDEX_DTYPES for e in exprs)):
            return self._default(imp, key, node)
        bshape = _broadcast_dims([list(e.ty.shape.values) for e in exprs])
        if bshape is None:
            return self._default(imp, key, node)
        bb = imp.block_builder
        shape = list(x.ty.shape.values)
        axes = [axis for axis, _ in given]
        first, last = axes[0], axes[-1]
        adjacent = last - first + 1 == len(axes)
        sliced = [d for d in range(len(shape)) if d not in axes]
        pre = first if adjacent else 0
        out = (shape[:first] + bshape + shape[last + 1:]) if adjacent else bshape + [shape[d] for d in sliced]
        if any(not isinstance(d, tvm.tirx.IntImm) for d in shape[1:]):
            return self._default(imp, key, node)
        rank, nb = len(out), len(bshape)
        terms = []
        for d in range(len(shape)):
            if d in axes:
                e = exprs[axes.index(d)]
                checked = self._checked_index(imp, node, x, e, d, True)
                dims = [1] * (nb - e.ty.ndim) + list(e.ty.shape.values)
                terms.append(bb.emit(relax.op.reshape(checked, [1] * pre + dims + [1] * (rank - pre - nb))))
            else:
                p = (d if d < first else d - len(axes) + nb) if adjacent else nb + sliced.index(d)
                terms.append(_arange_along(bb, shape[d], p, rank))
        self._count("index_put")
        result = _flat_scatter(bb, x, terms, out, values, "add" if accumulate else "update")
        if key == "index_put_.default":  # in place: later reads of ``x`` (or an alias) see the write
            for other, expr in list(imp.env.items()):
                if expr is x:
                    imp.env[other] = result
        return result

    def scatter(self, node: fx.Node, imp) -> relax.Var:
        """``scatter`` (``src`` or a scalar), ``scatter_add`` and ``scatter_reduce(...,
        include_self=True)`` with ``sum`` / ``prod`` / ``amax`` / ``amin``: the index checked against
        ``dim`` of ``self`` (Relax ``scatter_elements`` wrote wherever an index pointed), then
        ``scatter_elements`` over ``src`` cut to the index's shape, as torch reads it. The importer
        refused a ``src`` larger than the index and had no ``scatter_add`` / ``scatter_reduce``."""
        op = _op(node)
        x, axis, index, src = imp.env[node.args[0]], node.args[1], imp.env[node.args[2]], node.args[3]
        reduce = {"scatter_add.default": "sum", "scatter_reduce.two": None}.get(op, "update")
        if reduce is None:
            reduce = src_reduce = node.args[4]
            include_self = node.args[5] if len(node.args) > 5 else node.kwargs.get("include_self", True)
            if not include_self or src_reduce not in _SCATTER_REDUCTIONS or src_reduce == "update":
                raise UnsupportedError(
                    f"TVM backend: scatter_reduce at node {node.name!r} with reduce={src_reduce!r}, "
                    f"include_self={include_self} is not supported (supported: include_self=True with "
                    f"sum, prod, amax, amin)")
        checked = self._checked_index(imp, node, x, index, axis, False)
        if checked is None:
            raise UnsupportedError(
                f"TVM backend: {op} at node {node.name!r} with a {index.ty.dtype} index into "
                f"{x.ty.dtype} data")
        bb = imp.block_builder
        if isinstance(src, fx.Node):
            src = imp.env[src]
            ishape, sshape = list(index.ty.shape.values), list(src.ty.shape.values)
            cut = [d for d, (a, b) in enumerate(zip(ishape, sshape)) if not _same_dim(a, b)]
            if any(not isinstance(ishape[d], tvm.tirx.IntImm) for d in cut):
                raise UnsupportedError(
                    f"TVM backend: {op} at node {node.name!r}: src {src.ty} cut to the index's symbolic "
                    f"shape {index.ty}")
            if cut:
                src = bb.emit(relax.op.strided_slice(src, cut, [0] * len(cut), [ishape[d] for d in cut]))
        else:  # scatter.value: a Python scalar
            src = bb.emit(relax.op.full_like(index, relax.const(src, x.ty.dtype), dtype=x.ty.dtype))
        shape, ishape = list(x.ty.shape.values), list(index.ty.shape.values)
        axis %= len(shape)
        if any(not isinstance(d, tvm.tirx.IntImm) for d in shape[1:]):
            raise UnsupportedError(
                f"TVM backend: {op} at node {node.name!r}: symbolic sizes after the first in {x.ty}")
        terms = [checked if d == axis else _arange_along(bb, ishape[d], d, len(shape)) for d in range(len(shape))]
        self._count("scatter")
        return _flat_scatter(bb, x, terms, ishape, src, _SCATTER_REDUCTIONS[reduce])

    def gather(self, node: fx.Node, imp) -> relax.Var:
        x, axis = imp.env[node.args[0]], node.args[1]
        checked = self._checked_index(imp, node, x, imp.env[node.args[2]], axis, False)
        if checked is None:
            return self._default(imp, "gather.default", node)
        return imp.block_builder.emit(relax.op.gather_elements(x, checked, axis=axis))

    # ------------------------------------------------ elementwise ops the importer got wrong
    @staticmethod
    def div(node: fx.Node, imp) -> relax.Var:
        """``div`` (true, ``floor`` or ``trunc``) in torch's result dtype: true division of integers is
        float32, the importer's stayed integer (``i / 2`` gave ``i // 2``) or failed on an integer
        scalar; integer ``trunc`` is ``|a| // |b|`` with the sign of ``a * b``."""
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("rounding_mode")
        dtype = _result_dtype(node, (0, 1))
        if dtype is None:
            raise UnsupportedError(f"TVM backend: div at node {node.name!r} on {node.args[:2]}")
        if mode is None and not (dtype.is_floating_point or dtype.is_complex):
            dtype = torch.get_default_dtype()
        bb = imp.block_builder
        a, divisor = _operand(imp, node.args[0], dtype), node.args[1]
        if dtype.is_floating_point:
            if isinstance(divisor, (int, float)) and divisor == 0:
                # IEEE x / +-0 (+-inf, NaN for 0 / 0) as x * +-inf: TVM's simplifier aborts on a
                # constant division by zero ("Check failed: fb->value != 0")
                inf = math.copysign(math.inf, divisor) if isinstance(divisor, float) else math.inf
                q = bb.emit(relax.op.multiply(a, relax.const(inf, _relax_dtype(dtype))))
            else:
                q = bb.emit(relax.op.divide(a, _operand(imp, divisor, dtype)))
            if mode is None:
                return q
            return bb.emit(relax.op.floor(q) if mode == "floor" else relax.op.trunc(q))
        b = _operand(imp, divisor, dtype)
        if mode == "floor":
            return bb.emit(relax.op.floor_divide(a, b))
        # toward zero: |a| // |b| with the sign of a * b (bool selects failed LLVM's verifier)
        q = bb.emit(relax.op.floor_divide(relax.op.abs(a), relax.op.abs(b)))
        return bb.emit(relax.op.multiply(q, relax.op.multiply(relax.op.sign(a), relax.op.sign(b))))

    @staticmethod
    def elu(node: fx.Node, imp) -> relax.Var:
        """``elu(x, alpha, scale, input_scale)``: ``scale * x`` for ``x > 0``, else
        ``scale * alpha * (exp(input_scale * x) - 1)``. ``selu`` decomposes to it with ``scale != 1``,
        which the importer dropped (selu off by 5 %)."""
        x = imp.env[node.args[0]]
        given = dict(zip(("alpha", "scale", "input_scale"), node.args[1:4]), **node.kwargs)
        alpha, scale, input_scale = (given.get(k, 1.0) for k in ("alpha", "scale", "input_scale"))
        dt = x.ty.dtype
        c = lambda v: relax.const(v, dt)  # noqa: E731
        neg = relax.op.multiply(c(scale * alpha),
                                relax.op.subtract(relax.op.exp(relax.op.multiply(x, c(input_scale))), c(1.0)))
        return imp.block_builder.emit(relax.op.where(relax.op.greater(x, c(0.0)), relax.op.multiply(x, c(scale)), neg))

    @staticmethod
    def upsample_nearest(node: fx.Node, imp) -> relax.Var:
        """``upsample_nearest{1,2,3}d.vec``: one ``take`` per resized axis with the source indices
        torch computes (``min(floor(i * scale), in - 1)`` in float32, ``scale = in / out``, or
        ``1 / scale_factor`` when one was given). The importer resized with half-pixel centres and
        rounding, wrong wherever ``out / in`` is not an integer (5 x 13 from 8 x 8)."""
        x = imp.env[node.args[0]]
        sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        factors = node.args[2] if len(node.args) > 2 else node.kwargs.get("scale_factors")
        spatial = list(x.ty.shape.values)[2:]
        if not all(isinstance(d, tvm.tirx.IntImm) for d in spatial):
            raise UnsupportedError(f"TVM backend: nearest upsampling at node {node.name!r} needs static "
                                   f"spatial sizes, got {x.ty}")
        bb = imp.block_builder
        for d, n_in in enumerate(int(v) for v in spatial):
            if sizes is not None:
                n_out, scale = int(sizes[d]), np.float32(n_in) / np.float32(int(sizes[d]))
            else:
                n_out, scale = int(np.floor(n_in * factors[d])), np.float32(1.0 / factors[d])
            src = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
            if n_out != n_in or (src != np.arange(n_in)).any():
                x = bb.emit(relax.op.take(x, relax.const(src, "int64"), axis=2 + d))
        return x

    @staticmethod
    def batch_stats_norm(node: fx.Node, imp) -> relax.Var:
        """``_native_batch_norm_legit.no_stats`` (``instance_norm`` decomposes to it, over a
        ``[1, N*C, ...]`` view): normalised with the input's own mean and biased variance over every
        axis but 1, then ``weight`` / ``bias``; returns ``(out, mean, rstd)`` as torch does. The
        importer's converter failed on it (``TypeError``)."""
        x, w, b = imp.env[node.args[0]], node.args[1], node.args[2]
        eps = node.args[5] if len(node.args) > 5 else node.kwargs.get("eps", 1e-5)
        bb, dt, nd = imp.block_builder, x.ty.dtype, x.ty.ndim
        axes = [0] + list(range(2, nd))
        mean = bb.emit(relax.op.mean(x, axes, keepdims=True))
        var = bb.emit(relax.op.variance(x, axes, keepdims=True))
        rstd = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(eps, dt))))
        out = bb.emit(relax.op.multiply(relax.op.subtract(x, mean), rstd))
        channel = [1, -1] + [1] * (nd - 2)
        if isinstance(w, fx.Node):
            out = bb.emit(relax.op.multiply(out, relax.op.reshape(imp.env[w], channel)))
        if isinstance(b, fx.Node):
            out = bb.emit(relax.op.add(out, relax.op.reshape(imp.env[b], channel)))
        flat = [x.ty.shape.values[1]]
        return bb.emit(relax.Tuple([out, relax.op.reshape(mean, flat), relax.op.reshape(rstd, flat)]))

    @staticmethod
    def shift(node: fx.Node, imp) -> relax.Var:
        """``<<`` / ``>>`` on integers (the importer had no converter): Relax ``left_shift`` /
        ``right_shift`` (arithmetic on signed types, as torch)."""
        dtype = _result_dtype(node, (0, 1))
        if dtype is None or dtype.is_floating_point or dtype == torch.bool:
            raise UnsupportedError(f"TVM backend: shift at node {node.name!r} on {dtype}")
        a, b = (_operand(imp, arg, dtype) for arg in node.args[:2])
        left = "lshift" in _op(node) or "left" in _op(node)
        return imp.block_builder.emit((relax.op.left_shift if left else relax.op.right_shift)(a, b))

    @staticmethod
    def fminmax(node: fx.Node, imp) -> relax.Var:
        """``fmax`` / ``fmin``: ``maximum`` / ``minimum`` that return the other operand where one is NaN
        (the importer had no converter)."""
        dtype = _result_dtype(node, (0, 1))
        if dtype is None:
            raise UnsupportedError(f"TVM backend: {_op(node)} at node {node.name!r}")
        a, b = (_operand(imp, arg, dtype) for arg in node.args[:2])
        bb = imp.block_builder
        op = relax.op.maximum if _op(node) == "fmax.default" else relax.op.minimum
        out = bb.emit(op(a, b))
        if not dtype.is_floating_point:
            return out
        out = bb.emit(relax.op.where(relax.op.isnan(a), b, out))
        return bb.emit(relax.op.where(relax.op.isnan(b), a, out))

    @staticmethod
    def reduce(node: fx.Node, imp) -> relax.Var:
        """``amax`` / ``amin`` (``dim`` a list, empty: all) and ``prod.dim_int``: Relax ``max`` /
        ``min`` / ``prod`` (the importer had no converter; ``logsumexp`` decomposes to ``amax``)."""
        x = imp.env[node.args[0]]
        name = _op(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        axes = None if dims in (None, [], ()) else ([dims] if isinstance(dims, int) else list(dims))
        bb = imp.block_builder
        if name == "prod.dim_int":
            out_dtype = node.meta["val"].dtype
            x = _operand(imp, node.args[0], out_dtype)
            return bb.emit(relax.op.prod(x, axes, keep))
        op = relax.op.max if name == "amax.default" else relax.op.min
        return bb.emit(op(x, axes, keep))

    def convert_map(self) -> dict[str, Callable]:
        """Our converters, and the importer's for every other op, each behind :func:`_guarded`."""
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

        ours = self._converters()
        theirs = {key: self._deferred(key) for key in ExportedProgramImporter().create_convert_map()}
        both = {**theirs, **ours}
        for key in _INT_DIVISIONS:
            if key in both:
                both[key] = self.int_division(both[key])
        for key, positions in _PROMOTED.items():
            if key in both:
                both[key] = _promoting(positions, both[key])
        return {key: _guarded(key, convert) for key, convert in both.items()}

    def mean(self, node: fx.Node, imp) -> relax.Var:
        """``aten.mean.dim`` over the trailing dims of a float32 tensor with static sizes there ->
        :func:`.kernels.mean_kernel` on ``[rows, S]``; any other mean goes to the importer."""
        x = imp.env[node.args[0]]
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        ty = x.ty
        if (node.kwargs.get("dtype") is not None or not isinstance(ty, relax.TensorType)
                or ty.dtype != "float32" or ty.ndim < 1 or not dims
                or not all(isinstance(d, int) for d in dims)):
            return self._default(imp, "mean.dim", node)
        nd = ty.ndim
        axes = sorted({d % nd for d in dims})
        shape = list(ty.shape.values)
        tail = shape[nd - len(axes):]
        if axes != list(range(nd - len(axes), nd)) or not all(isinstance(d, tvm.tirx.IntImm) for d in tail):
            return self._default(imp, "mean.dim", node)
        size = int(np.prod([int(d) for d in tail]))
        if size == 0:
            return self._default(imp, "mean.dim", node)
        bb = imp.block_builder
        lead = shape[: nd - len(axes)]
        rows = tvm.tirx.const(1, "int64")
        for d in lead:
            rows = rows * d
        x2 = bb.emit(relax.op.reshape(x, relax.ShapeExpr([rows, size])))
        gv = bb.add_func(kernels.mean_kernel(size, parallel=self.parallel), f"sc_mean_{size}")
        y = bb.emit(relax.call_tir(gv, [x2], relax.TensorType([rows], "float32")))
        self._count("mean")
        out = [*lead, *([1] * len(axes) if keepdim else [])]
        return bb.emit(relax.op.reshape(y, relax.ShapeExpr(out)))

    def _deferred(self, key: str) -> Callable:
        return lambda node, imp: self._default(imp, key, node)

    def _converters(self) -> dict[str, Callable]:
        return {
            "embedding.default": self.embedding,
            "index_select.default": self.index_select,
            "index.Tensor": self.index,
            "gather.default": self.gather,
            "index_put.default": self.index_put,
            "index_put_.default": self.index_put,
            "scatter.src": self.scatter,
            "scatter.value": self.scatter,
            "scatter_add.default": self.scatter,
            "scatter_reduce.two": self.scatter,
            "select.int": self.select,
            "div.Tensor_mode": self.div,
            "div.Scalar": self.div,
            "div.Scalar_mode": self.div,
            "elu.default": self.elu,
            "_native_batch_norm_legit.no_stats": self.batch_stats_norm,
            "__lshift__.Scalar": self.shift,
            "__lshift__.Tensor": self.shift,
            "__rshift__.Scalar": self.shift,
            "__rshift__.Tensor": self.shift,
            "bitwise_left_shift.Tensor": self.shift,
            "bitwise_right_shift.Tensor": self.shift,
            "fmax.default": self.fminmax,
            "fmin.default": self.fminmax,
            "mean.dim": self.mean,
            "amax.default": self.reduce,
            "amin.default": self.reduce,
            "prod.dim_int": self.reduce,
            "upsample_nearest1d.vec": self.upsample_nearest,
            "upsample_nearest2d.vec": self.upsample_nearest,
            "upsample_nearest3d.vec": self.upsample_nearest,
            "to.device": self.to_device,
            "bmm.default": self.bmm,
            "addmm.default": self.addmm,
            "mm.default": self.addmm,
            "linear.default": self.linear,
            "convolution.default": self.convolution,
            "native_group_norm.default": self.group_norm,
            "native_layer_norm.default": self.layer_norm,
            **{key: self.passthrough(key) for key in _FOLDABLE},
            "div.Tensor": self.passthrough("div.Tensor", self.div),
            "clamp.default": self.passthrough("clamp.default", self.clamp),
            "sparse_linear_bsr.default": self.sparse_bsr,
            "sparse_linear_csr.default": self.sparse_csr,
            "sparse_linear_nm.default": self.sparse_nm,
        }


# binary elementwise ops -> positions of their value operands, cast to torch's result dtype before the
# importer's converter runs (it made a Python scalar a constant of the tensor's dtype: ``i * 0.5`` on
# an integer tensor gave zeros, ``i < 3.5`` compared with 3)
_PROMOTED: dict[str, tuple[int, ...]] = {
    **{f"{op}.{v}": (0, 1) for op in ("add", "sub", "rsub", "mul", "remainder", "fmod", "lt", "le", "gt",
                                      "ge", "eq", "ne") for v in ("Tensor", "Scalar")},
    "pow.Tensor_Tensor": (0, 1), "pow.Tensor_Scalar": (0, 1), "pow.Scalar": (0, 1),
    "maximum.default": (0, 1), "minimum.default": (0, 1), "floor_divide.default": (0, 1),
    "atan2.default": (0, 1), "where.self": (1, 2),
}


# ops that divide integers (by a tensor: checked nonzero; see _Lowering.int_division)
_INT_DIVISIONS = ("div.Tensor", "div.Tensor_mode", "div.Scalar_mode", "floor_divide.default",
                  "remainder.Tensor", "remainder.Scalar", "fmod.Tensor", "fmod.Scalar")


def _meta_operand(arg):
    """A stand-in for ``torch.result_type``: a 0-d or 1-d empty tensor of a node's dtype (dimension
    category preserved), or the Python number itself; ``None`` when unknown."""
    if isinstance(arg, fx.Node):
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.empty((1,) * min(val.dim(), 1), dtype=val.dtype)
        for kind, stand_in in ((torch.SymBool, True), (torch.SymInt, 1), (torch.SymFloat, 1.0)):
            if isinstance(val, kind):
                return stand_in
        return None
    return arg if isinstance(arg, (bool, int, float)) else None


def _result_dtype(node: fx.Node, positions: tuple[int, ...]) -> torch.dtype | None:
    """torch's result dtype of ``node``'s operands at ``positions`` (``None``: unknown, or no tensor)."""
    ops = [_meta_operand(node.args[p]) if p < len(node.args) else None for p in positions]
    if any(o is None for o in ops) or not any(isinstance(o, torch.Tensor) for o in ops):
        return None
    out = ops[0]
    for o in ops[1:]:
        out = torch.empty((1,), dtype=torch.result_type(out, o))
    return out.dtype if isinstance(out, torch.Tensor) else None


def _relax_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _operand(imp, arg, dtype: torch.dtype) -> relax.Expr:
    """``arg`` (a node's tensor or a Python number) as a Relax value of ``dtype``."""
    rd = _relax_dtype(dtype)
    if isinstance(arg, fx.Node):
        e = imp.env[arg]
        return e if e.ty.dtype == rd else imp.block_builder.emit(relax.op.astype(e, rd))
    return relax.const(arg, rd)


def _promoting(positions: tuple[int, ...], convert: Callable) -> Callable:
    """``convert`` with the tensor operands at ``positions`` cast, for that call only, to torch's
    result dtype of the operands (the importer then builds its scalar constants in that dtype)."""

    def run(node: fx.Node, imp) -> relax.Var:
        dtype = _result_dtype(node, positions)
        cast = {}
        if dtype is not None:
            for p in positions:
                arg = node.args[p] if p < len(node.args) else None
                e = imp.env.get(arg) if isinstance(arg, fx.Node) else None
                if arg not in cast and isinstance(e, relax.Expr) and isinstance(e.ty, relax.TensorType):
                    cast[arg] = _operand(imp, arg, dtype)
        with _substituted(imp, cast):
            return convert(node, imp)

    return run


@contextlib.contextmanager
def _substituted(imp, values: dict):
    """The importer's values of the fx nodes in ``values`` replaced by them, for the ``with`` block
    only (a wrapped converter then reads the cast / checked operands)."""
    saved = {n: imp.env[n] for n in values}
    imp.env.update(values)
    try:
        yield
    finally:
        imp.env.update(saved)


def _guarded(key: str, convert: Callable) -> Callable:
    """``convert`` with any failure but our own ``UnsupportedError`` re-raised as one naming the node
    and op: the importer raised bare ``ValueError`` / ``TypeError`` / TVM errors with neither."""

    def run(node: fx.Node, imp) -> relax.Var:
        try:
            return convert(node, imp)
        except UnsupportedError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the node named, cause chained
            raise UnsupportedError(
                f"TVM backend: cannot convert node {node.name!r} ({key}): {type(err).__name__}: {err}"
            ) from err

    return run


# dtypes :meth:`_Lowering._checked_index` covers (a boolean index is a mask: the importer's)
_INDEXED_DATA = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64",
                 "bool")
_INDEX_DTYPES = ("int8", "uint8", "int16", "int32", "int64")
# torch's scatter reduction -> Relax scatter_elements reduction ("update": plain scatter;
# scatter_reduce with include_self=True only)
_SCATTER_REDUCTIONS = {"update": "update", "sum": "add", "prod": "mul", "amax": "max", "amin": "min"}


def _arange_along(bb, size, pos: int, rank: int) -> relax.Var:
    """``arange(size)`` (int64) shaped to run along axis ``pos`` of a rank-``rank`` broadcast."""
    idx = bb.emit(relax.op.arange(relax.prim_value(0), relax.prim_value(size), relax.prim_value(1), "int64"))
    return bb.emit(relax.op.reshape(idx, [1] * pos + [size] + [1] * (rank - pos - 1)))


def _flat_scatter(bb, x: relax.Expr, terms: list, shape: list, src: relax.Expr, reduction: str) -> relax.Var:
    """``x`` with ``src`` (broadcast to ``shape``) written at the positions whose coordinate along axis
    ``d`` of ``x`` is ``terms[d]`` (broadcastable to ``shape``), combined by ``reduction``: a 1-D
    ``scatter_elements`` on a flat view of ``x``. Relax ``scatter_elements`` misplaced writes for an
    index smaller than ``x`` on a middle axis, and ``index_put`` failed to legalize symbolic index
    shapes; a flat view has neither problem. The sizes of ``x`` after the first must be static."""
    xshape = list(x.ty.shape.values)
    pos = _flat_position(bb, terms, xshape)
    size = _prod(shape)
    pos = bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(pos, shape)), [size]))
    src = bb.emit(relax.op.reshape(bb.emit(relax.op.broadcast_to(src, shape)), [size]))
    flat = bb.emit(relax.op.scatter_elements(bb.emit(relax.op.reshape(x, [_prod(xshape)])), pos, src, axis=0,
                                             reduction=reduction))
    return bb.emit(relax.op.reshape(flat, xshape))


def _flat_position(bb, coords: list, sizes: list) -> relax.Var:
    """``sum(coords[d] * stride[d])``: the row-major position of coordinates (int64, broadcastable to
    each other) over dimensions of ``sizes`` (static except possibly the first)."""
    pos = None
    for coord, stride in zip(coords, _strides(sizes)):
        if stride != 1:
            coord = bb.emit(relax.op.multiply(coord, relax.const(stride, "int64")))
        pos = coord if pos is None else bb.emit(relax.op.add(pos, coord))
    return pos


def _strides(sizes: list) -> list[int]:
    """Row-major strides of an index over ``sizes`` (static except possibly the first)."""
    out, step = [], 1
    for size in reversed(sizes[1:]):
        out.append(step)
        step *= int(size)
    return [step] + out[::-1]


def _same_dim(a, b) -> bool:
    """Two shape dimensions known equal: the same static size, or the same symbol."""
    if isinstance(a, tvm.tirx.IntImm) and isinstance(b, tvm.tirx.IntImm):
        return int(a) == int(b)
    return a.same_as(b)


def _broadcast_dims(shapes: list[list]) -> list | None:
    """Broadcast of shape dimension lists as torch broadcasts; ``None`` where a symbolic dimension
    meets anything but 1 or the same symbol."""
    rank = max(len(s) for s in shapes)
    out = []
    for pos in range(rank):
        dims = [s[pos - rank + len(s)] for s in shapes if pos - rank + len(s) >= 0]
        static = {int(d) for d in dims if isinstance(d, tvm.tirx.IntImm)} - {1}
        symbolic = [d for d in dims if not isinstance(d, tvm.tirx.IntImm)]
        if symbolic:
            if static or any(not d.same_as(symbolic[0]) for d in symbolic):
                return None
            out.append(symbolic[0])
        elif len(static) > 1:
            return None
        else:
            out.append(tvm.tirx.IntImm("int64", static.pop() if static else 1))
    return out


def _prod(dims: list):
    """Product of shape dimensions: a Python int when all are static, else a ``PrimExpr``."""
    static, symbolic = 1, []
    for d in dims:
        if isinstance(d, tvm.tirx.IntImm):
            static *= int(d.value)
        else:
            symbolic.append(d)
    out = tvm.tirx.IntImm("int64", static)
    for d in symbolic:
        out = out * d
    return out


# ops that can be folded into a convolution / group norm (BatchNorm, activations): their converters
# return the kernel's output for folded nodes and defer to the importer otherwise
_FOLDABLE = ("_native_batch_norm_legit_no_training.default", "getitem", "relu.default",
             "add.Tensor", "clamp.default", "mul.Tensor", "div.Tensor")


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _is_number(value, expected: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == expected


def _is_div6(node: fx.Node, numerator: fx.Node) -> bool:
    return (_op(node) == "div.Tensor" and len(node.args) == 2 and node.args[0] is numerator
            and _is_number(node.args[1], 6) and not node.kwargs)


def _relu6_plus_3(x: fx.Node) -> tuple[list, fx.Node] | None:
    """``(nodes, last)`` of the chain ``clamp(x + 3, 0, 6)`` (one ``add`` then one or two ``clamp``),
    as torch decomposes ``hardswish`` / ``hardsigmoid``; ``None`` if ``x`` has no such consumer."""
    adds = [u for u in x.users if _op(u) == "add.Tensor" and len(u.args) == 2 and u.args[0] is x
            and _is_number(u.args[1], 3) and not u.kwargs]
    if len(adds) != 1:
        return None
    chain, cur, lo, hi = [adds[0]], adds[0], None, None
    while len(cur.users) == 1 and _op(next(iter(cur.users))) == "clamp.default":
        clamp = next(iter(cur.users))
        args = list(clamp.args) + [None] * (3 - len(clamp.args))
        if clamp.args[0] is not cur or clamp.kwargs:
            break
        if args[1] is not None:
            lo = args[1] if lo is None else max(lo, args[1])
        if args[2] is not None:
            hi = args[2] if hi is None else min(hi, args[2])
        chain.append(clamp)
        cur = clamp
    if len(chain) < 2 or not _is_number(lo, 0) or not _is_number(hi, 6):
        return None
    return chain, cur


class _ConvSpec(NamedTuple):
    """Static description of an ``aten.convolution`` our kernels can take."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    in_channels: int
    out_channels: int
    in_spatial: tuple
    out_spatial: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    transposed: bool

    @property
    def depthwise(self) -> bool:
        """One input channel per group (``groups == in_channels``): :func:`.kernels.depthwise_conv_kernel`."""
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def pointwise(self) -> bool:
        """1x1(x1), stride 1, no padding, one group: a matrix product per image."""
        return (self.groups == 1 and all(k == 1 for k in self.kernel)
                and all(s == 1 for s in self.stride) and not any(self.padding))


def _ints(value, d: int) -> tuple | None:
    if isinstance(value, int):
        return (value,) * d
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value) * d if len(value) == 1 else tuple(value)
    return None


def _to3(t: tuple, fill: int) -> tuple:
    """Pad a 1-3 element spatial tuple on the left to 3 (D, H, W) with ``fill``."""
    return (fill,) * (3 - len(t)) + tuple(t)


def _padded_bias(b: torch.Tensor | None, padded: int) -> np.ndarray:
    out = np.zeros(padded, np.float32)
    if b is not None:
        out[: b.numel()] = b.detach().float().numpy()
    return out


def _conv_spec(node: fx.Node, x: relax.Expr, w: torch.Tensor | None, b) -> _ConvSpec | None:
    """The convolution's static parameters, or ``None`` when our kernels do not apply.

    Needs fp32, a constant weight and bias (or none), static channel/spatial dims, 1-3 spatial dims,
    and: forward -- groups either 1 or with ``OC/groups`` a multiple of 4 (vector blocks inside a
    group); transposed -- ``kernel == stride``, no padding / output padding, dilation 1, one group.
    Grouped convs with ``OC/groups`` not a multiple of 4 are taken only when depthwise.
    """
    if w is None or b is False or w.dtype != torch.float32 or not isinstance(x, relax.Expr):
        return None
    ty = x.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != "float32" or ty.ndim not in (3, 4, 5):
        return None
    dims = ty.shape.values[1:]
    if not all(isinstance(v, tvm.tirx.IntImm) for v in dims):
        return None
    d = ty.ndim - 2
    args = list(node.args) + [None] * (9 - len(node.args))
    stride, padding, dilation = _ints(args[3], d), _ints(args[4], d), _ints(args[5], d)
    transposed = bool(args[6])
    out_pad = _ints(args[7] if args[7] is not None else 0, d)
    groups = args[8] if isinstance(args[8], int) else (1 if args[8] is None else None)
    if None in (stride, padding, dilation, out_pad, groups) or w.dim() != d + 2:
        return None
    ic = int(dims[0])
    spatial = tuple(int(v) for v in dims[1:])
    kernel = tuple(int(k) for k in w.shape[2:])
    if transposed:
        oc = int(w.shape[1]) * groups
        if (groups != 1 or kernel != stride or any(padding) or any(out_pad)
                or any(v != 1 for v in dilation) or int(w.shape[0]) != ic):
            return None
        out = tuple(s * k for s, k in zip(spatial, kernel))
    else:
        oc = int(w.shape[0])
        if ic % groups or oc % groups or int(w.shape[1]) != ic // groups:
            return None
        if groups > 1 and (oc // groups) % 4 and ic != groups:
            return None  # neither vector blocks inside a group nor depthwise
        out = tuple(kernels.conv_out_size(s + 2 * p, k, st, dl)
                    for s, p, k, st, dl in zip(spatial, padding, kernel, stride, dilation))
        if min(out) < 1:
            return None
    if b is not None and tuple(b.shape) != (oc,):
        return None
    return _ConvSpec(w.detach(), None if b is None else b.detach().float(), ic, oc, spatial, out,
                     kernel, stride, padding, dilation, groups, transposed)


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
    from .calibrate import plan_for

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
