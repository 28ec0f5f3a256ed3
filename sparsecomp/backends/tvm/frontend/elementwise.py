"""Converters of elementwise ops and reductions the importer got wrong (dtype promotion, integer division, ...)."""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import numpy as np
import torch
from torch import fx

import tvm
from tvm import relax

from ....errors import UnsupportedError
from .. import kernels
from .common import _op, _prod


class ElementwiseConverters:
    """Elementwise ops and reductions (a mixin of ``_Lowering``)."""

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

    @staticmethod
    def to_device(node: fx.Node, imp) -> relax.Var:
        """``aten.to.device`` (left by un-decomposed graphs): CPU only, so at most a dtype cast."""
        x = imp.env[node.args[0]]
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if dtype is None:
            return x
        target = imp._convert_data_type(dtype)
        return x if target == x.ty.dtype else imp.block_builder.emit(relax.op.astype(x, target))

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
