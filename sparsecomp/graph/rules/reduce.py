"""Rules of reductions: reduced dims are fixed, the others pass through."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..context import Dims, Multi, PropagationContext
from ..registry import OpRegistry
from .common import _arg

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


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
