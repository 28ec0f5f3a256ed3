"""``_Lowering``: the converters bound to one exported program, and the convert map handed to the importer."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import fx

import tvm
from tvm import relax

from ....errors import UnsupportedError
from .. import kernels

from .common import _constants
from .conv import _FOLDABLE, ConvConverters
from .elementwise import _INT_DIVISIONS, _PROMOTED, ElementwiseConverters, _promoting
from .index import IndexConverters
from .linear import LinearConverters


class _Lowering(LinearConverters, ConvConverters, IndexConverters, ElementwiseConverters):
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

    def _default(self, imp, key: str, node: fx.Node) -> relax.Var:
        """``node`` converted by the importer's own converter for ``key``."""
        if self._defaults is None:
            self._defaults = imp.create_convert_map()
        return self._defaults[key](node)

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
