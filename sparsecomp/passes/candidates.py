"""The one scan for weighted ops (``linear``, convolutions) whose weight is a parameter of the graph.

LowRank and Sparsify start from it; which ops carry a weight, and where, is
:data:`sparsecomp.graph.macs.WEIGHTED` (keyed by ATen overload).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.fx as fx

from ..graph.attrs import get_attr
from ..graph.macs import WEIGHTED, is_transposed
from .base import matches_pattern


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
