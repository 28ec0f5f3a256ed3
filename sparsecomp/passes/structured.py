"""Structured pruning: remove whole channels, neurons and attention heads, physically.

Runs after ``capture``: builds the dependency graph, scores every unit of every prunable group (importance
aggregated over all the group's members), removes the lowest-scoring fraction of each group, slices the
parameters, fixes the shape arguments and re-exports (the postcondition check).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..calibration import iter_batches, observe
from ..capture.export import Captured
from ..config import PassConfig, register_config
from ..errors import ConfigError
from ..graph.apply import prune
from ..graph.depgraph import DependencyGraph, Group
from ..graph.context import get_attr
from .base import PassResult, matches_pattern, register_pass

IMPORTANCES = ("l1", "l2", "random", "taylor", "activation")
GRANULARITIES = ("channel", "head", "auto")


@register_config
@dataclasses.dataclass(frozen=True)
class StructuredPruning(PassConfig):
    """Remove a fraction of every prunable group (channels, neurons, heads).

    Parameters
    ----------
    ratio:
        Fraction of each group's units to remove, in [0, 1).
    importance:
        ``"l1"`` / ``"l2"`` weight norms, ``"random"`` (seeded), ``"taylor"`` (|w * dL/dw| with
        L = mean squared output on the calibration batches) or ``"activation"`` (||W_col|| * ||X_col|| of
        every op that consumes the group, from calibration batches).
    granularity:
        ``"channel"`` prunes channel/neuron groups only, ``"head"`` attention heads (and conv groups) only,
        ``"auto"`` both. Heads are always removed whole.
    ignore:
        Parameter or module-name patterns (fnmatch, or a module prefix); a group touching any is kept.
    per_layer:
        ``(pattern, ratio)`` pairs (or a dict) overriding ``ratio`` for groups touching the pattern.
    round_to:
        Keep a multiple of this many units in channel groups (e.g. 8 for SIMD-friendly widths).
    prune_norm_dims:
        Also prune dims normalised by LayerNorm/RMSNorm (e.g. a transformer's hidden size). This changes
        the norm's statistics, so it is approximate; off by default.
    seed:
        Seed of ``"random"`` importance.
    """

    type_name: ClassVar[str] = "StructuredPruning"

    ratio: float = 0.5
    importance: str = "l1"
    granularity: str = "auto"
    ignore: tuple[str, ...] = ()
    per_layer: tuple[tuple[str, float], ...] = ()
    round_to: int = 1
    prune_norm_dims: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        per_layer = self.per_layer
        if isinstance(per_layer, dict):
            per_layer = tuple(per_layer.items())
        object.__setattr__(self, "per_layer", tuple((str(p), float(r)) for p, r in per_layer))
        _check_ratio("ratio", self.ratio)
        for pattern, r in self.per_layer:
            _check_ratio(f"per_layer[{pattern!r}]", r)
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {IMPORTANCES}, got {self.importance!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.importance in ("taylor", "activation")


def _check_ratio(name: str, r: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise ConfigError(f"{name} must be a number in [0, 1), got {r!r}")


# ------------------------------------------------------------------------------------------------ selection
def group_ratio(group: Group, cfg: StructuredPruning) -> float | None:
    """The ratio for ``group`` under ``cfg``, or ``None`` when the group is not to be pruned."""
    if group.kind == "inner":
        return None
    if group.kind == "head" and cfg.granularity == "channel":
        return None
    if group.kind == "channel" and cfg.granularity == "head":
        return None
    params = group.params
    if any(matches_pattern(p, pat) for p in params for pat in cfg.ignore):
        return None
    for pattern, r in cfg.per_layer:
        if any(matches_pattern(p, pattern) for p in params):
            return r
    return cfg.ratio


def n_keep(n: int, ratio: float, round_to: int) -> int:
    keep = n - int(math.floor(ratio * n + 1e-9))
    if round_to > 1 and n >= round_to:
        keep = min(n, int(math.ceil(keep / round_to)) * round_to)
    return max(1, keep)


# ------------------------------------------------------------------------------------------------ importance
def _per_index(t: torch.Tensor, dim: int, power: int) -> np.ndarray:
    t = t.detach().float().abs()
    if power == 2:
        t = t * t
    other = [d for d in range(t.dim()) if d != dim]
    return (t.sum(dim=other) if other else t).numpy()


def _scatter(group: Group, member_scores: dict[tuple[str, int], np.ndarray]) -> np.ndarray:
    pos = {u: i for i, u in enumerate(group.units)}
    out = np.zeros(len(group.units))
    for m in group.param_members():
        vec = member_scores.get((m.name, m.dim))
        if vec is None:
            continue
        for u, ix in m.index_map.items():
            out[pos[u]] += float(vec[list(ix)].sum())
    return out


def unit_scores(dg: DependencyGraph, groups: list[Group], cfg: StructuredPruning, calibration: Any) -> dict[int, np.ndarray]:
    """Importance of each unit, per group id (higher = more important)."""
    gm = dg.captured.module
    member_scores: dict[tuple[str, int], np.ndarray] = {}
    needed = {(m.name, m.dim) for g in groups for m in g.param_members()}
    if cfg.importance in ("l1", "l2"):
        power = 1 if cfg.importance == "l1" else 2
        for name, dim in needed:
            member_scores[(name, dim)] = _per_index(get_attr(gm, name), dim, power)
    elif cfg.importance == "random":
        rng = np.random.default_rng(cfg.seed)
        return {g.id: rng.random(g.size) for g in groups}
    elif cfg.importance == "taylor":
        member_scores = _taylor_scores(dg, needed, calibration)
    elif cfg.importance == "activation":
        member_scores = _activation_scores(dg, calibration)
    return {g.id: _scatter(g, member_scores) for g in groups}


def _taylor_scores(dg: DependencyGraph, needed: set[tuple[str, int]], calibration: Any) -> dict[tuple[str, int], np.ndarray]:
    gm = dg.captured.module
    names = sorted({n for n, _ in needed})
    params = {n: get_attr(gm, n) for n in names}
    saved = {n: p.requires_grad for n, p in params.items()}
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for n, p in params.items():
            if p.is_floating_point():
                p.requires_grad_(True)
        for args, kwargs in iter_batches(calibration, dg.captured):
            with torch.enable_grad():
                out = gm(*args, **kwargs)
                leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                loss = sum((t.float() ** 2).mean() for t in leaves)
                tensors = [p for p in params.values() if p.requires_grad]
                gs = torch.autograd.grad(loss, tensors, allow_unused=True)
            for (n, p), g in zip([(n, p) for n, p in params.items() if p.requires_grad], gs):
                if g is not None:
                    grads[n] += (p.detach() * g).abs().float()
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])
    return {(n, d): grads[n].sum(dim=[x for x in range(grads[n].dim()) if x != d]).numpy() if grads[n].dim() > 1
            else grads[n].numpy() for n, d in needed}


def _activation_scores(dg: DependencyGraph, calibration: Any) -> dict[tuple[str, int], np.ndarray]:
    gm = dg.captured.module
    consumers = dg.ctx.consumers
    want = {node: (x, x_dim) for node, x, x_dim, _, _ in consumers}
    sq: dict[str, np.ndarray] = {}

    def hook(node: fx.Node, value: Any, interp: Any) -> None:
        if node in want:
            x_node, xdim = want[node]
            x = interp.env[x_node].detach().float()
            other = [d for d in range(x.dim()) if d != xdim]
            s = (x * x).sum(dim=other).numpy() if other else (x * x).numpy()
            sq[node.name] = sq.get(node.name, 0) + s

    for args, kwargs in iter_batches(calibration, dg.captured):
        observe(gm, args, kwargs, hook)
    out: dict[tuple[str, int], np.ndarray] = {}
    for node, _, _, wname, wdim in consumers:
        if node.name not in sq:
            continue
        wnorm = np.sqrt(_per_index(get_attr(gm, wname), wdim, 2))
        score = wnorm * np.sqrt(sq[node.name])
        key = (wname, wdim)
        out[key] = out.get(key, 0) + score
    return out


# ------------------------------------------------------------------------------------------------ the pass
def select_removed(dg: DependencyGraph, cfg: StructuredPruning, calibration: Any = None) -> tuple[set[int], list[dict]]:
    """Choose the units to remove; returns them and a per-group report."""
    chosen: list[tuple[Group, float]] = []
    for g in dg.prunable_groups():
        r = group_ratio(g, cfg)
        if r is not None and r > 0:
            chosen.append((g, r))
    if not chosen:
        return set(), []
    scores = unit_scores(dg, [g for g, _ in chosen], cfg, calibration)
    removed: set[int] = set()
    report: list[dict] = []
    for g, r in chosen:
        keep = n_keep(g.size, r, cfg.round_to if g.kind == "channel" else 1)
        drop = dg.choose(g, scores[g.id], g.size - keep)
        removed.update(drop)
        keep = g.size - len(drop)
        report.append({"group": g.id, "kind": g.kind, "units": g.size, "kept": keep,
                       "params": g.params[:4] + (["..."] if len(g.params) > 4 else [])})
    return removed, report


@register_pass(StructuredPruning)
def run_structured_pruning(captured: Captured, cfg: StructuredPruning, calibration: Any = None) -> PassResult:
    dg = DependencyGraph.build(captured, prune_norm_dims=cfg.prune_norm_dims)
    removed, report = select_removed(dg, cfg, calibration)
    if not removed:
        return PassResult(captured, False, report, "StructuredPruning")
    return PassResult(prune(dg, removed), True, report, "StructuredPruning")
