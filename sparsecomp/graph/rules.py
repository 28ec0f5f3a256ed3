"""Default op rules: how each ATen op couples the dimensions of its inputs and output.

One small function per op family, keyed by ATen overload in ``DEFAULT_RULES``. See ``registry.py`` for the
contract. Helpers at the top implement the shared patterns (elementwise broadcasting, reshape blocks).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..capture.export import is_symbolic
from .context import Dims, Multi, PropagationContext, RewriteContext
from .registry import OpRegistry, OpRule

aten = torch.ops.aten
DEFAULT_RULES = OpRegistry()
register = DEFAULT_RULES.register


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _set_arg(node: fx.Node, i: int, name: str, value: Any) -> None:
    if len(node.args) > i:
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


# ----------------------------------------------------------------------------------------------- helpers
def broadcast(ctx: PropagationContext, node: fx.Node, inputs: list[Any]) -> Dims:
    """Elementwise coupling with numpy-style broadcasting; broadcast (size-1) labeled dims are fixed."""
    out_shape = ctx.shape(node)
    out: Dims = [None] * len(out_shape)
    tensors = [a for a in inputs if isinstance(a, fx.Node) and ctx.lab(a) is not None]
    for k in range(1, len(out_shape) + 1):
        acc: np.ndarray | None = None
        seen_unlabeled = False
        for t in tensors:
            shp = ctx.shape(t)
            if k > len(shp):
                continue
            lab = ctx.lab(t)[-k]
            if shp[-k] == out_shape[-k]:
                if lab is None:
                    seen_unlabeled = True
                    ctx.fix(acc)
                    acc = None
                elif seen_unlabeled:
                    ctx.fix(lab)
                elif acc is None:
                    acc = lab
                else:
                    ctx.atoms.union_arrays(acc, lab)
            else:  # broadcast along this dim
                ctx.fix(lab)
        out[-k] = acc
    return out


def _unary(node: fx.Node, ctx: PropagationContext) -> Dims:
    return list(ctx.lab(node.args[0]))


def _elementwise(node: fx.Node, ctx: PropagationContext) -> Dims:
    args = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    return broadcast(ctx, node, args)


def _reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal numel into minimal blocks of dims with equal products."""
    if 0 in a or 0 in b or math.prod(a) != math.prod(b):
        return None
    i = j = 0
    blocks = []
    while i < len(a) or j < len(b):
        si, sj = i, j
        pi = pj = 1
        if i < len(a):
            pi, i = a[i], i + 1
        if j < len(b):
            pj, j = b[j], j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(a):
                    return None
                pi, i = pi * a[i], i + 1
            else:
                if j >= len(b):
                    return None
                pj, j = pj * b[j], j + 1
        blocks.append((list(range(si, i)), list(range(sj, j))))
    return blocks


def _batch_major(src: fx.Node, node: fx.Node, ins: list[int], outs: list[int]) -> bool:
    """A block with symbolic sizes is label-safe when only its outermost dims are symbolic and they
    differ by a constant factor (``(B, 64) -> (B*4, 16)``): its inner structure is then the same for
    every batch size, so labels found at the example size hold for all."""
    import sympy

    a, b = src.meta["val"].shape, node.meta["val"].shape
    if any(is_symbolic(a[d]) for d in ins[1:]) or any(is_symbolic(b[d]) for d in outs[1:]):
        return False
    x, y = a[ins[0]], b[outs[0]]
    if not (is_symbolic(x) and is_symbolic(y)):
        return False
    ratio = sympy.simplify(y.node.expr / x.node.expr)
    return bool(ratio.is_Rational)


def reshape_labels(ctx: PropagationContext, src: fx.Node, node: fx.Node) -> Dims:
    """Labels through any reshape (view, reshape, flatten, unflatten) from example shapes."""
    in_lab = ctx.lab(src)
    a, b = ctx.shape(src), ctx.shape(node)
    out: Dims = [None] * len(b)
    blocks = _reshape_blocks(a, b)
    if blocks is None:
        ctx.fix_all(in_lab)
        return out
    sym_in, sym_out = ctx.symbolic_dims(src), ctx.symbolic_dims(node)
    for ins, outs in blocks:
        labeled = [d for d in ins if in_lab[d] is not None]
        if not labeled:
            continue
        if (any(sym_in[d] for d in ins) or any(sym_out[d] for d in outs)) and not _batch_major(src, node, ins, outs):
            for d in labeled:
                ctx.fix(in_lab[d])
            continue
        if len(ins) == 1 and len(outs) == 1:
            out[outs[0]] = in_lab[ins[0]]
            continue
        # flat labels of the block, row-major
        if len(ins) == 1:
            flat = in_lab[ins[0]]
        elif len(labeled) == 1:
            d = labeled[0]
            inner = math.prod(a[x] for x in ins if x > d)
            flat = np.repeat(np.tile(in_lab[d], math.prod(a[x] for x in ins if x < d)), inner)
        else:
            grids = np.meshgrid(*[np.arange(a[d]) for d in ins], indexing="ij")
            parts = [
                (in_lab[d][g.ravel()] if in_lab[d] is not None else ctx.fixed(g.size)) for d, g in zip(ins, grids)
            ]
            flat = ctx.compound(*parts)
        if len(outs) == 1:
            out[outs[0]] = flat
            continue
        new = [ctx.fresh(b[d]) if b[d] > 1 else ctx.fixed(1) for d in outs]
        grids = np.meshgrid(*[np.arange(b[d]) for d in outs], indexing="ij")
        target = ctx.compound(*[n[g.ravel()] for n, g in zip(new, grids)])
        ctx.atoms.union_arrays(flat, target)
        for d, n in zip(outs, new):
            out[d] = n if b[d] > 1 else None
    return out


def _rewrite_shape_arg(index: int, name: str):
    def rewrite(node: fx.Node, rw: RewriteContext) -> None:
        old = _arg(node, index, name)
        if isinstance(old, (list, tuple)):
            _set_arg(node, index, name, rw.new_shape(node, list(old)))

    return rewrite


# ----------------------------------------------------------------------------------------------- elementwise
UNARY = [
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "erf", "sin", "cos",
    "square", "reciprocal", "clone", "contiguous", "detach", "alias", "dropout", "relu6", "log_sigmoid",
    "logical_not", "bitwise_not", "sign", "floor", "ceil", "round", "clamp", "clamp_min", "clamp_max", "pow",
    "to", "_to_copy", "type_as", "lift_fresh_copy", "gelu_", "silu_", "hardswish_", "hardtanh_", "dropout_",
    "leaky_relu_", "feature_dropout", "alpha_dropout", "exp2", "expm1", "log1p", "tan", "atan", "isnan",
]
BINARY = [
    "add", "sub", "mul", "div", "rsub", "maximum", "minimum", "where", "masked_fill", "eq", "ne", "lt", "le", "gt",
    "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "__and__", "__or__", "pow", "fmod",
    "remainder", "floor_divide", "add_", "mul_", "div_", "sub_", "masked_fill_", "copysign", "atan2", "lerp",
    "addcmul", "addcdiv",
]


def _overloads(names: list[str]):
    out = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            out.append(getattr(packet, ov))
    return out


for _op in dict.fromkeys(_overloads(UNARY) + _overloads(BINARY)):
    DEFAULT_RULES.add(_op, OpRule(_elementwise))


@register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    dim = node.args[1] % len(lab)
    ctx.fix(lab[dim])  # softmax mixes along its dim: removing an entry is not zeroing it
    lab[dim] = None
    return lab


# ----------------------------------------------------------------------------------------------- reductions
def _reduce(node: fx.Node, ctx: PropagationContext, dims: Any, keepdim: bool) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    n = len(lab)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(n))
    if isinstance(dims, int):
        dims = [dims]
    dims = {d % n for d in dims} if n else set()
    out: Dims = []
    for d in range(n):
        if d in dims:
            ctx.fix(lab[d])  # sum/mean/max over a dim mix its entries
            if keepdim:
                out.append(None)
        else:
            out.append(lab[d])
    return out


@register(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
          aten.std.correction, aten.linalg_vector_norm.default, aten.prod.dim_int, aten.any.dim, aten.all.dim,
          aten.logsumexp.default, aten.var.dim, aten.std.dim)
def _reduce_dims(node: fx.Node, ctx: PropagationContext) -> Dims:
    op = node.target
    if op is aten.linalg_vector_norm.default:
        dims, keep = _arg(node, 2, "dim"), _arg(node, 3, "keepdim", False)
    elif op in (aten.var.correction, aten.std.correction):
        dims, keep = _arg(node, 1, "dim"), node.kwargs.get("keepdim", False)
    else:
        dims, keep = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
    return _reduce(node, ctx, dims, keep)


@register(aten.mean.default, aten.sum.default, aten.max.default,
          aten.min.default, aten.prod.default, aten.any.default, aten.all.default)
def _reduce_all(node: fx.Node, ctx: PropagationContext) -> Dims:
    _reduce(node, ctx, None, False)
    return []


@register(aten.max.dim, aten.min.dim, aten.sort.default, aten.topk.default, aten.argmax.default,
          aten.argmin.default, aten.cumsum.default, aten.cumprod.default)
def _reduce_indexed(node: fx.Node, ctx: PropagationContext) -> Any:
    lab = list(ctx.lab(node.args[0]))
    dim = _arg(node, 1, "dim")
    if node.target is aten.topk.default:
        dim = _arg(node, 2, "dim", -1)
    if dim is None:
        ctx.fix_all(lab)
        return ctx.unlabeled(node)
    dim %= max(len(lab), 1)
    ctx.fix(lab[dim])
    val = node.meta["val"]
    if isinstance(val, (tuple, list)):
        outs = []
        for v in val:
            outs.append([(lab[d] if d != dim else None) for d in range(len(lab))] if v.dim() == len(lab)
                        else [lab[d] for d in range(len(lab)) if d != dim])
        return Multi(outs)
    if val.dim() == len(lab):
        return [(lab[d] if d != dim else None) for d in range(len(lab))]
    return [lab[d] for d in range(len(lab)) if d != dim]


# ----------------------------------------------------------------------------------------------- linear algebra
@register(aten.linear.default)
def _linear(node: fx.Node, ctx: PropagationContext) -> Dims:
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    xl = list(ctx.lab(x))
    wl = ctx.lab(w)
    ctx.unify(xl[-1], wl[1])
    ctx.consumer(node, x, len(xl) - 1, w, 1)
    out_lab = wl[0]
    if isinstance(b, fx.Node):
        out_lab = ctx.unify(out_lab, ctx.lab(b)[0])
    return xl[:-1] + [out_lab]


def _matmul_like(ctx: PropagationContext, node: fx.Node, a: fx.Node, b: fx.Node) -> Dims:
    al, bl = list(ctx.lab(a)), list(ctx.lab(b))
    if len(al) == 1:
        al = [None] + al
        squeeze_a = True
    else:
        squeeze_a = False
    squeeze_b = len(bl) == 1
    if squeeze_b:
        bl = bl + [None]
    ctx.unify(al[-1], bl[-2])
    if ctx.param_target(b) is not None:
        ctx.consumer(node, a, len(ctx.lab(a)) - 1, b, len(bl) - 2)
    # batch dims broadcast
    ash, bsh = ctx.shape(a), ctx.shape(b)
    abatch, bbatch = al[:-2], bl[:-2]
    ashb = ash[:-2] if len(ash) > 2 else ()
    bshb = bsh[:-2] if len(bsh) > 2 else ()
    n = max(len(abatch), len(bbatch))
    batch: Dims = [None] * n
    for k in range(1, n + 1):
        la = abatch[-k] if k <= len(abatch) else None
        lb = bbatch[-k] if k <= len(bbatch) else None
        sa = ashb[-k] if k <= len(ashb) else 1
        sb = bshb[-k] if k <= len(bshb) else 1
        if k <= len(abatch) and k <= len(bbatch) and sa == sb:
            batch[-k] = ctx.unify(la, lb)
        else:
            if sa == 1 and k <= len(abatch):
                ctx.fix(la)
            if sb == 1 and k <= len(bbatch):
                ctx.fix(lb)
            batch[-k] = la if sa != 1 else lb if sb != 1 else None
    out = batch + ([] if squeeze_a else [al[-2]]) + ([] if squeeze_b else [bl[-1]])
    return out


@register(aten.matmul.default, aten.mm.default, aten.bmm.default)
def _matmul(node: fx.Node, ctx: PropagationContext) -> Dims:
    return _matmul_like(ctx, node, node.args[0], node.args[1])


@register(aten.addmm.default, aten.baddbmm.default)
def _addmm(node: fx.Node, ctx: PropagationContext) -> Dims:
    out = _matmul_like(ctx, node, node.args[1], node.args[2])
    # couple the added term by broadcasting against the product
    bias = node.args[0]
    bl, bsh, osh = ctx.lab(bias), ctx.shape(bias), ctx.shape(node)
    for k in range(1, len(bl) + 1):
        if bsh[-k] == osh[-k]:
            out[-k] = ctx.unify(out[-k], bl[-k])
        else:
            ctx.fix(bl[-k])
    return out


@register(aten.einsum.default)
def _einsum(node: fx.Node, ctx: PropagationContext) -> Dims:
    eq, operands = node.args[0], node.args[1]
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        for o in operands:
            ctx.fix_all(ctx.lab(o))
        return ctx.unlabeled(node)
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    letters: dict[str, np.ndarray | None] = {}
    unlabeled_letters: set[str] = set()
    sizes: dict[str, int] = {}
    for term, op in zip(terms, operands):
        lab, shp = ctx.lab(op), ctx.shape(op)
        for ch, l, s in zip(term, lab, shp):
            if ch in sizes and sizes[ch] != s:  # broadcasting size-1
                ctx.fix(l)
                continue
            sizes[ch] = s
            if l is None:
                unlabeled_letters.add(ch)
                ctx.fix(letters.get(ch))
                letters[ch] = None
            elif ch in unlabeled_letters:
                ctx.fix(l)
            elif letters.get(ch) is None:
                letters[ch] = l
            else:
                ctx.atoms.union_arrays(letters[ch], l)
    return [letters.get(ch) for ch in rhs]


# ----------------------------------------------------------------------------------------------- convolution
def _conv_common(ctx: PropagationContext, node: fx.Node, x: fx.Node, w: fx.Node, b: Any, groups: int,
                 transposed: bool) -> Dims:
    xl = list(ctx.lab(x))
    batched = len(xl) == _ndim(w)
    cdim = 1 if batched else 0
    cin = ctx.shape(x)[cdim]
    wshape = ctx.shape(w)
    cout = wshape[1] * groups if transposed else wshape[0]
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    for d in range(2, len(wshape)):
        ctx.fix_param_dim(w, d)
    for d in range(cdim + 1, len(xl)):
        ctx.fix(xl[d])  # spatial dims are never pruned
    if groups == 1:
        ctx.unify(xl[cdim], ctx.claim(w, in_dim))
        if not transposed:
            ctx.consumer(node, x, cdim, w, in_dim)
        out_lab = ctx.claim(w, out_dim)
    else:
        in_per, out_per = cin // groups, cout // groups
        g = ctx.fresh(groups)
        inner_in = ctx.fresh(in_per) if in_per > 1 else ctx.fixed(1)
        inner_out = ctx.fresh(out_per) if out_per > 1 else ctx.fixed(1)
        in_lab = ctx.compound(np.repeat(g, in_per), np.tile(inner_in, groups))
        out_lab = ctx.compound(np.repeat(g, out_per), np.tile(inner_out, groups))
        ctx.unify(xl[cdim], in_lab)
        if transposed:
            ctx.unify(ctx.claim(w, 0), in_lab)
            ctx.unify(ctx.claim(w, 1), inner_out)
        else:
            ctx.unify(ctx.claim(w, 0), out_lab)
            ctx.unify(ctx.claim(w, 1), inner_in)
        ctx.note(node, "groups", g)
        # the inside of a conv group is ordinary channels: removing inner index j removes it in every group
        # and the group count is kept, unless a group is a single channel (depthwise conv)
        ctx.hint_kind(inner_in, "channel")
        ctx.hint_kind(inner_out, "channel")
        ctx.hint_kind(g, "channel" if in_per == 1 else "inner")
    if isinstance(b, fx.Node):
        out_lab = ctx.unify(out_lab, ctx.lab(b)[0])
    out: Dims = [None] * _ndim(node)
    out[:cdim] = xl[:cdim]
    out[cdim] = out_lab
    return out


def _groups_rewrite(index: int, name: str):
    def rewrite(node: fx.Node, rw: RewriteContext) -> None:
        g = rw.note(node, "groups")
        if g is not None:
            _set_arg(node, index, name, rw.count(g, len(g)))

    return rewrite


@register(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
          aten.conv2d.padding, aten.conv3d.padding, rewrite=_groups_rewrite(6, "groups"))
def _conv(node: fx.Node, ctx: PropagationContext) -> Dims:
    return _conv_common(ctx, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1),
                        transposed=False)


@register(aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
          rewrite=_groups_rewrite(6, "groups"))
def _conv_transpose(node: fx.Node, ctx: PropagationContext) -> Dims:
    return _conv_common(ctx, node, node.args[0], node.args[1], _arg(node, 2, "bias"), _arg(node, 6, "groups", 1),
                        transposed=True)


@register(aten.convolution.default, rewrite=_groups_rewrite(8, "groups"))
def _convolution(node: fx.Node, ctx: PropagationContext) -> Dims:
    return _conv_common(ctx, node, node.args[0], node.args[1], node.args[2], node.args[8], transposed=node.args[6])


# ----------------------------------------------------------------------------------------------- normalisation
def _channel_params(ctx: PropagationContext, chan: np.ndarray | None, params: list[Any]) -> np.ndarray | None:
    for p in params:
        if isinstance(p, fx.Node):
            chan = ctx.unify(chan, ctx.lab(p)[0])
    return chan


@register(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
          aten._native_batch_norm_legit.default, aten.instance_norm.default)
def _batch_norm(node: fx.Node, ctx: PropagationContext) -> Any:
    xl = list(ctx.lab(node.args[0]))
    params = list(node.args[1:5])
    if node.target is aten._native_batch_norm_legit.default and not isinstance(node.args[3], fx.Node):
        params = params[:2]
    xl[1] = _channel_params(ctx, xl[1], params)
    if isinstance(node.meta["val"], (tuple, list)):
        return Multi([xl] + [[xl[1]] if isinstance(v, torch.Tensor) and v.dim() == 1 else ctx.unlabeled(node)[i + 1]
                             for i, v in enumerate(node.meta["val"][1:])])
    return xl


def _norm_last_dims(ctx: PropagationContext, node: fx.Node, normalized_shape: Any, params: list[Any]) -> Dims:
    xl = list(ctx.lab(node.args[0]))
    k = len(normalized_shape)
    exact = not ctx.options.get("prune_norm_dims", False)
    for i in range(k):
        d = len(xl) - k + i
        if exact:
            ctx.fix(xl[d])  # the norm's statistics mix these entries
            for p in params:
                if isinstance(p, fx.Node):
                    ctx.fix_param_dim(p, i)
            xl[d] = None
        else:
            for p in params:
                if isinstance(p, fx.Node):
                    xl[d] = ctx.unify(xl[d], ctx.claim(p, i))
    return xl


def _normalized_shape_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    shape = list(node.args[1])
    out = rw.out(node)
    out = out[0] if isinstance(out, Multi) else out
    _set_arg(node, 1, "normalized_shape", rw.new_shape(node, shape, out[len(out) - len(shape):]))


@register(aten.layer_norm.default, aten.native_layer_norm.default, rewrite=_normalized_shape_rewrite)
def _layer_norm(node: fx.Node, ctx: PropagationContext) -> Any:
    out = _norm_last_dims(ctx, node, node.args[1], [_arg(node, 2, "weight"), _arg(node, 3, "bias")])
    if isinstance(node.meta["val"], (tuple, list)):
        return Multi([out] + list(ctx.unlabeled(node))[1:])
    return out


@register(aten.rms_norm.default, rewrite=_normalized_shape_rewrite)
def _rms_norm(node: fx.Node, ctx: PropagationContext) -> Dims:
    return _norm_last_dims(ctx, node, node.args[1], [_arg(node, 2, "weight")])


def _group_norm_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    g = rw.note(node, "groups")
    if g is not None:
        _set_arg(node, 1, "num_groups", rw.count(g, len(g)))


@register(aten.group_norm.default, rewrite=_group_norm_rewrite)
def _group_norm(node: fx.Node, ctx: PropagationContext) -> Dims:
    x = node.args[0]
    xl = list(ctx.lab(x))
    groups = node.args[1]
    c = ctx.shape(x)[1]
    g = ctx.fresh(groups)
    # within a group the statistics mix channels: only whole groups are removable
    chan = np.repeat(g, c // groups)
    xl[1] = ctx.unify(xl[1], chan)
    xl[1] = _channel_params(ctx, xl[1] if xl[1] is not None else None, [_arg(node, 2, "weight"), _arg(node, 3, "bias")])
    for d in range(2, len(xl)):
        ctx.fix(xl[d])
        xl[d] = None
    ctx.note(node, "groups", g)
    return xl


# ----------------------------------------------------------------------------------------------- embedding
@register(aten.embedding.default)
def _embedding(node: fx.Node, ctx: PropagationContext) -> Dims:
    w, idx = node.args[0], node.args[1]
    if ctx.param_target(w) is not None:
        ctx.fix_param_dim(w, 0)  # rows are addressed by data
    wl = ctx.lab(w)
    ctx.fix(wl[0])
    ctx.fix_all(ctx.lab(idx))
    return [None] * ctx.lab(idx).__len__() + [wl[1]]


# ----------------------------------------------------------------------------------------------- attention
def _sdpa_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    q = node.args[0]
    ql = rw.lab(q)
    e = ql[-1]
    if e is not None and rw.count(e, len(e)) != len(e) and _arg(node, 6, "scale") is None:
        _set_arg(node, 6, "scale", 1.0 / math.sqrt(len(e)))  # keep the original scale


@register(aten.scaled_dot_product_attention.default, rewrite=_sdpa_rewrite)
def _sdpa(node: fx.Node, ctx: PropagationContext) -> Dims:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    gqa = _arg(node, 7, "enable_gqa", False)
    ql, kl, vl = list(ctx.lab(q)), list(ctx.lab(k)), list(ctx.lab(v))
    qs, ks = ctx.shape(q), ctx.shape(k)
    ctx.unify(ql[-1], kl[-1])          # contraction over head_dim
    ctx.unify(kl[-2], vl[-2])          # key/value sequence
    ctx.fix(kl[-2])
    ctx.fix(ql[-2])
    n = len(ql)
    for d in range(n - 2):
        if gqa and d == n - 3 and qs[d] != ks[d]:
            rep = qs[d] // ks[d]
            if kl[d] is not None or vl[d] is not None:
                kv = ctx.unify(kl[d], vl[d])
                if kv is not None:
                    ql[d] = ctx.unify(ql[d], np.repeat(kv, rep))
                else:
                    ctx.fix(ql[d])
                    ql[d] = None
            else:
                ctx.fix(ql[d])
                ql[d] = None
            continue
        ql[d] = ctx.unify(ctx.unify(ql[d], kl[d]) if ks[d] == qs[d] else ql[d], vl[d])
    if isinstance(mask, fx.Node):
        ml, ms = ctx.lab(mask), ctx.shape(mask)
        out_like = ql[:-1] + [kl[-2]]
        for k_ in range(1, len(ml) + 1):
            if ms[-k_] == 1 or k_ > len(out_like):
                ctx.fix(ml[-k_])
            elif k_ <= 2:
                ctx.fix(ml[-k_])
            else:
                out_like[-k_] = ctx.unify(out_like[-k_], ml[-k_])
                ql[len(ql) - k_] = out_like[-k_]
    return ql[:-1] + [vl[-1]]


# ----------------------------------------------------------------------------------------------- pooling, resize
@register(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
          aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
          aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool1d.default,
          aten.adaptive_max_pool2d.default, aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
          aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_nearest1d.vec,
          aten.upsample_nearest3d.vec, aten.upsample_linear1d.vec, aten.upsample_bicubic2d.vec,
          aten.upsample_trilinear3d.vec, aten._adaptive_avg_pool2d.default,
          aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad2d.default, aten.replication_pad2d.default)
def _spatial(node: fx.Node, ctx: PropagationContext) -> Any:
    xl = list(ctx.lab(node.args[0]))
    val = node.meta["val"]
    first = val[0] if isinstance(val, (tuple, list)) else val
    # spatial ops act on the trailing dims; which ones depends on the op's rank
    name = str(node.target)
    if "1d" in name:
        nsp = 1
    elif "3d" in name:
        nsp = 3
    elif "pad" in name and node.target in (aten.pad.default, aten.constant_pad_nd.default):
        nsp = len(node.args[1]) // 2
    else:
        nsp = 2
    keep = len(xl) - nsp
    out = list(xl[:keep]) + [None] * (first.dim() - keep)
    for d in range(keep, len(xl)):
        ctx.fix(xl[d])
    if isinstance(val, (tuple, list)):
        return Multi([out, list(out)])
    return out


# ----------------------------------------------------------------------------------------------- views and layout
@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, rewrite=_rewrite_shape_arg(1, "size"))
def _view(node: fx.Node, ctx: PropagationContext) -> Dims:
    return reshape_labels(ctx, node.args[0], node)


def _unflatten_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    dim, sizes = node.args[1], list(node.args[2])
    out = rw.out(node)
    dim %= len(out) - len(sizes) + 1
    _set_arg(node, 2, "sizes", rw.new_shape(node, sizes, out[dim:dim + len(sizes)]))


@register(aten.flatten.using_ints)
def _flatten(node: fx.Node, ctx: PropagationContext) -> Dims:
    return reshape_labels(ctx, node.args[0], node)


@register(aten.unflatten.int, rewrite=_unflatten_rewrite)
def _unflatten(node: fx.Node, ctx: PropagationContext) -> Dims:
    return reshape_labels(ctx, node.args[0], node)


@register(aten.permute.default)
def _permute(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = ctx.lab(node.args[0])
    return [lab[p % len(lab)] for p in node.args[1]]


@register(aten.transpose.int, aten.swapaxes.default)
def _transpose(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    if not lab:
        return lab
    a, b = node.args[1] % len(lab), node.args[2] % len(lab)
    lab[a], lab[b] = lab[b], lab[a]
    return lab


@register(aten.t.default, aten.numpy_T.default)
def _t(node: fx.Node, ctx: PropagationContext) -> Dims:
    return list(reversed(ctx.lab(node.args[0])))


@register(aten.unsqueeze.default)
def _unsqueeze(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    d = node.args[1] % (len(lab) + 1)
    return lab[:d] + [None] + lab[d:]


@register(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    shp = ctx.shape(node.args[0])
    if node.target is aten.squeeze.default:
        dims = [d for d, s in enumerate(shp) if s == 1]
    else:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        dims = [d % len(lab) for d in dims if shp[d % len(lab)] == 1]
    for d in dims:
        ctx.fix(lab[d])
    return [l for d, l in enumerate(lab) if d not in dims]


def _expand_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    sizes = list(node.args[1])
    _set_arg(node, 1, "size", rw.new_shape(node, sizes))


@register(aten.expand.default, rewrite=_expand_rewrite)
def _expand(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    ishape, oshape = ctx.shape(node.args[0]), ctx.shape(node)
    out: Dims = [None] * len(oshape)
    for k in range(1, len(lab) + 1):
        if ishape[-k] == oshape[-k]:
            out[-k] = lab[-k]
        else:
            ctx.fix(lab[-k])
    return out


@register(aten.expand_as.default)
def _expand_as(node: fx.Node, ctx: PropagationContext) -> Dims:
    return broadcast(ctx, node, [a for a in node.args if isinstance(a, fx.Node)])


def _repeat_interleave_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    if "output_size" in node.kwargs or len(node.args) > 3:
        out = rw.out(node)
        dim = _arg(node, 2, "dim")
        if dim is not None and out[dim] is not None:
            _set_arg(node, 3, "output_size", rw.count(out[dim], None))


@register(aten.repeat_interleave.self_int, rewrite=_repeat_interleave_rewrite)
def _repeat_interleave(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    reps, dim = node.args[1], _arg(node, 2, "dim")
    if dim is None:
        ctx.fix_all(lab)
        return [None]
    dim %= len(lab)
    if lab[dim] is not None:
        lab[dim] = np.repeat(lab[dim], reps)
    return lab


@register(aten.repeat.default)
def _repeat(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    reps = list(node.args[1])
    lead = len(reps) - len(lab)
    out: Dims = [None] * lead
    for d, l in enumerate(lab):
        out.append(np.tile(l, reps[lead + d]) if l is not None else None)
    return out


# ----------------------------------------------------------------------------------------------- concat and split
@register(aten.cat.default)
def _cat(node: fx.Node, ctx: PropagationContext) -> Dims:
    tensors = [t for t in node.args[0] if ctx.shape(t) != (0,)]
    dim = _arg(node, 1, "dim", 0)
    labs = [list(ctx.lab(t)) for t in tensors]
    n = len(labs[0])
    dim %= n
    out: Dims = [None] * n
    for d in range(n):
        if d == dim:
            continue
        acc = labs[0][d]
        for l in labs[1:]:
            acc = ctx.unify(acc, l[d])
        if acc is None:
            for l in labs:
                ctx.fix(l[d])
        out[d] = acc
    if any(l[dim] is not None for l in labs):
        out[dim] = np.concatenate([l[dim] if l[dim] is not None else ctx.fixed(ctx.shape(t)[dim])
                                   for l, t in zip(labs, tensors)])
    return out


@register(aten.stack.default)
def _stack(node: fx.Node, ctx: PropagationContext) -> Dims:
    labs = [list(ctx.lab(t)) for t in node.args[0]]
    dim = _arg(node, 1, "dim", 0) % (len(labs[0]) + 1)
    out: Dims = []
    for d in range(len(labs[0])):
        acc = labs[0][d]
        for l in labs[1:]:
            acc = ctx.unify(acc, l[d])
        out.append(acc)
    return out[:dim] + [None] + out[dim:]


def _split_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    sizes = rw.note(node, "chunks")
    if sizes is None:
        return
    new = [rw.count(arr, len(arr)) if arr is not None else n for arr, n in sizes]
    if new == [n for _, n in sizes]:
        return
    dim = rw.note(node, "dim")
    node.target = aten.split_with_sizes.default
    node.args = (node.args[0], new, dim)
    node.kwargs = {}


@register(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
          aten.unsafe_split.Tensor, rewrite=_split_rewrite)
def _split(node: fx.Node, ctx: PropagationContext) -> Any:
    x = node.args[0]
    lab = list(ctx.lab(x))
    dim = _arg(node, 2, "dim", 0) % len(lab)
    outs = []
    chunks = []
    start = 0
    for v in node.meta["val"]:
        size = int(v.shape[dim])
        piece = lab[dim][start:start + size] if lab[dim] is not None else None
        o = list(lab)
        o[dim] = piece
        outs.append(o)
        chunks.append((piece, size))
        start += size
    ctx.note(node, "chunks", chunks)
    ctx.note(node, "dim", dim)
    return Multi(outs)


@register(aten.unbind.int)
def _unbind(node: fx.Node, ctx: PropagationContext) -> Any:
    lab = list(ctx.lab(node.args[0]))
    dim = _arg(node, 1, "dim", 0) % len(lab)
    ctx.fix(lab[dim])
    rest = lab[:dim] + lab[dim + 1:]
    return Multi([list(rest) for _ in node.meta["val"]])


def _slice_bounds(size: int, start: Any, end: Any) -> tuple[int, int]:
    start = 0 if start is None else start
    end = size if end is None or end > size else end
    if start < 0:
        start += size
    if end < 0:
        end += size
    return max(0, min(start, size)), max(0, min(end, size))


def _indexed_dim(node: fx.Node, rw: RewriteContext, dim: int) -> tuple[int, np.ndarray] | None:
    """``(dim, keep mask)`` of the input dim an indexing op addresses, or ``None`` if it is not pruned."""
    lab = rw.lab(node.args[0])
    dim %= len(lab)
    return None if lab[dim] is None else (dim, rw.keep_mask(lab[dim]))


def _slice_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    found = _indexed_dim(node, rw, _arg(node, 1, "dim", 0))
    if found is None:
        return
    dim, keep = found
    start, end = _arg(node, 2, "start"), _arg(node, 3, "end")
    if keep.all() or not all(isinstance(v, (int, type(None))) for v in (start, end)):
        return  # nothing removed here (propagation fixes dims sliced by symbolic bounds)
    start, end = _slice_bounds(len(keep), start, end)
    new_start = int(keep[:start].sum())
    new_end = new_start + int(keep[start:end].sum())
    args = list(node.args) + [None] * (5 - len(node.args))
    args[1], args[2], args[3] = dim, new_start, new_end
    args[4] = args[4] if args[4] is not None else 1
    node.args = tuple(args)
    node.kwargs = {}


@register(aten.slice.Tensor, rewrite=_slice_rewrite)
def _slice(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    dim = _arg(node, 1, "dim", 0) % len(lab)
    step = _arg(node, 4, "step", 1)
    if lab[dim] is None:
        return lab
    start, end = _arg(node, 2, "start"), _arg(node, 3, "end")
    if not all(isinstance(v, (int, type(None))) for v in (start, end)) or step != 1:
        ctx.fix(lab[dim])
        lab[dim] = None
        return lab
    s, e = _slice_bounds(len(lab[dim]), start, end)
    lab[dim] = lab[dim][s:e]
    return lab


def _narrow_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    found = _indexed_dim(node, rw, node.args[1])
    if found is None:
        return
    dim, keep = found
    start, length = node.args[2], node.args[3]
    if keep.all() or not (isinstance(start, int) and isinstance(length, int)):
        return  # nothing removed here (propagation fixes dims narrowed by symbolic bounds)
    node.args = (node.args[0], dim, int(keep[:start].sum()), int(keep[start:start + length].sum()))


@register(aten.narrow.default, rewrite=_narrow_rewrite)
def _narrow(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    dim = node.args[1] % len(lab)
    start, length = node.args[2], node.args[3]
    if lab[dim] is not None:
        if isinstance(start, int) and isinstance(length, int):
            lab[dim] = lab[dim][start:start + length]
        else:
            ctx.fix(lab[dim])
            lab[dim] = None
    return lab


def _select_rewrite(node: fx.Node, rw: RewriteContext) -> None:
    found = _indexed_dim(node, rw, node.args[1])
    if found is None:
        return
    dim, keep = found
    if keep.all() or not isinstance(node.args[2], int):
        return
    idx = node.args[2] % len(keep)
    node.args = (node.args[0], dim, int(keep[:idx].sum()))


@register(aten.select.int, rewrite=_select_rewrite)
def _select(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    dim = node.args[1] % len(lab)
    if lab[dim] is not None:
        idx = node.args[2]
        if isinstance(idx, int):
            ctx.fix(lab[dim][idx:idx + 1] if idx >= 0 else lab[dim][idx:][:1])
        else:
            ctx.fix(lab[dim])
    return lab[:dim] + lab[dim + 1:]


# ----------------------------------------------------------------------------------------------- no-ops
def _no_tensor(node: fx.Node, ctx: PropagationContext) -> Any:
    return None


def _drop_metadata_assert(node: fx.Node, rw: RewriteContext) -> None:
    """Size/stride assertions recorded at capture are stale after pruning; the re-export re-checks shapes."""
    if _arg(node, 1, "size") is not None or _arg(node, 2, "stride") is not None:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("size", "stride")}
        node.args = node.args[:1]


for _op in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default, aten._assert_async.msg):
    DEFAULT_RULES.add(_op, OpRule(_no_tensor))
DEFAULT_RULES.add(aten._assert_tensor_metadata.default, OpRule(_no_tensor, _drop_metadata_assert))
