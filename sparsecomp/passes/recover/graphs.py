"""The graphs Recover trains: which module scopes of the compressed graph correspond to the original's
(blocks), training copies of the compressed graph (cut at a block input, packed sparse weights trained
through their ``values``), and the tensors that may train (with the zeros they must keep)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.fx as fx

from ...capture.export import concrete_shape

_SPARSE_OPS = ("sparse_linear_csr", "sparse_linear_bsr", "sparse_linear_nm")
_EMBEDDING = torch.ops.aten.embedding.default


# ------------------------------------------------------------------------------------------------ correspondence
def _scopes(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values() if isinstance(v, tuple) and v and isinstance(v[0], str)]


def module_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """``{module path: its single output node}`` for every module scope of ``gm`` with exactly one output
    that is a float tensor (a node of the scope used outside it)."""
    members: dict[str, set[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            for p in _scopes(n):
                if p:
                    members.setdefault(p, set()).add(n)
    out = {}
    for path, nodes in members.items():
        leaving = [n for n in nodes if any(u not in nodes for u in n.users)]
        if len(leaving) == 1:
            val = leaving[0].meta.get("val")
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                out[path] = leaving[0]
    return out


def _scope_nodes(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and path in _scopes(n)]


def _sibling_key(path: str) -> tuple[str, int] | None:
    parent, _, last = path.rpartition(".")
    return (parent, int(last)) if last.isdigit() else None


def corresponding_blocks(student: fx.GraphModule, teacher: fx.GraphModule) -> tuple[list[str], str]:
    """The chain of blocks shared by both graphs (module paths in order) and a reason when it is empty.

    Candidates are numbered sibling modules (``parent.0``, ``parent.1``, ...) with one output each, of the
    same shape in both graphs; consecutive ones form a chain when block ``k + 1`` reads block ``k``'s
    output. The longest chain (>= 2 blocks) wins.
    """
    s_out, t_out = module_outputs(student), module_outputs(teacher)
    families: dict[str, list[tuple[int, str]]] = {}
    for path, node in s_out.items():
        key = _sibling_key(path)
        t = t_out.get(path)
        if key is None or t is None or concrete_shape(node) != concrete_shape(t):
            continue
        families.setdefault(key[0], []).append((key[1], path))
    best: list[str] = []
    for _, items in sorted(families.items()):
        items.sort()
        run: list[str] = []
        for _, path in items:
            if run:
                scope = set(_scope_nodes(student, path))
                prev = s_out[run[-1]]
                if not any(u in scope for u in prev.users):
                    run = []
            run.append(path)
            if len(run) > len(best):
                best = list(run)
    if len(best) < 2:
        return [], "no chain of >= 2 corresponding blocks (same module path and output shape in both graphs)"
    return best, ""


# ------------------------------------------------------------------------------------------------ training graphs
def _densify(values: torch.Tensor, positions: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """The dense weight of a packed sparse op: ``values`` scattered at fixed flat ``positions``."""
    flat = values.new_zeros(out_f * in_f).index_put((positions,), values.reshape(-1))
    return flat.view(out_f, in_f)


def _is_sparse_op(n: fx.Node) -> bool:
    return n.op == "call_function" and getattr(n.target, "namespace", None) == "sparsecomp" and \
        any(s in str(n.target) for s in _SPARSE_OPS)


def _get_tensor(gm: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _sparse_positions(gm: fx.GraphModule, n: fx.Node) -> tuple[torch.Tensor, int, int, fx.Node, fx.Node, Any]:
    """Flat positions of every packed value of a ``sparse_linear_*`` node, from the format's own ``to_dense``."""
    from ...ops import BSRWeight, CSRWeight, NMWeight

    op = str(n.target)
    t = lambda a: _get_tensor(gm, a.target)  # noqa: E731
    if "csr" in op:
        x, crow, col, values, bias, out_f, in_f = n.args[:7]
        vt = t(values)
        ramp = CSRWeight(t(crow), t(col), torch.arange(1, vt.numel() + 1, dtype=torch.float64), (out_f, in_f))
    elif "bsr" in op:
        x, crow, col, values, bias, out_f, in_f, r, c = n.args[:9]
        vt = t(values)
        ramp = BSRWeight(t(crow), t(col), torch.arange(1, vt.numel() + 1, dtype=torch.float64).view(vt.shape),
                         (out_f, in_f), (r, c))
    else:
        x, values, indices, bias, nn_, m, in_f = n.args[:7]
        vt = t(values)
        out_f = vt.shape[0]
        ramp = NMWeight(torch.arange(1, vt.numel() + 1, dtype=torch.float64).view(vt.shape), t(indices), nn_, m,
                        (out_f, in_f))
    dense = ramp.to_dense().reshape(-1)
    nz = torch.nonzero(dense).squeeze(1)
    positions = torch.empty(vt.numel(), dtype=torch.long)
    positions[dense[nz].long() - 1] = nz
    return positions, int(out_f), int(in_f), x, values, bias


def training_module(gm: fx.GraphModule, outputs: list[fx.Node], cut: fx.Node | None = None) -> fx.GraphModule:
    """A differentiable copy of ``gm``'s graph (sharing ``gm``'s tensors) that takes the flat inputs (plus the
    value of ``cut`` when given, which then replaces that node) and returns ``outputs`` as a tuple.

    ``sparse_linear_*`` nodes become ``linear(x, _densify(values, positions))``; ``positions`` are
    registered on ``gm`` as ``_recover_pos_*`` buffers (see :func:`_drop_positions`).
    """
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = g.placeholder(n.name)
    if cut is not None:
        env[cut] = g.placeholder("cut_input")
    for n in gm.graph.nodes:
        if n in env or n.op == "output" or (n.op == "call_module" and not n.users):
            continue
        if _is_sparse_op(n):
            positions, out_f, in_f, x, values, bias = _sparse_positions(gm, n)
            name = f"_recover_pos_{n.name}"
            if not hasattr(gm, name):
                gm.register_buffer(name, positions, persistent=False)
            w = g.call_function(_densify, (env[values] if values in env else g.get_attr(values.target),
                                           g.get_attr(name), out_f, in_f))
            env[n] = g.call_function(torch.ops.aten.linear.default,
                                     (env[x], w, env[bias] if bias is not None else None))
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    g.eliminate_dead_code()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fx.GraphModule(gm, g)


def _drop_positions(gm: fx.GraphModule) -> None:
    for name in [b for b, _ in gm.named_buffers() if b.startswith("_recover_pos_")]:
        delattr(gm, name)


def _flat_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, fx.Node)]
    return leaves


# ------------------------------------------------------------------------------------------------ trainable tensors
@dataclasses.dataclass
class _Tensor:
    name: str
    tensor: torch.Tensor
    zeros: torch.Tensor | None  # mask of entries that must stay exactly zero


def trainable_tensors(gm: fx.GraphModule, train_embeddings: bool) -> dict[str, _Tensor]:
    """Float parameters (minus embedding tables) and the ``values`` of packed sparse ops, by target name."""
    frozen = set()
    values = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is _EMBEDDING and not train_embeddings:
            if isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
                frozen.add(n.args[0].target)
        if _is_sparse_op(n):
            v = n.args[1] if "nm" in str(n.target) else n.args[3]
            values.add(v.target)
    names = {name for name, p in gm.named_parameters() if p.is_floating_point()} | values
    out = {}
    for name in sorted(names - frozen):
        t = _get_tensor(gm, name)
        zeros = None
        if t.dim() >= 2 or name in values:
            z = t.detach() == 0
            zeros = z if bool(z.any()) else None
        out[name] = _Tensor(name, t, zeros)
    return out


def _used_tensors(module: fx.GraphModule, tensors: dict[str, _Tensor]) -> list[_Tensor]:
    return [tensors[n.target] for n in module.graph.nodes if n.op == "get_attr" and n.target in tensors]
