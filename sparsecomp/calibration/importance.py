"""Calibration-driven group importance and global allocation for structured pruning.

Given the dependency graph and calibration statistics of the dense model (``calibration.collect_moments``),
every prunable group gets a *profile*: the order in which its units would be removed and the output error
each prefix of that order causes at the ops that consume the group. Criteria:

* ``"activation"`` (Wanda-style): unit error ``sum ||W_col||^2 * E[x_col^2]``, no compensation;
* ``"fluctuation"`` (FLAP): ``sum ||W_col||^2 * Var(x_col)`` — what is left once a bias absorbs the mean;
* ``"reconstruction"`` (OBS / ZipLM): greedy removal of whole units (column blocks) with the remaining
  weights and the bias optimally refit at each step; the error is what remains after the refit.

Allocation turns profiles into a removal decision: ``"uniform"`` removes the same fraction of every group;
``"global"`` ranks every unit of every group (heads, neurons, channels together) by error per MAC saved,
with each group's error relative to its consumers' output energy; ``"sensitivity"`` additionally measures,
per group, how much a local error grows by the time it reaches the model output (one probe run of the
compensated model per group) and ranks by predicted *output* error per MAC saved.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from .data import observe
from ..graph.attrs import get_attr
from ..graph.macs import WEIGHTED, node_macs
from ..graph.depgraph import DependencyGraph, Group
from .reconstruct import Moments, obs_profile, refittable, token_rows

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@dataclasses.dataclass
class GroupProfile:
    """Removal order of a group's units and the (relative) error after each prefix, plus MACs per unit."""

    group: Group
    order: list[int]
    error: np.ndarray  # error[k]: after removing order[:k+1]; in units comparable across groups
    macs: np.ndarray  # per unit, aligned with group.units
    scale: float = 1.0
    #: set when the group was ranked by another criterion than the one asked for, with the reason
    swapped: str | None = None

    def cost(self, k: int) -> float:
        return 0.0 if k == 0 else float(self.error[k - 1]) * self.scale


# ------------------------------------------------------------------------------------------------ consumers
def group_consumers(dg: DependencyGraph, group: Group) -> list[tuple[fx.Node, dict[int, np.ndarray]]]:
    """The linear/conv ops that reduce over the group, with unit -> input columns of their (flat) weight."""
    gm = dg.captured.module
    members = {(m.name, m.dim): m for m in group.param_members()}
    out = []
    for node, _, _, wname, wdim in dg.ctx.consumers:
        m = members.get((wname, wdim))
        if m is None or wdim != 1 or refittable(node) is not None:
            continue
        w = get_attr(gm, wname)
        kk = int(np.prod(w.shape[2:])) if w.dim() > 2 else 1
        cols = {u: (np.asarray(ix)[:, None] * kk + np.arange(kk)[None, :]).reshape(-1) for u, ix in m.index_map.items()}
        out.append((node, cols))
    return out


def mac_model(dg: DependencyGraph) -> tuple[dict[str, float], dict[str, float], float]:
    """Per parameter: MACs per element of each weighted op's weight; per sdpa node: MACs per head; and the
    total of those ops: the MACs that removing units can save (:mod:`sparsecomp.graph.macs` at the
    capture's example inputs)."""
    cap = dg.captured
    gm = cap.module
    per_elem: dict[str, float] = {}
    per_head: dict[str, float] = {}
    total = 0.0

    def hook(node: fx.Node, value: Any, interp: Any) -> None:
        nonlocal total
        if node.op != "call_function" or not (node.target in WEIGHTED or node.target is SDPA):
            return
        macs = float(node_macs(node, lambda a: value if a is node else interp.env[a]))
        if node.target is SDPA:
            per_head[node.name] = macs / value.shape[1]
            total += macs
            return
        w = node.args[WEIGHTED[node.target].weight]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            return
        per_elem[w.target] = per_elem.get(w.target, 0.0) + macs / get_attr(gm, w.target).numel()
        total += macs

    observe(cap.module, cap.example_args, cap.example_kwargs, hook)
    return per_elem, per_head, total


def unit_macs(dg: DependencyGraph, group: Group, per_elem: dict[str, float], per_head: dict[str, float]) -> np.ndarray:
    """MACs removed with each unit of ``group`` (weight elements x positions, plus attention per head)."""
    gm = dg.captured.module
    pos = {u: i for i, u in enumerate(group.units)}
    out = np.zeros(len(group.units))
    for m in group.members:
        if m.kind == "param":
            if m.name not in per_elem:
                continue
            w = get_attr(gm, m.name)
            elems = w.numel() / w.shape[m.dim]
            for u, ix in m.index_map.items():
                out[pos[u]] += len(ix) * elems * per_elem[m.name]
        elif m.name in per_head and m.dim == 1:
            for u, ix in m.index_map.items():
                out[pos[u]] += len(ix) * per_head[m.name]
    return out


# ------------------------------------------------------------------------------------------------ profiles
def _col_scores(w: torch.Tensor, mom: Moments, criterion: str) -> np.ndarray:
    w = w.detach().double().reshape(w.shape[0], -1)
    wn = (w ** 2).sum(0)
    n = max(mom.n, 1)
    if criterion == "fluctuation":
        var = mom.squares / n - mom.mean ** 2
        return (wn * var.clamp_min(0) * n).numpy()
    return (wn * mom.squares).numpy()  # "activation": ||W_col||^2 ||X_col||^2


def group_profile(dg: DependencyGraph, group: Group, moments: dict[str, Moments], criterion: str,
                  macs: np.ndarray, damp: float = 1e-2) -> GroupProfile:
    """The profile of ``group`` under ``criterion`` (see the module docstring).

    Errors are relative: divided by the energy of the consumers' dense outputs on the calibration data.
    A group without a linear/conv consumer with statistics falls back to weight-norm scores.
    """
    gm = dg.captured.module
    consumers = [(n, c) for n, c in group_consumers(dg, group) if n.name in moments]
    units = group.units
    pos = {u: i for i, u in enumerate(units)}
    if not consumers:
        score = np.zeros(len(units))
        weights = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
        for m in group.param_members():
            if m.name not in weights:
                continue  # buffers (BatchNorm statistics) are not weights
            w = get_attr(gm, m.name).detach().float()
            other = [d for d in range(w.dim()) if d != m.dim]
            per = (w * w).sum(dim=other).numpy() if other else (w * w).numpy()
            for u, ix in m.index_map.items():
                score[pos[u]] += per[list(ix)].sum()
        order = [units[i] for i in np.argsort(score, kind="stable")]
        err = np.cumsum(np.sort(score)) / max(score.sum(), 1e-30)
        return GroupProfile(group, order, err, macs,
                            swapped=f"{criterion} -> l2 weight norms (no linear/conv consumer with calibration "
                                    "statistics; errors are fractions of the group's weight energy)")
    energy = sum(moments[n.name].yy for n, _ in consumers) or 1.0
    if criterion == "reconstruction" and len(consumers) == 1:
        node, cols = consumers[0]
        w = get_attr(gm, node.args[1].target)
        prof = obs_profile(w, moments[node.name].covariance(), {u: cols[u] for u in units if u in cols},
                           damp=damp, max_remove=len(units) - 1)
        order = prof.order + [u for u in units if u not in set(prof.order)]
        err = np.concatenate([prof.error, [np.inf] * (len(units) - len(prof.error))])
        return GroupProfile(group, order, err / energy, macs)
    score = np.zeros(len(units))
    crit = "fluctuation" if criterion == "reconstruction" else criterion
    for node, cols in consumers:
        cs = _col_scores(get_attr(gm, node.args[1].target), moments[node.name], crit)
        for u, c in cols.items():
            score[pos[u]] += cs[c].sum()
    idx = np.argsort(score, kind="stable")
    swapped = (f"reconstruction -> fluctuation ({len(consumers)} consuming ops: the greedy OBS refit handles one)"
               if crit != criterion else None)
    return GroupProfile(group, [units[i] for i in idx], np.cumsum(score[idx]) / energy, macs, swapped=swapped)


# ------------------------------------------------------------------------------------------------ allocation
def allocate(profiles: Sequence[GroupProfile], target_macs: float, max_keep_fraction: float = 0.0) -> dict[int, int]:
    """Units to remove per group id so that at least ``target_macs`` MACs go, cheapest error first.

    Greedy over the profiles' marginal ``delta error / delta MACs`` (heads, neurons and channels compete in
    one ranking); at least one unit of every group is kept.
    """
    k = {p.group.id: 0 for p in profiles}
    heap: list[tuple[float, int, int]] = []
    by_id = {p.group.id: p for p in profiles}
    unit_macs = {p.group.id: {u: p.macs[i] for i, u in enumerate(p.group.units)} for p in profiles}

    def push(p: GroupProfile) -> None:
        i = k[p.group.id]
        limit = len(p.order) - 1
        if i >= limit:
            return
        gain = unit_macs[p.group.id][p.order[i]]
        if gain <= 0:
            gain = 1e-30
        d = p.cost(i + 1) - p.cost(i)
        if not np.isfinite(d):
            return
        heapq.heappush(heap, (d / gain, p.group.id, i))

    for p in profiles:
        push(p)
    removed = 0.0
    while removed < target_macs and heap:
        _, gid, i = heapq.heappop(heap)
        p = by_id[gid]
        if k[gid] != i:
            continue
        removed += unit_macs[gid][p.order[i]]
        k[gid] = i + 1
        push(p)
    return k


def output_rows_error(ref: list[torch.Tensor], got: list[torch.Tensor], masks: list[Any]) -> float:
    """Relative squared error ``sum ||got - ref||^2 / sum ||ref - mean(ref)||^2`` over unpadded rows."""
    num = den = 0.0
    for r, g, m in zip(ref, got, masks):
        rr, gr = token_rows(r, m).double(), token_rows(g, m).double()
        num += float(((gr - rr) ** 2).sum())
        den += float(((rr - rr.mean(0)) ** 2).sum())
    return num / max(den, 1e-30)



def removed_macs(dg: DependencyGraph, removed: set[int], per_elem: dict[str, float],
                 per_head: dict[str, float], groups: Sequence[Group]) -> float:
    """MACs removed by ``removed`` exactly (weights sliced on several dims are not double counted)."""
    gm = dg.captured.module
    out = 0.0
    for target, idx in dg.param_keep_indices(removed).items():
        if target not in per_elem:
            continue
        w = get_attr(gm, target)
        kept = float(np.prod([w.shape[d] if keep is None else len(keep) for d, keep in enumerate(idx)]))
        out += (w.numel() - kept) * per_elem[target]
    for g in groups:
        for m in g.members:
            if m.kind == "op" and m.dim == 1 and m.name in per_head:
                out += per_head[m.name] * sum(len(ix) for u, ix in m.index_map.items() if u in removed)
    return out
