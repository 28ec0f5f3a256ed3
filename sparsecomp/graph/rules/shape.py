"""Rules of views and layout (view / reshape / flatten / permute / expand / repeat) and of ops without tensors."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..context import Dims, PropagationContext, RewriteContext
from ..registry import OpRegistry, OpRule
from .common import _arg, _rewrite_shape_arg, _set_arg, broadcast, reshape_labels

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


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
    RULES.add(_op, OpRule(_no_tensor))
RULES.add(aten._assert_tensor_metadata.default, OpRule(_no_tensor, _drop_metadata_assert))
