"""The one scan for weighted ops (``linear``, convolutions) whose weight is a parameter of the graph, and
the end of a pass that rewrites them layer by layer.

LowRank and Sparsify start from :func:`weighted_nodes` and end with :func:`drop_weight` / :func:`finish`;
which ops carry a weight, and where, is :data:`sparsecomp.graph.macs.WEIGHTED` (keyed by ATen overload).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.fx as fx

from ..capture.export import Captured
from ..graph.attrs import get_attr, owner_of
from ..graph.macs import WEIGHTED, is_transposed
from .base import matches_pattern, PassResult


@dataclasses.dataclass(frozen=True)
class WeightedNode:
    """A weighted op: the node, its weight's ``get_attr`` node and tensor, ``kind`` (``"linear"``,
    ``"conv"`` or ``"conv_transpose"``) and whether other ops read the same weight."""

    node: fx.Node
    weight: fx.Node
    param: torch.Tensor
    kind: str
    shared: bool

    @property
    def target(self) -> str:
        return self.weight.target

    def row(self) -> dict:
        """The layer's identity in a pass report."""
        return {"layer": self.target, "node": self.node.name, "shape": [int(s) for s in self.param.shape]}

    def ignored(self, patterns: Iterable[str]) -> bool:
        return any(matches_pattern(self.target, p) for p in patterns)


def weighted_nodes(gm: fx.GraphModule, kinds: Iterable[str] = ("linear", "conv", "conv_transpose")) -> list[WeightedNode]:
    """Every op of ``kinds`` whose weight is a floating-point tensor attribute of ``gm``, in graph order."""
    kinds = set(kinds)
    uses: dict[str, int] = {}
    for nd in gm.graph.nodes:
        if nd.op == "get_attr":
            uses[nd.target] = uses.get(nd.target, 0) + len(nd.users)
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHTED:
            continue
        spec = WEIGHTED[node.target]
        kind = "conv_transpose" if is_transposed(node) else spec.kind
        w = node.args[spec.weight] if len(node.args) > spec.weight else None
        if kind not in kinds or not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        try:
            param = get_attr(gm, w.target)
        except AttributeError:
            continue
        if isinstance(param, torch.Tensor) and param.is_floating_point():
            out.append(WeightedNode(node, w, param, kind, uses.get(w.target, 0) != 1))
    return out


def drop_weight(gm: fx.GraphModule, w_node: fx.Node) -> None:
    """Erase the ``get_attr`` node ``w_node`` once no op reads it, and its tensor once no node names it."""
    if w_node.users:
        return
    gm.graph.erase_node(w_node)
    if not any(nd.op == "get_attr" and nd.target == w_node.target for nd in gm.graph.nodes):
        owner, leaf = owner_of(gm, w_node.target)
        delattr(owner, leaf)


def finish(captured: Captured, gm: fx.GraphModule, report: list[dict], modified: bool, name: str) -> PassResult:
    """The end of a layer-by-layer pass: its report rows in graph order; ``captured`` itself if nothing
    changed, else ``gm`` without dead code, re-exported (the postcondition: every shape re-checked)."""
    order = {nd.name: i for i, nd in enumerate(captured.module.graph.nodes)}
    report.sort(key=lambda row: order.get(row["node"], len(order)))
    if not modified:
        return PassResult(captured, False, report, name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(captured.recapture(gm), True, report, name)
