"""Rules of convolutions (grouped, transposed) and of pooling / resize / padding (spatial dims fixed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..context import Dims, Multi, PropagationContext, RewriteContext
from ..registry import OpRegistry
from .common import _arg, _ndim, _set_arg

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


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
