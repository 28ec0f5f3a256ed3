"""Structured pruning: remove whole channels, neurons and attention heads, physically.

Runs after ``capture``: builds the dependency graph, scores every unit of every prunable group (importance
aggregated over all the group's members), removes the lowest-scoring fraction of each group, slices the
parameters, fixes the shape arguments and re-exports (the postcondition check).

With calibration-driven settings the pass first collects input statistics of the ops that consume each
group (``calibration.collect_moments``), turns them into per-group error profiles and allocates removals
across all groups against a MAC budget (``importance``), and after pruning refits the remaining weights by
least squares on the compressed model's own activations (``reconstruct.sequential_refit``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..calibration.data import collect_moments, flat_batches, iter_batches, observe, token_masks
from ..capture.export import Captured
from ..config import PassConfig, register_config
from ..errors import ConfigError
from ..graph.apply import prune
from ..graph.depgraph import DependencyGraph, Group
from ..graph.registry import OpRule
from ..graph.attrs import deepcopy, get_attr
from ..calibration.importance import (allocate, group_consumers, group_profile, mac_model, output_rows_error, removed_macs,
                          unit_macs)
from ..calibration.reconstruct import damping, format_bytes, gram_bytes, solve_psd, refittable, sequential_refit, weight_target
from .base import PassResult, Stopwatch, matches_pattern, register_pass

CRITERIA = ("auto", "l1", "l2", "random", "taylor", "activation", "fluctuation", "reconstruction")
#: criteria that read calibration data
DATA_CRITERIA = ("taylor", "activation", "fluctuation", "reconstruction")
GRANULARITIES = ("channel", "head", "auto")
ALLOCATIONS = ("auto", "uniform", "global", "sensitivity")
#: criteria whose errors are comparable across groups (needed by global / sensitivity allocation)
OUTPUT_CRITERIA = ("activation", "fluctuation", "reconstruction")
#: calibration samples (batch rows) that the sensitivity probes run on
PROBE_SAMPLES = 128
#: probe / re-allocate rounds of ``allocation="sensitivity"``
SENSITIVITY_ROUNDS = 2


@register_config
@dataclasses.dataclass(frozen=True)
class StructuredPruning(PassConfig):
    """Remove channels, neurons and attention heads.

    How much (give at most one; neither means ``ratio=0.5``):

    ratio:
        Fraction of each group's units to remove, in [0, 1) (uniform allocation only).
    mac_ratio:
        Fraction of the model's MACs (linear, conv and attention ops at the example inputs) to remove, in
        [0, 1). With ``allocation="global"`` / ``"sensitivity"`` units of all groups compete for it; with
        ``"uniform"`` the pass solves for the one per-group fraction that removes at least this much.

    Parameters
    ----------
    criterion:
        How units are ranked. ``"auto"`` (default) resolves when the pass runs: with calibration data the
        best measured recipe (``"fluctuation"``, ``allocation="sensitivity"`` when ``mac_ratio`` is given,
        ``reconstruct="all"``); without, the data-free default (``"l2"`` weight norms, uniform, no refit).
        The report records what was resolved. Explicit: ``"l1"`` / ``"l2"`` weight norms (``nn.Parameter``
        members only, never buffers such as BatchNorm statistics), ``"random"`` (seeded), and, needing
        calibration data: ``"taylor"`` (|w * dL/dw| with L = mean squared output), ``"activation"``
        (||W_col|| * ||X_col|| of every op that consumes the group), ``"fluctuation"`` (FLAP:
        ``||W_col||^2 * Var(x_col)``), ``"reconstruction"`` (greedy OBS); see :mod:`sparsecomp.calibration.importance`.
    granularity:
        ``"channel"`` prunes channel/neuron groups only, ``"head"`` attention heads (and conv groups) only,
        ``"auto"`` both. Heads are always removed whole.
    ignore:
        Parameter or module-name patterns (fnmatch, or a module prefix); a group touching any is kept.
    per_layer:
        ``(pattern, ratio)`` pairs (or a dict): that fraction of each group touching the pattern.
    round_to:
        Keep a multiple of this many units in channel groups (e.g. 8 for SIMD-friendly widths).
    prune_norm_dims:
        Also prune dims normalised by LayerNorm/RMSNorm (e.g. a transformer's hidden size). This changes
        the norm's statistics, so it is approximate; off by default.
    seed:
        Seed of ``"random"``.
    allocation:
        ``"auto"`` (see ``criterion``), ``"uniform"``, ``"global"`` (units of all groups in one ranking by
        relative output error per MAC saved) or ``"sensitivity"`` (as global, each group's error scaled by
        how much it grows by the model output, one probe per group). Global allocations need
        ``mac_ratio`` and a criterion in ``("activation", "fluctuation", "reconstruction")``.
    reconstruct:
        ``"auto"`` (see ``criterion``), ``False``, ``True`` / ``"consumers"`` (refit every linear/conv
        whose inputs lost units) or ``"all"`` (every linear/conv of the model), by ridge least squares on
        calibration data, sequentially on the compressed model's own activations
        (:func:`sparsecomp.calibration.reconstruct.sequential_refit`). The bias absorbs the mean of what was removed.
    damp:
        Ridge strength of the refits, or ``"cv"`` (default): chosen per op by 4-fold cross-validation.
        The OBS profiles and sensitivity probes use ``damp`` too (0.01 under ``"cv"``).
    token_mask:
        Name of the model input that marks real tokens (e.g. ``"attention_mask"``); calibration statistics
        skip rows where it is zero. ``None``, or an input the model does not have: all rows count.
    progress:
        Progress on stderr, with the time left, for calibration and reconstruction steps that run longer
        than two seconds (default on; tqdm bars when tqdm is installed).
    residual:
        With ``reconstruct``: an op that feeds a residual add is fit to the dense model's *sum* minus the
        compressed residual, so it also absorbs the error earlier layers left in the residual stream.
    memory_budget:
        Largest float64 Gram matrix (bytes) a refit or an OBS profile may build (default 2 GiB); a layer
        that would need more is left as it is and the report says so.

    A setting that needs calibration data (a data-driven criterion, a refit, a global allocation) given
    without any raises :class:`~sparsecomp.errors.ConfigError` when the pass runs.
    """

    type_name: ClassVar[str] = "StructuredPruning"
    renamed: ClassVar[dict[str, str]] = {"importance": "criterion"}

    ratio: float | None = None
    mac_ratio: float | None = None
    criterion: str = "auto"
    granularity: str = "auto"
    ignore: tuple[str, ...] = ()
    per_layer: tuple[tuple[str, float], ...] = ()
    round_to: int = 1
    prune_norm_dims: bool = False
    seed: int = 0
    allocation: str = "auto"
    reconstruct: bool | str = "auto"
    damp: float | str = "cv"
    token_mask: str | None = "attention_mask"
    progress: bool = True
    residual: bool = False
    memory_budget: int = 2 << 30
    importance: dataclasses.InitVar[Any] = None  # the old name: refused in __post_init__

    @property
    def profile_damp(self) -> float:
        """The ridge of OBS profiles and sensitivity probes (a number even when ``damp="cv"``)."""
        return 1e-2 if self.damp == "cv" else float(self.damp)

    def __post_init__(self, importance: Any = None) -> None:
        if importance is not None:
            raise ConfigError(f"StructuredPruning: 'importance' was renamed to 'criterion' "
                              f"(use criterion={importance!r})")
        if self.ratio is not None and self.mac_ratio is not None:
            raise ConfigError("StructuredPruning takes ratio (fraction of each group) or mac_ratio (fraction "
                              "of the model's MACs), not both")
        if self.ratio is None and self.mac_ratio is None:
            object.__setattr__(self, "ratio", 0.5)
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        per_layer = self.per_layer
        if isinstance(per_layer, dict):
            per_layer = tuple(per_layer.items())
        object.__setattr__(self, "per_layer", tuple((str(p), float(r)) for p, r in per_layer))
        if self.ratio is not None:
            _check_ratio("ratio", self.ratio)
        if self.mac_ratio is not None:
            _check_ratio("mac_ratio", self.mac_ratio)
        for pattern, r in self.per_layer:
            _check_ratio(f"per_layer[{pattern!r}]", r)
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer, got {self.round_to!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.allocation in ("global", "sensitivity") and self.ratio is not None:
            raise ConfigError(f"allocation={self.allocation!r} budgets the model's MACs: give mac_ratio (the "
                              "fraction of MACs to remove), not ratio (the fraction of each group)")
        if self.allocation in ("global", "sensitivity") and self.criterion not in OUTPUT_CRITERIA + ("auto",):
            raise ConfigError(f"allocation={self.allocation!r} needs criterion in {OUTPUT_CRITERIA}, "
                              f"got {self.criterion!r}")
        if self.reconstruct not in (True, False, "consumers", "all", "auto"):
            raise ConfigError(f"reconstruct must be 'auto', True, False, 'consumers' or 'all', "
                              f"got {self.reconstruct!r}")
        if self.damp != "cv" and (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float))
                                  or not self.damp > 0):
            raise ConfigError(f"damp must be a positive number or 'cv', got {self.damp!r}")
        if self.token_mask is not None and not isinstance(self.token_mask, str):
            raise ConfigError(f"token_mask must be an input name or None, got {self.token_mask!r}")
        if isinstance(self.memory_budget, bool) or not isinstance(self.memory_budget, int) or self.memory_budget <= 0:
            raise ConfigError(f"memory_budget must be a positive number of bytes, got {self.memory_budget!r}")

    def resolve(self, has_calibration: bool) -> "StructuredPruning":
        """The config with every ``"auto"`` replaced by what it means with or without calibration data."""
        changes: dict[str, Any] = {}
        data = has_calibration
        if self.criterion == "auto":
            changes["criterion"] = "fluctuation" if data else "l2"
        if self.allocation == "auto":
            changes["allocation"] = "sensitivity" if data and self.mac_ratio is not None else "uniform"
        if self.reconstruct == "auto":
            changes["reconstruct"] = "all" if data else False
        if not changes:
            return self
        return dataclasses.replace(self, **changes)

    @property
    def needs_calibration(self) -> bool:
        """Whether the (resolved) settings read calibration data."""
        return (self.criterion in DATA_CRITERIA or self.reconstruct not in (False, "auto")
                or self.allocation in ("global", "sensitivity"))


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
    return cfg.ratio if cfg.ratio is not None else cfg.mac_ratio


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
    """Importance of each unit, per group id (higher = more important).

    Weight criteria score the group's ``nn.Parameter`` members only: buffers such as BatchNorm's
    ``running_mean`` / ``running_var`` are statistics, not weights (a dead channel keeps a running
    variance of about 1, which a norm over every member would count as importance).
    """
    gm = dg.captured.module
    member_scores: dict[tuple[str, int], np.ndarray] = {}
    weights = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    needed = {(m.name, m.dim) for g in groups for m in g.param_members() if m.name in weights}
    if cfg.criterion in ("l1", "l2"):
        power = 1 if cfg.criterion == "l1" else 2
        for name, dim in needed:
            member_scores[(name, dim)] = _per_index(get_attr(gm, name), dim, power)
    elif cfg.criterion == "random":
        rng = np.random.default_rng(cfg.seed)
        return {g.id: rng.random(g.size) for g in groups}
    elif cfg.criterion == "taylor":
        member_scores = _taylor_scores(dg, needed, calibration)
    elif cfg.criterion == "activation":
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
@dataclasses.dataclass
class _Calib:
    """Calibration batches (flat placeholder values), padding masks and dense input statistics."""

    batches: list[list[Any]]
    masks: list[Any]
    moments: dict[str, Any]


def _fan_in(gm: fx.GraphModule, node: fx.Node) -> int:
    w = get_attr(gm, node.args[1].target)
    return int(np.prod(w.shape[1:]))


def _calibrate(dg: DependencyGraph, cfg: StructuredPruning, calibration: Any, groups: list[Group],
               notes: dict | None = None) -> _Calib:
    """Calibration batches and the dense input statistics of the ops consuming ``groups``; an op whose
    Gram matrix would exceed ``cfg.memory_budget`` gets none (its groups fall back to weight norms, and
    ``notes["over_memory_budget"]`` names it)."""

    gm = dg.captured.module
    batches = flat_batches(calibration, dg.captured)
    masks = token_masks(gm, batches, cfg.token_mask)
    nodes = {n for g in groups for n, _ in group_consumers(dg, g)}
    diagonal = not _needs_gram(cfg)
    over = set() if diagonal else {n for n in nodes if gram_bytes(_fan_in(gm, n)) > cfg.memory_budget}
    if over and notes is not None:
        notes["over_memory_budget"] = {n.name: format_bytes(gram_bytes(_fan_in(gm, n))) for n in sorted(
            over, key=lambda n: n.name)}
    nodes -= over
    moments = collect_moments(gm, batches, sorted(nodes, key=lambda n: n.name), masks, cfg.progress,
                              diagonal) if nodes else {}
    return _Calib(batches, masks, moments)


def _needs_gram(cfg: StructuredPruning) -> bool:
    """Whether ranking needs full ``X^T X`` statistics (OBS profiles, the refits of sensitivity probes);
    the other criteria read per-column variances only."""
    return cfg.criterion == "reconstruction" or cfg.allocation == "sensitivity"


def _uses_moments(cfg: StructuredPruning) -> bool:
    return cfg.criterion in ("fluctuation", "reconstruction") or cfg.allocation != "uniform"


def _profiles(dg: DependencyGraph, groups: list[Group], cfg: StructuredPruning, cal: _Calib) -> tuple[list, float]:

    per_elem, per_head, total = mac_model(dg)
    return [group_profile(dg, g, cal.moments, cfg.criterion, unit_macs(dg, g, per_elem, per_head), cfg.profile_damp)
            for g in groups], total


def _sensitivity(dg: DependencyGraph, profiles: list, counts: dict[int, int], cal: _Calib, damp: float) -> None:
    """Scale each profile by (model output error) / (predicted local error), measured with one probe per
    group: the group's first units zeroed (equivalent to removing them) and its consumers refit."""

    work = deepcopy(dg.captured.module)
    batches, masks, n = [], [], 0
    for bt, m in zip(cal.batches, cal.masks):  # probes use the first PROBE_SAMPLES samples
        if n >= PROBE_SAMPLES:
            break
        batches.append(bt)
        masks.append(m)
        first = next((t for t in bt if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        n += 1 if first is None else first.shape[0]

    def outputs(gm: fx.GraphModule) -> list[torch.Tensor]:
        outs = []
        with torch.no_grad():
            for b in batches:
                leaves = [t for t in pytree.tree_leaves(_run_flat(gm, b))
                          if isinstance(t, torch.Tensor) and t.is_floating_point()]
                outs.append(leaves[0])
        return outs

    ref = outputs(work)
    for prof in profiles:
        g = prof.group
        k = counts.get(g.id, 0) or max(1, g.size // 4)
        k = min(k, len(prof.order) - 1)
        predicted = float(prof.error[k - 1])
        if k <= 0 or not np.isfinite(predicted) or predicted <= 0:
            continue
        removed = set(prof.order[:k])
        saved: dict[str, torch.Tensor] = {}
        for target, idx in _group_keep_indices(dg, g, removed).items():
            t = get_attr(work, target)
            saved[target] = t.detach().clone()
            new = t.detach().clone()
            for d, keep in enumerate(idx):
                if keep is not None:
                    drop = np.setdiff1d(np.arange(new.shape[d]), keep)
                    new.index_fill_(d, torch.as_tensor(drop, dtype=torch.long), 0)
            with torch.no_grad():
                t.copy_(new)
        for node, cols in group_consumers(dg, g):
            mom = cal.moments.get(node.name)
            if mom is None:
                continue
            w = get_attr(work, node.args[1].target)
            bn = node.args[2] if len(node.args) > 2 else None
            if bn is None:
                continue
            b = get_attr(work, bn.target)
            saved.setdefault(bn.target, b.detach().clone())
            w0 = saved.get(node.args[1].target, w.detach()).double().reshape(w.shape[0], -1)
            drop = np.concatenate([cols[u] for u in removed if u in cols]) if removed & set(cols) else np.zeros(0, int)
            keep = np.setdiff1d(np.arange(w0.shape[1]), drop)
            w_new, b_new = _compensate(w0, saved[bn.target].double(), mom, keep, damp)
            with torch.no_grad():
                w.copy_(w_new.reshape(w.shape).to(w.dtype))
                b.copy_(b_new.to(b.dtype))
        got = outputs(work)
        for target, t in saved.items():
            with torch.no_grad():
                get_attr(work, target).copy_(t)
        actual = output_rows_error(ref, got, masks)
        prof.scale = max(actual, 1e-12) / predicted


def _group_keep_indices(dg: DependencyGraph, group: Group, removed: set[int]) -> dict[str, list]:
    """``dg.param_keep_indices(removed)`` restricted to the parameters of ``group`` (``removed`` holds only
    units of ``group``, so no other parameter changes); avoids walking every parameter of the model."""

    rw = dg.rewrite_context(removed)
    out: dict[str, list] = {}
    for target in dict.fromkeys(group.params):
        dims = dg.ctx.param_labels.get(target)
        if dims is None:
            continue
        idx = [None if arr is None or rw.keep_mask(arr).all() else rw.kept_index(arr) for arr in dims]
        if any(i is not None for i in idx):
            out[target] = idx
    return out


def _compensate(w: torch.Tensor, b: torch.Tensor, mom: Any, keep: np.ndarray, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares refit of ``W x + b`` using only columns ``keep`` (others zero), from dense statistics."""

    cov = mom.covariance()
    k = torch.as_tensor(keep, dtype=torch.long)
    ckk = cov[k][:, k]
    ckk = ckk + damping(torch.diagonal(ckk), damp) * torch.eye(len(k), dtype=ckk.dtype)
    wk = solve_psd(ckk, cov[k] @ w.T).T
    out = torch.zeros_like(w)
    out[:, k] = wk
    mu = mom.mean
    return out, b + w @ mu - wk @ mu[k]


def _meet_target(dg: DependencyGraph, cfg: StructuredPruning, profiles: list, free: list, fixed: dict[int, int],
                 total_target: float) -> dict[int, int]:
    """Allocate the free groups so that the *exact* removed MACs reach ``total_target`` (a unit's MAC
    estimate double counts weights sliced on two dims, e.g. a conv between two pruned channel groups)."""

    per_elem, per_head, _ = mac_model(dg)
    groups = [p.group for p in profiles]
    target = total_target - sum(_prefix_macs(p, fixed[p.group.id]) for p in profiles if p.group.id in fixed)
    counts: dict[int, int] = {}
    for _ in range(6):
        alloc = allocate(free, target)
        counts = {}
        for p in free:
            k = alloc[p.group.id]
            if cfg.round_to > 1 and p.group.kind == "channel":
                k = p.group.size - n_keep(p.group.size, k / p.group.size, cfg.round_to)
            counts[p.group.id] = k
        removed = {u for p in profiles for u in p.order[:{**fixed, **counts}[p.group.id]]}
        actual = removed_macs(dg, removed, per_elem, per_head, groups)
        if actual >= total_target * 0.999:
            break
        target += total_target - actual
    return counts


def _prefix_macs(profile: Any, k: int) -> float:
    pos = {u: i for i, u in enumerate(profile.group.units)}
    return float(sum(profile.macs[pos[u]] for u in profile.order[:k]))


def _run_flat(gm: fx.GraphModule, flat: list[Any]) -> Any:
    return fx.Interpreter(gm).run(*flat)


def _rounding(g: Group, cfg: StructuredPruning) -> int:
    return cfg.round_to if g.kind == "channel" else 1


def _solve_uniform_fraction(dg: DependencyGraph, cfg: StructuredPruning, chosen: list[tuple[Group, float]],
                            scores: dict[int, np.ndarray], fixed: dict[int, float]) -> float:
    """The smallest per-group fraction whose removals take at least ``mac_ratio`` of the model's MACs
    (exact count of the units ``choose`` would remove; bisection, removed MACs grow with the fraction)."""
    per_elem, per_head, total = mac_model(dg)
    groups = [g for g, _ in chosen]
    target = cfg.mac_ratio * total

    def removed_at(r: float) -> float:
        rem: set[int] = set()
        for g, _ in chosen:
            k = g.size - n_keep(g.size, fixed.get(g.id, r), _rounding(g, cfg))
            rem.update(dg.choose(g, scores[g.id], k))
        return removed_macs(dg, rem, per_elem, per_head, groups)

    hi = 1.0 - 1e-9
    most = removed_at(hi)
    if most < target:
        raise ConfigError(f"mac_ratio={cfg.mac_ratio:g} cannot be reached with uniform allocation: removing all "
                          f"but one unit of every prunable group removes {most / max(total, 1e-30):.3f} of the "
                          "MACs; lower mac_ratio")
    lo = 0.0
    for _ in range(24):
        mid = (lo + hi) / 2
        if removed_at(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def select_removed(dg: DependencyGraph, cfg: StructuredPruning, calibration: Any = None,
                   cal: "_Calib | None" = None, notes: dict | None = None) -> tuple[set[int], list[dict]]:
    """Choose the units to remove; returns them and a per-group report (``notes`` gets what was solved)."""
    notes = {} if notes is None else notes
    chosen: list[tuple[Group, float]] = []
    for g in dg.prunable_groups():
        r = group_ratio(g, cfg)
        if r is not None and r > 0:
            chosen.append((g, r))
    if not chosen:
        return set(), []
    fixed = {g.id: r for g, r in chosen if any(matches_pattern(q, pat) for q in g.params for pat, _ in cfg.per_layer)}
    uniform = cfg.allocation == "uniform"
    if not _uses_moments(cfg):
        scores = unit_scores(dg, [g for g, _ in chosen], cfg, calibration)
    else:
        if cal is None:
            cal = _calibrate(dg, cfg, calibration, [g for g, _ in chosen])
        profiles, total = _profiles(dg, [g for g, _ in chosen], cfg, cal)
        swaps = {p.group.id: p.swapped for p in profiles if p.swapped}
        if swaps:
            notes["criterion_swaps"] = swaps
        scores = {}
        for p in profiles:
            rank = {u: i for i, u in enumerate(p.order)}
            scores[p.group.id] = np.array([rank[u] for u in p.group.units], dtype=float)
    if uniform and cfg.mac_ratio is not None:
        r_all = _solve_uniform_fraction(dg, cfg, chosen, scores, fixed)
        notes["uniform_fraction"] = round(r_all, 6)
        chosen = [(g, fixed.get(g.id, r_all)) for g, _ in chosen]
    counts: dict[int, int] = {}
    for g, r in chosen:
        if uniform or g.id in fixed:
            counts[g.id] = g.size - n_keep(g.size, r, _rounding(g, cfg))
    if not uniform:
        free = [p for p in profiles if p.group.id not in counts]
        if free:
            target = cfg.mac_ratio * total - sum(_prefix_macs(p, counts[p.group.id]) for p in profiles
                                                 if p.group.id in counts)
            alloc = allocate(free, target)
            for _ in range(SENSITIVITY_ROUNDS if cfg.allocation == "sensitivity" else 0):
                _sensitivity(dg, free, alloc, cal, cfg.profile_damp)
                alloc = allocate(free, target)
            counts.update(_meet_target(dg, cfg, profiles, free, counts, target + sum(
                _prefix_macs(p, counts[p.group.id]) for p in profiles if p.group.id in counts)))
    removed: set[int] = set()
    report: list[dict] = []
    for g, r in chosen:
        drop = dg.choose(g, scores[g.id], counts[g.id])
        removed.update(drop)
        keep = g.size - len(drop)
        row = {"group": g.id, "kind": g.kind, "units": g.size, "kept": keep,
               "params": g.params[:4] + (["..."] if len(g.params) > 4 else [])}
        if g.id in notes.get("criterion_swaps", {}):
            row["reason"] = "ranked by " + notes["criterion_swaps"][g.id]
        report.append(row)
    return removed, report


def frozen_by_unknown_ops(dg: DependencyGraph) -> dict[str, Any] | None:
    """Which ops without a rule fixed dims, and how many parameters they kept out of every prunable group:
    the graph is analysed again with those ops fixing only their outputs, and the parameters that become
    prunable are counted (``None`` when no unknown op touched a prunable dim)."""
    unknown = dg.unknown_ops
    if not unknown:
        return None
    gm = dg.captured.module
    names = {n for nodes in unknown.values() for n in nodes}
    targets = {node.target for node in gm.graph.nodes if node.name in names}
    lenient = {t: OpRule(lambda node, ctx: ctx.unlabeled(node)) for t in targets}

    def prunable_params(graph: DependencyGraph) -> set[str]:
        return {p for g in graph.prunable_groups() for p in g.params}

    sizes = {name: p.numel() for name, p in gm.named_parameters()}
    total = max(sum(sizes.values()), 1)
    try:
        what_if = DependencyGraph.build(dg.captured, dg.rules.with_overrides(lenient),
                                       dg.ctx.options.get("prune_norm_dims", False))
        frozen = prunable_params(what_if) - prunable_params(dg)
        count = sum(sizes.get(p, 0) for p in frozen)
    except Exception:  # the what-if analysis is best effort: the op names are what matters
        frozen, count = set(), None
    return {"ops": {op: len(nodes) for op, nodes in unknown.items()},
            "nodes": {op: nodes[:5] for op, nodes in unknown.items()},
            "frozen_params": count, "frozen_fraction": None if count is None else round(count / total, 4),
            "frozen_tensors": sorted(frozen)[:10]}


def _reconstruct(dg: DependencyGraph, pruned: Captured, removed: set[int], cfg: StructuredPruning,
                 cal: _Calib) -> tuple[Captured, list]:

    keep = dg.param_keep_indices(removed)
    out_keep = {t: idx[0] for t, idx in keep.items()}
    touched_in = {t for t, idx in keep.items() if len(idx) > 1 and any(i is not None for i in idx[1:])}
    everything = cfg.reconstruct == "all"

    def select(node: fx.Node) -> bool:
        if refittable(node) is not None:
            return False
        return everything or weight_target(node) in touched_in

    gm = pruned.module  # a fresh graph of this pass (its refit weights are replaced, never written into)
    records = sequential_refit(dg.captured.module, gm, cal.batches, out_keep, select, cal.masks,
                               damp=cfg.damp, progress=cfg.progress, residual=cfg.residual,
                               memory_budget=cfg.memory_budget)
    if not any(r.refit for r in records):
        return pruned, records
    return pruned.recapture(gm), records


@register_pass(StructuredPruning)
def run_structured_pruning(captured: Captured, cfg: StructuredPruning, calibration: Any = None) -> PassResult:
    cfg = cfg.resolve(calibration is not None)
    notes: dict[str, Any] = {}
    clock = Stopwatch()
    dg = DependencyGraph.build(captured, prune_norm_dims=cfg.prune_norm_dims)
    clock.lap("dependency graph")
    cal = None
    if _uses_moments(cfg) or cfg.reconstruct:
        groups = [g for g in dg.prunable_groups() if group_ratio(g, cfg) is not None]
        cal = _calibrate(dg, cfg, calibration, groups, notes)
        clock.lap("calibration statistics")
    removed, report = select_removed(dg, cfg, calibration, cal, notes)
    unknown = frozen_by_unknown_ops(dg)
    if unknown is not None:
        notes["unknown_ops"] = unknown
    clock.lap("selection")
    notes["timing"] = clock.laps  # the same dict: later laps land in it too
    if not removed:
        return PassResult(captured, False, report, "StructuredPruning", notes)
    pruned = prune(dg, removed)
    clock.lap("pruning")
    if cfg.reconstruct:
        pruned, records = _reconstruct(dg, pruned, removed, cfg, cal)
        clock.lap("reconstruction")
        report.append({"reconstruction": [dataclasses.asdict(r) for r in records]})
        over = {r.weight: r.reason for r in records if r.reason.startswith("over memory_budget")}
        if over:
            notes["refit_over_memory_budget"] = over
    return PassResult(pruned, True, report, "StructuredPruning", notes)
