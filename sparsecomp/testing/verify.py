"""Verification of structured pruning against the eager model.

* ``max_abs_diff(a, b)``: largest difference over every output leaf.
* ``group_equivalence(dg, group)``: remove part of one group physically and compare with the original model
  in which the same units' weights are zeroed. For every group whose coupling is exact (all groups unless
  ``prune_norm_dims`` is on) the two must agree to float rounding: that is the proof that the dependency
  graph found every place the group lives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..graph.apply import prune, zeroed
from ..graph.depgraph import DependencyGraph, Group


def max_abs_diff(a: Any, b: Any) -> float:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.shape != y.shape:
                return float("inf")
            if x.numel():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


def output_scale(a: Any) -> float:
    leaves = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    return max([float(t.abs().max()) for t in leaves] + [1e-12])


@dataclasses.dataclass(frozen=True)
class EquivalenceResult:
    group: int
    removed: int
    max_abs_diff: float
    scale: float

    @property
    def relative(self) -> float:
        return self.max_abs_diff / self.scale


def group_equivalence(dg: DependencyGraph, group: Group, fraction: float = 0.5, seed: int = 0) -> EquivalenceResult:
    """Compare physically removing ``fraction`` of ``group`` with zeroing it in the original."""
    rng = np.random.default_rng(seed)
    k = max(1, min(group.size - 1, int(round(fraction * group.size))))
    removed = set(dg.choose(group, rng.random(group.size), k))
    pruned = prune(dg, removed, pass_name="group_equivalence", recapture=False)
    reference = zeroed(dg, removed)
    args, kwargs = dg.captured.example_args, dg.captured.example_kwargs
    with torch.no_grad():
        want = reference(*args, **kwargs)
        got = pruned.module(*args, **kwargs)
    return EquivalenceResult(group.id, k, max_abs_diff(want, got), output_scale(want))
