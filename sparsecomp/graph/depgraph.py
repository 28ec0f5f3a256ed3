"""The dependency graph: which dims of which tensors are coupled, as pruning groups.

Build order: ``capture`` -> ``DependencyGraph.build`` walks the ATen graph once in topological order,
asks each op's rule (``rules/``) to couple the atoms of its inputs and outputs, fixes whatever reaches a
graph input or output, then collects the surviving (removable) atoms into *groups*: sets of units that
occupy the same dims, so that one ratio and one importance ranking apply to them.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict
from typing import Any, Iterable, Mapping

import networkx as nx
import numpy as np
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..capture.export import Captured
from .context import Multi, PropagationContext, RewriteContext, getitem_labels
from .labels import FIXED
from .registry import OpRegistry, OpRule
from .rules import DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class Member:
    """One place a group lives: a parameter (or an op's output) dim and the indices each unit owns."""

    kind: str  # "param" or "op"
    name: str  # parameter qualified name, or fx node name
    dim: int
    size: int
    index_map: dict[int, tuple[int, ...]]  # unit -> indices along ``dim``


@dataclasses.dataclass
class Group:
    """A set of removable units that share dims (one channel space, or one head space).

    ``kind`` is ``"channel"`` (neurons/channels), ``"head"`` (attention heads or conv groups: units that
    own a block of inner indices) or ``"inner"`` (the inside of a head, e.g. head_dim; never pruned, so
    that heads stay whole).
    """

    id: int
    kind: str
    units: list[int]
    members: list[Member]

    @property
    def size(self) -> int:
        return len(self.units)

    def param_members(self) -> list[Member]:
        return [m for m in self.members if m.kind == "param"]

    @property
    def params(self) -> list[str]:
        return sorted({m.name for m in self.param_members()})


class DependencyGraph:
    """Coupled dimensions of a captured model, grouped for structured pruning.

    Build with ``sparsecomp.dependency_graph(model, example_inputs)`` or ``DependencyGraph.build(captured)``.
    """

    def __init__(self, captured: Captured, ctx: PropagationContext, rules: OpRegistry) -> None:
        self.captured = captured
        self.ctx = ctx
        self.rules = rules
        self.groups: list[Group] = []
        self._unit_group: dict[int, int] = {}
        self._collect_groups()

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        captured: Captured,
        rules: Mapping[Any, OpRule] | OpRegistry | None = None,
        prune_norm_dims: bool = False,
    ) -> "DependencyGraph":
        registry = rules if isinstance(rules, OpRegistry) else DEFAULT_RULES.with_overrides(rules)
        gm = captured.module
        ctx = PropagationContext(gm, {"prune_norm_dims": prune_norm_dims})
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                ctx.node_labels[node] = ctx.unlabeled(node)
            elif node.op == "get_attr":
                continue  # parameters are labeled lazily, per dim, by the rules that read them
            elif node.op == "call_function":
                ctx.node_labels[node] = _propagate(ctx, registry, node)
            elif node.op == "call_module":
                for a in node.all_input_nodes:
                    if ctx.has_labels(a):
                        ctx.fix_all(ctx.lab(a))
                        ctx.unknown_ops.setdefault(f"call_module {node.target}", []).append(node.name)
                ctx.node_labels[node] = ctx.unlabeled(node)
            elif node.op == "output":
                for leaf in pytree.tree_leaves(node.args):
                    if isinstance(leaf, fx.Node):
                        ctx.fix_all(ctx.lab(leaf))  # the interface is fixed
        return cls(captured, ctx, registry)

    # ------------------------------------------------------------------ groups
    def _labeled_arrays(self) -> Iterable[tuple[str, str, int, np.ndarray]]:
        for target, dims in self.ctx.param_labels.items():
            for d, arr in enumerate(dims):
                if arr is not None:
                    yield "param", target, d, arr
        for node, lab in self.ctx.node_labels.items():
            if isinstance(lab, Multi):
                continue
            if lab is None:
                continue
            for d, arr in enumerate(lab):
                if arr is not None:
                    yield "op", node.name, d, arr

    def _collect_groups(self) -> None:
        atoms = self.ctx.atoms
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def join(a: int, b: int) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[ra] = rb

        head_units: set[int] = set()
        inner_units: set[int] = set()
        arrays = list(self._labeled_arrays())
        comp_cache: dict[int, tuple[int, ...]] = {}
        seen: set[bytes] = set()  # many ops carry the same label array (a transformer's hidden dim): once each
        for _, _, _, arr in arrays:
            content = _content_key(arr)
            if content in seen:
                continue
            seen.add(content)
            by_pos: dict[int, int] = {}
            for a in arr.tolist():
                comps = comp_cache.get(a)
                if comps is None:
                    comps = comp_cache[a] = atoms.components(a)
                live = [c for c in comps if c != FIXED]
                for pos, c in enumerate(comps):
                    if c == FIXED:
                        continue
                    parent.setdefault(c, c)
                    if pos in by_pos:
                        join(c, by_pos[pos])
                    else:
                        by_pos[pos] = c
                if len(live) >= 2:
                    first = live[0]
                    head_units.add(first)
                    inner_units.update(live[1:])
        hinted: dict[int, str] = {}
        for arr, kind in self.ctx.kind_hints:
            for a in arr.tolist():
                for leaf in atoms.leaves(a):
                    hinted[leaf] = kind
        spaces: dict[int, list[int]] = defaultdict(list)
        for u in parent:
            spaces[find(u)].append(u)
        # members: which indices of which params/ops each unit owns
        space_of = {u: find(u) for u in parent}
        members: dict[int, list[Member]] = defaultdict(list)
        index_maps: dict[bytes, dict[int, dict[int, tuple[int, ...]]]] = {}
        for kind, name, dim, arr in arrays:
            content = _content_key(arr)
            per_space = index_maps.get(content)
            if per_space is None:
                maps: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
                for i, a in enumerate(arr.tolist()):
                    for leaf in atoms.leaves(a):
                        maps[space_of[leaf]][leaf].append(i)
                per_space = index_maps[content] = {sp: {u: tuple(ix) for u, ix in m.items()} for sp, m in maps.items()}
            for sp, m in per_space.items():
                members[sp].append(Member(kind, name, dim, len(arr), m))
        gid = 0
        for sp, units in sorted(spaces.items(), key=lambda kv: min(kv[1])):
            units.sort()
            mem = members.get(sp, [])
            hints = {hinted[u] for u in units if u in hinted}
            if len(hints) == 1:
                kind = hints.pop()
            elif any(u in inner_units for u in units):
                kind = "inner"
            elif any(u in head_units for u in units):
                kind = "head"
            else:
                kind = "channel"
            self.groups.append(Group(gid, kind, units, mem))
            for u in units:
                self._unit_group[u] = gid
            gid += 1

    # ------------------------------------------------------------------ views
    @property
    def unknown_ops(self) -> dict[str, list[str]]:
        """Ops without a rule that touched prunable dims (their dims were fixed), with node names."""
        return dict(self.ctx.unknown_ops)

    def prunable_groups(self) -> list[Group]:
        """Groups with more than one unit that live in at least one ``nn.Parameter``.

        Groups found only in buffers (unused rows of a position table, say) save nothing and would only
        narrow what the model accepts, so they are left alone.
        """
        params = {name for name, _ in self.captured.module.named_parameters(remove_duplicate=False)}
        return [g for g in self.groups if g.kind != "inner" and g.size > 1 and any(p in params for p in g.params)]

    def summary(self, max_members: int = 6) -> str:
        lines = [
            f"DependencyGraph: {len(self.groups)} groups "
            f"({len(self.prunable_groups())} prunable), {len(self.captured.module.graph.nodes)} graph nodes"
        ]
        prunable = {g.id for g in self.prunable_groups()}
        lines.append("  (* = prunable; others are head internals, single units or buffer-only)")
        for g in self.groups:
            params = g.param_members()
            if not params:
                continue
            shown = ", ".join(f"{m.name}[dim {m.dim}]" for m in params[:max_members])
            more = f", ... (+{len(params) - max_members})" if len(params) > max_members else ""
            mark = "*" if g.id in prunable else " "
            lines.append(f"{mark} group {g.id:3d} {g.kind:7s} units={g.size:5d}  {shown}{more}")
        if self.unknown_ops:
            lines.append("ops without a rule (their dims were kept fixed):")
            for op, nodes in sorted(self.unknown_ops.items()):
                lines.append(f"  {op}: {', '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def to_networkx(self) -> nx.Graph:
        """Bipartite graph: ``("group", id)`` nodes joined to the ``(kind, name, dim)`` they live in."""
        g = nx.Graph()
        for grp in self.groups:
            gnode = ("group", grp.id)
            g.add_node(gnode, kind=grp.kind, size=grp.size)
            for m in grp.members:
                dnode = (m.kind, m.name, m.dim)
                g.add_node(dnode, size=m.size)
                g.add_edge(gnode, dnode, units=len(m.index_map))
        return g

    def choose(self, group: Group, scores: np.ndarray, n_remove: int) -> list[int]:
        """The ``n_remove`` lowest-scoring units of ``group``, never emptying a member dim.

        A group can span dims of very different sizes (a DenseNet concat space holds every layer's few
        output channels); a unit is spared when removing it would leave some parameter dim empty.
        """
        order = np.argsort(scores, kind="stable")
        drop = set(group.units[i] for i in order[:n_remove])
        score_of = {u: float(s) for u, s in zip(group.units, scores)}
        for m in group.param_members():
            owned = set(m.index_map)
            covered = sum(len(ix) for u, ix in m.index_map.items() if u in drop)
            if owned and owned <= drop and covered >= m.size:
                drop.discard(max(owned, key=lambda u: score_of[u]))
        return sorted(drop)

    # ------------------------------------------------------------------ apply
    def rewrite_context(self, removed: Iterable[int]) -> RewriteContext:
        return RewriteContext(self.ctx, set(removed))

    def param_keep_indices(self, removed: Iterable[int]) -> dict[str, list[np.ndarray | None]]:
        rw = self.rewrite_context(removed)
        out: dict[str, list[np.ndarray | None]] = {}
        for target, dims in self.ctx.param_labels.items():
            idx = [None if arr is None or rw.keep_mask(arr).all() else rw.kept_index(arr) for arr in dims]
            if any(i is not None for i in idx):
                out[target] = idx
        return out


def _content_key(arr: np.ndarray) -> bytes:
    """Equal label arrays give equal keys (their bytes, with the dtype and length)."""
    return arr.dtype.str.encode() + len(arr).to_bytes(8, "little") + arr.tobytes()


def _propagate(ctx: PropagationContext, registry: OpRegistry, node: fx.Node) -> Any:
    if node.target is operator.getitem:
        return getitem_labels(ctx, node)
    inputs = node.all_input_nodes
    if not any(ctx.has_labels(a) for a in inputs):
        return ctx.unlabeled(node)  # nothing prunable flows in, whatever the op
    rule = registry.get(node.target)
    if rule is None:
        for a in inputs:
            ctx.fix_all(ctx.lab(a))
        ctx.unknown_ops.setdefault(str(node.target), []).append(node.name)
        return ctx.unlabeled(node)
    return rule.propagate(node, ctx)
