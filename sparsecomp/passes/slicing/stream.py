"""Find a transformer's residual stream in an ATen graph and put the graph in rotation-ready form.

Runs on the unlifted graph of ``capture``; the slicing pass (``passes/slicing/slice.py``) calls
``prepare`` first, then builds the dependency graph of the prepared graph. Everything here is derived
from ATen ops, never from module or parameter names:

* **norms on the stream**: ``aten.layer_norm`` over the last dim, and the decomposed RMSNorm
  ``x * rsqrt(mean(x ** 2, -1, keepdim) + eps) [* w]`` that Hugging Face's ``LlamaRMSNorm`` and hand-written
  RMSNorms export as (dtype casts in between are allowed);
* **residual adds**: ``add(r, f)`` where ``r`` is read by a stream norm.

``prepare`` rewrites the graph without changing its function:

1. every stream norm becomes a weightless ``aten.rms_norm``; its scale (and a LayerNorm's shift) is folded
   into the linears that read it (``W diag(g)``, ``b + W beta``). A LayerNorm's mean subtraction is
   folded later, into the writers of its stream segment (``Prepared.centered``);
2. the residual operand of every residual add goes through a new identity linear (the skip matrix), so
   that each stretch of the stream between two adds (a *segment*) is its own dependency-graph group and
   can have its own basis;
3. a graph output that is a stream value gets an identity linear in front (the basis is undone there);
4. a parameter shared by an embedding and another op (tied input/output embeddings) is untied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ...errors import PassError
from ...graph.attrs import get_attr, owner_of, replace_tensor

aten = torch.ops.aten
PASS = "Slice"

#: ops that only change dtype/aliasing (allowed inside a norm pattern and between a norm and its readers)
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device, aten.alias.default,
         aten.clone.default, aten.contiguous.default, aten.detach.default, aten.dropout.default}
#: users that only check a value (no output): ignored wherever they read the stream
CHECKS = {aten._assert_tensor_metadata.default}
#: ops that move rows around but leave the last dim (the hidden dim) alone
ROW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
           aten.permute.default, aten.select.int, aten.slice.Tensor, aten.unsqueeze.default,
           aten.squeeze.dim, aten.expand.default, aten.flatten.using_ints} | CASTS
#: readers whose weight can absorb a norm's scale: op -> (input arg, weight arg, weight's input dim)
READERS = {aten.linear.default: (0, 1, 1), aten.addmm.default: (1, 2, 0), aten.mm.default: (0, 1, 0)}
SKIP_PREFIX = "_slice_skip"
RESTORE_PREFIX = "_slice_restore"


@dataclasses.dataclass
class Norm:
    """One normalisation of the stream: ``out = core(x) * weight + bias`` over the last dim (size ``d``)."""

    kind: str  # "rms" or "layer"
    x: fx.Node
    out: fx.Node
    weight: fx.Node | None
    bias: fx.Node | None
    eps: float
    d: int
    nodes: list[fx.Node]


@dataclasses.dataclass
class Prepared:
    gm: fx.GraphModule
    d: int
    centered: set[str]  # rms_norm node names that replaced a LayerNorm (their segment must be zero-mean)
    skips: list[str]  # parameter targets of the skip matrices
    restores: list[str]  # parameter targets of the output restore matrices
    norm_kinds: dict[str, str]


def _val(n: Any) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _strip_casts(n: Any) -> Any:
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in CASTS:
        n = n.args[0]
    return n


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_param(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr"


def _scalar(n: Any) -> float | None:
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


# ----------------------------------------------------------------------------------------------- norms
def _match_rms(rsqrt: fx.Node) -> Norm | None:
    """``x * rsqrt(mean(x ** 2, [-1], keepdim=True) + eps)``, then optional casts and ``* w`` (either order)."""
    add = rsqrt.args[0]
    if not (isinstance(add, fx.Node) and add.target == aten.add.Tensor):
        return None
    mean, eps = add.args
    if _scalar(eps) is None and _scalar(mean) is not None:
        mean, eps = eps, mean
    if not (isinstance(mean, fx.Node) and mean.target == aten.mean.dim and _scalar(eps) is not None):
        return None
    dims, keep = _arg(mean, 1, "dim"), _arg(mean, 2, "keepdim", False)
    pw = mean.args[0]
    if not (isinstance(pw, fx.Node) and pw.target == aten.pow.Tensor_Scalar and pw.args[1] == 2 and keep):
        return None
    xv = _val(pw.args[0])
    if xv is None or list(dims) not in ([-1], [xv.dim() - 1]):
        return None
    x = _strip_casts(pw.args[0])
    muls = [u for u in rsqrt.users if u.target == aten.mul.Tensor
            and any(_strip_casts(a) is x for a in u.args if a is not rsqrt)]
    if len(muls) != 1 or len(rsqrt.users) != 1:
        return None
    out, nodes = muls[0], [pw, mean, add, rsqrt, muls[0]]
    weight = None
    while True:  # casts, then the scale
        users = [u for u in out.users if u.target not in CHECKS]
        if len(users) != 1:
            break
        u = users[0]
        if u.op == "call_function" and u.target in CASTS:
            out = u
            nodes.append(u)
            continue
        if weight is None and u.target == aten.mul.Tensor:
            other = u.args[1] if u.args[0] is out else u.args[0]
            ov = _val(other)
            if _is_param(other) and ov is not None and ov.dim() == 1 and ov.shape[0] == xv.shape[-1]:
                weight, out = other, u
                nodes.append(u)
                continue
        break
    return Norm("rms", x, out, weight, None, float(eps), int(xv.shape[-1]), nodes)


def find_norms(gm: fx.GraphModule) -> list[Norm]:
    """Every LayerNorm over the last dim and every decomposed RMSNorm, in graph order."""
    norms = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.layer_norm.default and len(n.args[1]) == 1:
            w, b = _arg(n, 2, "weight"), _arg(n, 3, "bias")
            norms.append(Norm("layer", n.args[0], n, w, b, float(_arg(n, 4, "eps", 1e-5)),
                              int(n.args[1][0]), [n]))
        elif n.target == aten.rms_norm.default and len(n.args[1]) == 1:
            w = _arg(n, 2, "weight")
            norms.append(Norm("rms", n.args[0], n, w, None, float(_arg(n, 3, "eps") or 1e-6),
                              int(n.args[1][0]), [n]))
        elif n.target == aten.rsqrt.default:
            m = _match_rms(n)
            if m is not None:
                norms.append(m)
    return norms


# ------------------------------------------------------------------------------------------ graph edits
def _new_param(gm: fx.GraphModule, prefix: str, value: torch.Tensor) -> str:
    i = 0
    while hasattr(gm, f"{prefix}{i}"):
        i += 1
    name = f"{prefix}{i}"
    gm.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
    return name


def _own_param(gm: fx.GraphModule, user: fx.Node, index: int) -> fx.Node:
    """The get_attr at ``user.args[index]``, cloned into a fresh parameter if any other node reads it."""
    p = user.args[index]
    if len(p.users) == 1:
        return p
    name = _new_param(gm, "_slice_untied", get_attr(gm, p.target))
    with gm.graph.inserting_before(user):
        q = gm.graph.get_attr(name)
    user.update_arg(index, q)
    return q


def _set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, leaf = owner_of(gm, target)
    replace_tensor(owner, leaf, getattr(owner, leaf), value.contiguous())


def _identity_linear(gm: fx.GraphModule, before: fx.Node, x: fx.Node, d: int, prefix: str) -> tuple[fx.Node, str]:
    name = _new_param(gm, prefix, torch.eye(d, dtype=_val(x).dtype))
    with gm.graph.inserting_before(before):
        w = gm.graph.get_attr(name)
        lin = gm.graph.call_function(aten.linear.default, (x, w))
    lin.meta["val"] = _val(x)
    return lin, name


def _readers(norm: Norm) -> list[tuple[fx.Node, int]]:
    """``(reader, weight arg index)`` for every linear that reads ``norm.out`` through row-only ops."""
    found, stack, seen = [], [norm.out], set()
    while stack:
        v = stack.pop()
        for u in v.users:
            if u in seen or u.target in CHECKS:
                continue
            seen.add(u)
            spec = READERS.get(u.target)
            if spec is not None and u.args[spec[0]] is v and _is_param(u.args[spec[1]]):
                found.append((u, spec[1]))
            elif u.op == "call_function" and u.target in ROW_OPS and u.args[0] is v and _keeps_last(u):
                stack.append(u)
            else:
                what = "the graph output" if u.op == "output" else f"{u.target}"
                raise PassError(PASS, f"the norm output {norm.out.name!r} is read by {what}, not a linear: its "
                                "scale cannot be folded and the stream cannot be rotated there", u.name)
    return found


def _keeps_last(u: fx.Node) -> bool:
    """Does ``u`` keep its input's last dim as its own last dim, untouched?"""
    iv, ov = _val(u.args[0]), _val(u)
    if iv is None or ov is None or iv.dim() == 0 or ov.dim() == 0:
        return False
    if u.target in (aten.transpose.int, aten.permute.default):
        dims = [u.args[1], u.args[2]] if u.target == aten.transpose.int else list(u.args[1])
        n = iv.dim()
        if u.target == aten.transpose.int:
            return (dims[0] % n) != n - 1 and (dims[1] % n) != n - 1
        return dims[-1] % n == n - 1
    if u.target in (aten.select.int, aten.slice.Tensor, aten.unsqueeze.default, aten.squeeze.dim,
                    aten.flatten.using_ints):
        dim = u.args[1] % (iv.dim() + (1 if u.target == aten.unsqueeze.default else 0))
        last = iv.dim() - 1 + (1 if u.target == aten.unsqueeze.default else 0)
        if u.target == aten.flatten.using_ints:
            end = (u.args[2] if len(u.args) > 2 else -1) % iv.dim()
            return end != iv.dim() - 1
        return dim != last
    return ov.shape[-1] == iv.shape[-1]  # views/reshapes/expand/casts: the last dim kept whole


def _fold_affine(gm: fx.GraphModule, norm: Norm) -> None:
    g = get_attr(gm, norm.weight.target).detach() if norm.weight is not None else None
    beta = get_attr(gm, norm.bias.target).detach() if norm.bias is not None else None
    for reader, wi in _readers(norm):
        if g is None and beta is None:
            continue
        wnode = _own_param(gm, reader, wi)
        w = get_attr(gm, wnode.target).detach()
        in_dim = READERS[reader.target][2]
        w_in = w if in_dim == 1 else w.t()  # [out, d]
        bias_add = w_in @ beta.to(w.dtype) if beta is not None else None
        if g is not None:
            w_in = w_in * g.to(w.dtype)
        _set_param(gm, wnode.target, w_in if in_dim == 1 else w_in.t())
        if bias_add is None or not bias_add.abs().gt(0).any():
            continue
        if reader.target == aten.linear.default:
            b = _arg(reader, 2, "bias")
            if b is None:
                name = _new_param(gm, "_slice_bias", bias_add)
                with gm.graph.inserting_before(reader):
                    bn = gm.graph.get_attr(name)
                reader.args = (reader.args[0], reader.args[1], bn)
                continue
            bn = _own_param(gm, reader, 2)
        elif reader.target == aten.addmm.default:
            bn = _own_param(gm, reader, 0)
        else:
            raise PassError(PASS, "a LayerNorm shift reaches a matmul without bias", reader.name)
        _set_param(gm, bn.target, get_attr(gm, bn.target).detach() + bias_add)


def _replace_norm(gm: fx.GraphModule, norm: Norm) -> fx.Node:
    with gm.graph.inserting_after(norm.out):
        rms = gm.graph.call_function(aten.rms_norm.default, (norm.x, [norm.d], None, norm.eps))
    rms.meta["val"] = _val(norm.out)
    norm.out.replace_all_uses_with(rms)
    for n in reversed(norm.nodes):
        for u in [u for u in n.users if u.target in CHECKS]:
            gm.graph.erase_node(u)
        if not n.users:
            gm.graph.erase_node(n)
    return rms


def _untie_embeddings(gm: fx.GraphModule) -> None:
    for n in list(gm.graph.nodes):
        if n.op != "get_attr":
            continue
        users = list(n.users)
        emb = [u for u in users if u.target == aten.embedding.default and u.args[0] is n]
        if emb and len(users) > 1:
            for u in users:
                if u not in emb:
                    for i, a in enumerate(u.args):
                        if a is n:
                            _own_param(gm, u, i)


def prepare(gm: fx.GraphModule, allow_post_norm: bool = True) -> Prepared:
    """Rewrite ``gm`` in place into rotation-ready form (see the module docstring); function unchanged."""
    norms = find_norms(gm)
    if not norms:
        raise PassError(PASS, "no LayerNorm or RMSNorm over the last dim: there is no residual stream to slice")
    d = norms[-1].d  # the final norm normalises the stream
    stream_norms = [n for n in norms if n.d == d]
    for n in stream_norms:
        if n.kind == "layer" and n.weight is not None and not _is_param(n.weight):
            raise PassError(PASS, "LayerNorm scale is computed in the graph (not a parameter)", n.out.name)
    _untie_embeddings(gm)

    inputs = {n.x for n in stream_norms}
    norm_outs = {n.out for n in stream_norms}
    for n in stream_norms:
        if any(_strip_casts(m.x) is n.out for m in stream_norms):
            raise PassError(PASS, "a norm's output is normalised again directly: no linear between the two "
                            "norms to carry the rotation", n.out.name)

    # residual adds: add(r, f) with r read by a stream norm (pre-norm) or r a norm's output (post-norm:
    # BERT's LN(r + f(r))) -> add(linear(r, I), f). In post-norm blocks the skip matrix then reads the
    # norm output like any other reader and absorbs the norm's scale and shift.
    skips = []
    for node in list(gm.graph.nodes):
        if node.target != aten.add.Tensor or len(node.args) != 2:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        on_stream = lambda v: _strip_casts(v) in inputs or _strip_casts(v) in norm_outs  # noqa: E731
        res = a if on_stream(a) else b if on_stream(b) else None
        if res is None or _val(node) is None or _val(node).shape[-1] != d:
            continue
        if not allow_post_norm and _strip_casts(res) in norm_outs and _strip_casts(res) not in inputs:
            raise PassError(PASS, f"post-norm block: the residual {res.name!r} is a norm's output (BERT's "
                            "LN(r + f(r))). Slicing such a stream measured worse than pruning at every speed "
                            "(all-MiniLM-L6-v2: cosine 0.916 at 1.10x, 0.796 at 1.44x; calibrated pruning 0.976 "
                            "at 1.30x; docs/BENCHMARKS.md): prune heads and neurons instead, or pass "
                            "Slice(post_norm=True) to slice anyway", node.name)
        lin, name = _identity_linear(gm, node, res, d, SKIP_PREFIX)
        node.replace_input_with(res, lin)
        skips.append(name)

    # outputs that expose the stream (a norm output or a stream value): undo the basis there
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    restores = []
    for leaf in pytree.tree_leaves(out_node.args):
        if not isinstance(leaf, fx.Node) or _val(leaf) is None or _val(leaf).shape[-1] != d:
            continue
        src = leaf
        while src.op == "call_function" and src.target in ROW_OPS and _keeps_last(src):
            src = src.args[0]
        if src in norm_outs or src in inputs or src.target == aten.add.Tensor:
            lin, name = _identity_linear(gm, out_node, leaf, d, RESTORE_PREFIX)
            out_node.replace_input_with(leaf, lin)
            restores.append(name)

    centered, kinds = set(), {}
    for n in stream_norms:
        _fold_affine(gm, n)
        rms = _replace_norm(gm, n)
        kinds[rms.name] = n.kind
        if n.kind == "layer":
            centered.add(rms.name)
    drop_unused_attrs(gm)
    gm.graph.lint()
    gm.recompile()
    return Prepared(gm, d, centered, skips, restores, kinds)


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nobody reads and the parameters/buffers no get_attr names (folded norm scales)."""
    for n in list(gm.graph.nodes):
        if n.op == "get_attr" and not n.users:
            gm.graph.erase_node(n)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            path, _, leaf = name.rpartition(".")
            owner = get_attr(gm, path) if path else gm
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)


def decompose_rms(gm: fx.GraphModule, d_of: dict[str, int]) -> None:
    """Replace each weightless ``aten.rms_norm`` over ``k`` dims by ``x * rsqrt(mean(x^2) * k/d + eps)``:
    the original norm's statistic over ``d`` dims, computed on the kept ``k`` (the rest is zero)."""
    for n in list(gm.graph.nodes):
        if n.target != aten.rms_norm.default or n.name not in d_of:
            continue
        x, shape, _, eps = n.args
        k, d = int(shape[0]), d_of[n.name]
        with gm.graph.inserting_before(n):
            p = gm.graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
            m = gm.graph.call_function(aten.mean.dim, (p, [-1], True))
            if k != d:
                m = gm.graph.call_function(aten.mul.Tensor, (m, k / d))
            a = gm.graph.call_function(aten.add.Tensor, (m, eps))
            r = gm.graph.call_function(aten.rsqrt.default, (a,))
            y = gm.graph.call_function(aten.mul.Tensor, (x, r))
        n.replace_all_uses_with(y)
        gm.graph.erase_node(n)
    gm.recompile()


__all__ = ["Norm", "Prepared", "decompose_rms", "find_norms", "prepare"]
