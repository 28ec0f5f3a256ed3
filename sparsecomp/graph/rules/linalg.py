"""Rules of linear algebra: linear, matmul / bmm, addmm, einsum, scaled dot-product attention."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from ..context import Dims, PropagationContext, RewriteContext
from ..registry import OpRegistry
from .common import _arg, _set_arg

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


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
