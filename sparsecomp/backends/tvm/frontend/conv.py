"""Converters of convolutions (BatchNorm folded, activations and skip adds fused) and of group / layer norm."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import fx

import tvm
from tvm import relax

from .. import kernels
from .common import _op


class ConvConverters:
    """Convolutions and norms -> the conv / pointwise / depthwise / norm kernels (a mixin of ``_Lowering``)."""

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


# ops that can be folded into a convolution / group norm (BatchNorm, activations): their converters
# return the kernel's output for folded nodes and defer to the importer otherwise
_FOLDABLE = ("_native_batch_norm_legit_no_training.default", "getitem", "relu.default",
             "add.Tensor", "clamp.default", "mul.Tensor", "div.Tensor")


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
