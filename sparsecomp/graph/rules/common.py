"""Helpers shared by the op rules: argument access, broadcasting, reshape blocks, shape-argument rewrites."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ...capture.export import is_symbolic
from ..context import Dims, PropagationContext, RewriteContext

aten = torch.ops.aten


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
