"""Rules of embedding, concatenation / split and slicing / selection (index ranges mapped, rewrites fix indices)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ..context import Dims, Multi, PropagationContext, RewriteContext
from ..registry import OpRegistry
from .common import _arg

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


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
