"""Rules of normalisation: batch norm, layer norm / RMSNorm, group norm (whole groups only)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..context import Dims, Multi, PropagationContext, RewriteContext
from ..registry import OpRegistry
from .common import _arg, _set_arg

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


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
