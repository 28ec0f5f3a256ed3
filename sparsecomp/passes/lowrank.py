"""Low-rank factorization: replace a dense ``linear`` or convolution by two thin ones, ``W ~= B @ A``.

Must run on a captured graph (``capture`` / ``compress``). Every ``aten.linear`` and every ungrouped,
non-transposed ``aten.conv{1,2,3}d`` / ``aten.convolution`` whose weight is a parameter is a candidate.
Seen as a matrix, the weight is ``W`` ``[m, n]``: ``[out, in]`` for a linear, ``[out, in * prod(kernel)]``
for a convolution. For a chosen rank ``r``:

* ``linear(x, W, bias)``  ->  ``linear(linear(x, A), B, bias)``, ``A`` ``[r, in]``, ``B`` ``[out, r]``;
* ``conv(x, W, bias, stride, padding, dilation)``  ->  ``conv(conv(x, A, None, stride, padding, dilation),
  B, bias)``: a ``k x k`` conv to ``r`` channels (``A`` ``[r, in, *k]``, keeping stride, padding and
  dilation) followed by a 1x1 conv (``B`` ``[out, r, 1, ...]``, with the bias). A 1x1 conv is the same
  rewrite with ``k = 1``.

The layer shrinks from ``m*n`` to ``r*(m+n)`` weights. Grouped and transposed convolutions stay dense (with
the reason in the report).

Three factorizations (``method``):

* ``"svd"``: truncated SVD of ``W`` (optimal in the Frobenius norm of the weight).
* ``"activation"``: SVD-LLM whitening. With ``G = X^T X`` the Gram matrix of the layer's inputs over the
  calibration batches (for a convolution: of the unfolded input patches, im2col, in 1d, 2d and 3d) and
  ``G + eps*I = L L^T`` (Cholesky), the truncated SVD of ``W L`` gives ``W ~= U_r S_r V_r^T L^{-1}``,
  which minimises the output error ``||X W^T - X (BA)^T||_F`` (``||X D^T||_F = ||D L||_F``). The relative
  output error at rank ``r`` is then ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` of the whitened singular
  values.
* ``"asvd"``: ASVD-style scaling. ``S = diag(mean|X_j|^0.5)`` per input column (patch column); the truncated
  SVD of ``W S`` gives ``A = V_r^T S^{-1}``. Cheaper than whitening (no ``n x n`` factorisation) and
  usually between the two.

Rank per layer (``allocation="uniform"``): from ``rank_ratio``, ``energy`` or ``param_ratio`` of each layer
alone. With ``allocation="global"``, ``param_ratio`` is one budget over all candidate layers, in parameters
or MACs (``target``); ranks are allocated to minimise the sum of the layers' relative output errors (see
``allocate_global``).

Cost model: a layer stays dense unless the factored pair is predicted to be faster than the dense op on a
CPU (``factored_is_faster``; constants measured by ``benchmarks/bench_lowrank_overhead.py``).

The pass reports per layer the rank, parameter counts and the relative output error on the calibration
data (``||X D^T||_F^2 = tr(D G D^T)``), or why the layer was left dense.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..calibration import iter_batches, observe
from ..capture.export import Captured
from ..config import PassConfig, register_config
from ..errors import ConfigError, PassError
from ..graph.context import get_attr
from .base import PassResult, matches_pattern, register_pass

METHODS = ("svd", "activation", "asvd")
ALLOCATIONS = ("uniform", "global")
TARGETS = ("params", "macs")

#: ASVD's exponent of the per-column activation scale (alpha = 0.5 in the ASVD paper).
ASVD_ALPHA = 0.5

# Cost model. The time of one op at one CPU thread is modelled as ``t = a * MACs + b``; the two thin ops of
# a factored layer run at a slope ``kappa * a`` (thin GEMMs / convs run below peak). So factoring pays when
# ``kappa * MACs_factored + b/a < MACs_dense``, with ``b/a`` the overhead of the extra op in MAC-equivalents.
# Measured on the development machine (x86-64, torch 2.13 CPU, fp32, 1 thread; noisy shared host, median
# relative fit error ~0.3) by least squares over 100 linear and 24 conv2d shape/rank cases:
#     python benchmarks/bench_lowrank_overhead.py
# which printed  linear: a=0.0313 ns/MAC, kappa=1.41, b=7.4 us = 2.36e5 MACs;
#                conv2d: a=0.0810 ns/MAC, kappa=1.45, b=12.5 us = 1.54e5 MACs.
# (1d / 3d convolutions use the conv2d constants.) Re-run the script on the deployment CPU to re-derive them.
_COST = {"linear": (1.41, 2.36e5), "conv": (1.45, 1.54e5)}

_LINEAR = torch.ops.aten.linear.default
_CONVOLUTION = torch.ops.aten.convolution.default
#: ``conv{d}d`` overloads -> spatial dims (``.padding`` takes ``padding="same"|"valid"``).
_CONV_ND = {
    torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3,
    torch.ops.aten.conv1d.padding: 1, torch.ops.aten.conv2d.padding: 2, torch.ops.aten.conv3d.padding: 3,
}
_CONV_PADDING_STR = {torch.ops.aten.conv1d.padding, torch.ops.aten.conv2d.padding, torch.ops.aten.conv3d.padding}
_CONV_DEFAULT = {1: torch.ops.aten.conv1d.default, 2: torch.ops.aten.conv2d.default, 3: torch.ops.aten.conv3d.default}
_TRANSPOSED = (
    torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input,
    torch.ops.aten.conv_transpose3d.input,
)


@register_config
@dataclasses.dataclass(frozen=True)
class LowRank(PassConfig):
    """Factor every large ``linear`` / convolution weight into two low-rank ones.

    Exactly one of ``rank_ratio``, ``energy`` and ``param_ratio`` chooses the ranks (``W`` is ``[m, n]``,
    ``n = in * prod(kernel)`` for a convolution):

    rank_ratio:
        ``r = ceil(rank_ratio * min(m, n))``, in (0, 1].
    energy:
        The smallest ``r`` keeping this fraction of the squared singular values (of ``W``, of the whitened
        ``W L`` for ``"activation"``, of the scaled ``W S`` for ``"asvd"``), in (0, 1].
    param_ratio:
        In (0, 1). Uniform allocation: ``r = floor(param_ratio * m*n / (m+n))`` (at least 1), so every
        factored layer keeps about this fraction of its weights. Global allocation: the factored layers
        together keep at most this fraction of the candidate layers' parameters (or MACs, ``target``).

    Other parameters
    ----------------
    method:
        ``"svd"`` (plain truncated SVD), ``"activation"`` (whitened by the calibration inputs' Gram matrix;
        minimises the output error rather than the weight error) or ``"asvd"`` (scaled by mean |input| per
        column).
    allocation:
        ``"uniform"`` (each layer on its own) or ``"global"`` (needs ``param_ratio``: one budget, ranks
        allocated where they reduce the output error most).
    target:
        What the global budget counts: ``"params"`` or ``"macs"`` (MACs per call on the calibration data).
    ignore:
        Parameter or module-name patterns (fnmatch, or a module prefix) of layers to leave dense.
    min_features:
        Layers whose weight matrix has fewer rows or columns than this are left dense.
    damping:
        ``eps`` of the whitening, relative to ``trace(X^T X) / n``.
    cost_model:
        ``True``: a layer stays dense when ``r*(m+n) >= m*n`` or when the factored pair is not predicted to
        be faster on CPU (``factored_is_faster``). ``False``: factor at the chosen rank regardless (e.g. to
        check that full rank reproduces the model).

    Examples
    --------
    >>> cfg = LowRank(param_ratio=0.5, method="activation", allocation="global", ignore=("classifier",))
    >>> small = sparsecomp.compress(model, (x,), cfg, calibration=batches)  # doctest: +SKIP
    """

    type_name: ClassVar[str] = "LowRank"

    rank_ratio: float | None = None
    energy: float | None = None
    param_ratio: float | None = None
    method: str = "svd"
    ignore: tuple[str, ...] = ()
    min_features: int = 16
    damping: float = 1e-6
    allocation: str = "uniform"
    target: str = "params"
    cost_model: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        if not isinstance(self.ignore, (tuple, list)) or not all(isinstance(p, str) for p in self.ignore):
            raise ConfigError(f"ignore must be a tuple of name patterns, got {self.ignore!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        chosen = [k for k in ("rank_ratio", "energy", "param_ratio") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(
                f"LowRank needs exactly one of rank_ratio, energy, param_ratio; got {chosen or 'none'}"
            )
        if self.rank_ratio is not None:
            _check_number("rank_ratio", self.rank_ratio, upper_inclusive=True)
        if self.energy is not None:
            _check_number("energy", self.energy, upper_inclusive=True)
        if self.param_ratio is not None:
            _check_number("param_ratio", self.param_ratio, upper_inclusive=False)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.allocation == "global" and self.param_ratio is None:
            raise ConfigError(
                f"allocation='global' needs param_ratio (the global budget), got {chosen[0]}"
            )
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 1:
            raise ConfigError(f"min_features must be a positive integer, got {self.min_features!r}")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ConfigError(f"damping must be a positive number, got {d!r}")
        if not isinstance(self.cost_model, bool):
            raise ConfigError(f"cost_model must be True or False, got {self.cost_model!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd" or self.allocation == "global"


def _check_number(name: str, v: Any, *, upper_inclusive: bool) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and 0.0 < v and (v <= 1.0 if upper_inclusive else v < 1.0)
    if not ok:
        interval = "(0, 1]" if upper_inclusive else "(0, 1)"
        raise ConfigError(f"{name} must be a number in {interval}, got {v!r}")


# ------------------------------------------------------------------------------------------------ the math
def _whitener(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L^{-1})`` with ``L L^T = gram + eps*I`` (float64); eps grows until Cholesky succeeds."""
    g = gram.double()
    n = g.shape[0]
    scale = float(torch.trace(g)) / n
    if not math.isfinite(scale) or scale <= 0:
        scale = 1.0
    eye = torch.eye(n, dtype=torch.float64)
    eps = damping
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(g + eps * scale * eye)
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            return L, Linv
        eps *= 10.0
    raise ConfigError("the calibration Gram matrix could not be factorised (non-finite activations?)")


def asvd_scale(mean_abs: torch.Tensor, alpha: float = ASVD_ALPHA) -> torch.Tensor:
    """ASVD's per-input-column scale ``mean|X_j| ** alpha`` (float64), floored to stay invertible."""
    s = mean_abs.double().clamp_min(0) ** alpha
    top = float(s.max()) if s.numel() else 0.0
    if not math.isfinite(top) or top <= 0:
        return torch.ones_like(s)
    return s.clamp_min(1e-6 * top)


def decompose(weight: torch.Tensor, gram: torch.Tensor | None = None, damping: float = 1e-6,
              scale: torch.Tensor | None = None):
    """SVD of ``W``, of the whitened ``W L`` (``gram``) or of the scaled ``W diag(scale)``.

    ``weight`` is ``[m, n]`` (a conv weight is flattened to ``[out, -1]``). Returns ``(U, S, Vh, T)`` in
    float64 with ``U @ diag(S) @ Vh @ T == W`` up to rounding, where ``T`` is ``None`` (plain SVD),
    ``L^{-1}`` (``[n, n]``) or ``1 / scale`` (``[n]``, applied column-wise).
    """
    w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    if gram is not None and scale is not None:
        raise ConfigError("decompose takes a Gram matrix (whitening) or a scale (ASVD), not both")
    if scale is not None:
        s = scale.double().cpu()
        U, S, Vh = torch.linalg.svd(w * s, full_matrices=False)
        return U, S, Vh, 1.0 / s
    if gram is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U, S, Vh, None
    L, Linv = _whitener(gram.cpu(), damping)
    U, S, Vh = torch.linalg.svd(w @ L, full_matrices=False)
    return U, S, Vh, Linv


def _right(Vh: torch.Tensor, T: torch.Tensor | None) -> torch.Tensor:
    if T is None:
        return Vh
    return Vh * T if T.dim() == 1 else Vh @ T


def factors_from(U, S, Vh, Linv, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, n], B [m, r])`` (float64) from a ``decompose`` result truncated to ``rank``."""
    r = max(1, min(int(rank), S.shape[0]))
    return _right(Vh[:r], Linv), U[:, :r] * S[:r]


def lowrank_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None,
                    damping: float = 1e-6, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight`` (``[out, in]``) as ``B @ A`` with ``A`` ``[rank, in]``, ``B`` ``[out, rank]``.

    Plain truncated SVD by default, whitened by ``gram = X^T X`` (SVD-LLM), or scaled per input column by
    ``scale`` (ASVD). The factors have the weight's dtype and device.
    """
    A, B = factors_from(*decompose(weight, gram, damping, scale), rank)
    return A.to(weight.dtype).to(weight.device), B.to(weight.dtype).to(weight.device)


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``sum(S[:r]^2) >= energy * sum(S^2)``."""
    e = S.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return max(1, min(r, S.shape[0]))


def choose_rank(cfg: LowRank, m: int, n: int, S: torch.Tensor | None = None) -> int:
    """The rank of a ``[m, n]`` weight under ``cfg`` alone (``S``: singular values, needed for ``energy``)."""
    k = min(m, n)
    if cfg.rank_ratio is not None:
        r = int(math.ceil(cfg.rank_ratio * k - 1e-9))
    elif cfg.param_ratio is not None:
        r = int(math.floor(cfg.param_ratio * m * n / (m + n) + 1e-9))
    else:
        assert S is not None
        r = energy_rank(S, cfg.energy)
    return max(1, min(r, k))


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X W^T - X W'^T||_F / ||X W^T||_F`` from the Gram matrix ``X^T X`` (weights as ``[m, n]``)."""
    w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    d = w - approx.detach().double().cpu().reshape(w.shape)
    g = gram.double().cpu()
    num = float(torch.einsum("oi,ij,oj->", d, g, d))
    den = float(torch.einsum("oi,ij,oj->", w, g, w))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return math.sqrt(max(num, 0.0) / den)


def whitened_error_curve(S: torch.Tensor) -> torch.Tensor:
    """``e[r] = sqrt(sum_{i>=r} s_i^2 / sum s_i^2)``, ``r = 0..k``: the relative output error at rank ``r``
    of a whitened factorization (exact up to the damping)."""
    e = S.double() ** 2
    total = float(e.sum())
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(e, (0,)), 0), (0,)), e.new_zeros(1)])
    return (tail.clamp_min(0) / total).sqrt() if total > 0 else torch.zeros_like(tail)


def error_curve(weight: torch.Tensor, U, S, Vh, T, gram: torch.Tensor) -> torch.Tensor:
    """Relative output error ``e[r]`` on the calibration data at every rank ``r = 0..k``, for any ``T``.

    With ``R = Vh T`` and ``D_r = U_{>=r} S_{>=r} R_{>=r}`` (``U`` has orthonormal columns),
    ``||X D_r^T||^2 = sum_{i>=r} s_i^2 (R G R^T)_ii``: one ``k x n x n`` product for all ranks.
    """
    g = gram.double().cpu()
    w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
    den = float(torch.einsum("oi,ij,oj->", w, g, w))
    k = S.shape[0]
    if den <= 0:
        return torch.zeros(k + 1, dtype=torch.float64)
    R = _right(Vh, T)
    per_rank = S.double() ** 2 * ((R @ g) * R).sum(1)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(per_rank, (0,)), 0), (0,)), per_rank.new_zeros(1)])
    return (tail.clamp_min(0) / den).sqrt()


def factored_is_faster(m: int, n: int, rank: int, rows: float, kind: str = "linear") -> bool:
    """Whether ``[m, n] -> [m, r] @ [r, n]`` is predicted to run faster on CPU (see ``_COST``).

    ``rows`` is the number of input rows per call (tokens for a linear, output positions for a conv,
    times the batch). False whenever ``r*(m+n) >= m*n``.
    """
    if rank * (m + n) >= m * n:
        return False
    kappa, overhead = _COST["conv" if kind != "linear" else "linear"]
    return kappa * rank * (m + n) * rows + overhead < m * n * rows


def max_fast_rank(m: int, n: int, rows: float, kind: str = "linear") -> int:
    """The largest rank for which ``factored_is_faster`` holds (0 if none)."""
    r = min(m, n)
    kappa, overhead = _COST["conv" if kind != "linear" else "linear"]
    bound = (m * n * rows - overhead) / (kappa * (m + n) * max(rows, 1e-9))
    r = min(r, int(math.floor(bound)) + 1)
    while r > 0 and not factored_is_faster(m, n, r, rows, kind):
        r -= 1
    return max(r, 0)


# ------------------------------------------------------------------------------------------------ allocation
@dataclasses.dataclass
class _Choice:
    """Per layer: error curve ``err[r]``, cost per rank unit, dense cost, and the ranks allowed."""

    err: torch.Tensor
    unit: float          # cost of one rank: (m+n) params, or (m+n)*rows MACs
    dense: float         # cost left dense: m*n, or m*n*rows
    max_rank: int        # ranks 1..max_rank may be factored


def _cost(choices: list[_Choice], ranks: list[int]) -> float:
    return sum(c.dense if r == 0 else c.unit * r for c, r in zip(choices, ranks))


def _error(choices: list[_Choice], ranks: list[int]) -> float:
    """The allocation objective: sum of squared relative output errors."""
    return sum(0.0 if r == 0 else float(c.err[r]) ** 2 for c, r in zip(choices, ranks))


def allocate_global(choices: list[_Choice], budget: float, steps: int = 4096) -> list[int]:
    """Ranks (0 = leave dense) minimising ``sum_l err_l(r_l)^2`` subject to ``sum_l cost_l(r_l) <= budget``.

    ``err_l(r)`` is layer ``l``'s relative output error at rank ``r``, so the objective is the total
    normalised squared output error (each layer's output energy counts as 1). Squared errors are additive
    and, unlike the plain sum of relative errors, do not favour all-or-nothing allocations on flat spectra
    (on MiniLM they gave slightly better embeddings).

    A multiple-choice knapsack solved exactly by dynamic programming on a grid of ``steps`` budget units
    (each option's cost rounded *up* to the grid, so the result always meets the budget; the options of a
    layer are dense, error 0, and every allowed rank whose cost is below the dense cost). The budget left
    by the rounding is then spent greedily, one rank at a time, on the step with the largest error decrease
    per unit of cost. Raises ``ConfigError`` when even rank 1 everywhere exceeds the budget.
    """
    floor = _cost(choices, [1 if c.max_rank >= 1 else 0 for c in choices])
    if floor > budget:
        raise ConfigError(
            f"param_ratio budget {budget:.6g} is below the smallest allocation (rank 1 everywhere = {floor:.6g})"
        )
    grid = budget / steps
    inf = float("inf")
    best = torch.zeros(steps + 1, dtype=torch.float64)  # best[b]: least error of the layers so far in b units
    picks: list[torch.Tensor] = []
    for c in choices:
        top = min(c.max_rank, int(math.ceil(c.dense / c.unit)) - 1)  # higher ranks cost more than dense
        options = [(0, c.dense, 0.0)] + [(r, c.unit * r, float(c.err[r]) ** 2) for r in range(1, top + 1)]
        new = torch.full((steps + 1,), inf, dtype=torch.float64)
        pick = torch.zeros(steps + 1, dtype=torch.long)
        for r, cost, err in options:
            units = int(math.ceil(cost / grid - 1e-9))
            if units > steps:
                continue
            cand = torch.full((steps + 1,), inf, dtype=torch.float64)
            cand[units:] = best[: steps + 1 - units] + err
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, r), pick)
        picks.append(pick)
        best = new
    ranks = [0] * len(choices)
    b = steps
    if not math.isfinite(float(best[b])):  # rounding up lost the rank-1 floor: start from it
        ranks = [1 if c.max_rank >= 1 else 0 for c in choices]
    else:
        for i in range(len(choices) - 1, -1, -1):
            r = int(picks[i][b])
            ranks[i] = r
            c = choices[i]
            b -= int(math.ceil((c.dense if r == 0 else c.unit * r) / grid - 1e-9))
    spent = _cost(choices, ranks)
    while True:  # greedy fill of the budget left by the rounding
        pick_i, pick_gain = -1, 0.0
        for i, (c, r) in enumerate(zip(choices, ranks)):
            if r == 0 or r >= c.max_rank or spent + c.unit > budget or c.unit * (r + 1) >= c.dense:
                continue
            gain = float(c.err[r] ** 2 - c.err[r + 1] ** 2) / c.unit
            if gain > pick_gain:
                pick_i, pick_gain = i, gain
        if pick_i < 0:
            break
        ranks[pick_i] += 1
        spent += choices[pick_i].unit
    return ranks


# ------------------------------------------------------------------------------------------------ layers
@dataclasses.dataclass
class _Layer:
    """A candidate op: its node, weight, and (for convs) the geometry needed to unfold its input."""

    node: fx.Node
    w_node: fx.Node
    kind: str                       # "linear" or "conv{d}d"
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def m(self) -> int:
        return int(self.weight_shape[0])

    @property
    def n(self) -> int:
        return int(math.prod(self.weight_shape[1:]))

    @property
    def spatial(self) -> int:
        return len(self.weight_shape) - 2

    def row(self) -> dict[str, Any]:
        return {"layer": self.w_node.target, "node": self.node.name, "op": self.kind,
                "shape": [int(s) for s in self.weight_shape], "params_before": self.m * self.n}


def _ints(v: Any, d: int, name: str, node: fx.Node) -> tuple[int, ...]:
    v = [v] if isinstance(v, int) else list(v)
    if len(v) == 1:
        v = v * d
    if len(v) != d or not all(isinstance(i, int) for i in v):
        raise PassError("LowRank", f"unsupported {name}={v!r} for a {d}d convolution", node.name)
    return tuple(v)


def _conv_args(node: fx.Node) -> tuple[int, Any, Any, Any, Any, int, bool] | None:
    """``(spatial dims, stride, padding, dilation, groups, transposed)`` of a convolution node, or None."""
    t = node.target
    a = list(node.args)
    if t in _CONV_ND:
        d = _CONV_ND[t]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, "valid" if t in _CONV_PADDING_STR else 0, 1, 1)
        vals = [a[i] if i < len(a) else node.kwargs.get(nm, dflt) for i, (nm, dflt) in enumerate(zip(names, defaults))]
        return d, vals[3], vals[4], vals[5], vals[6], False
    if t is _CONVOLUTION:
        w = a[1]
        shape = w.meta["val"].shape if isinstance(w, fx.Node) and "val" in w.meta else None
        d = len(shape) - 2 if shape is not None else len(a[3])
        return d, a[3], a[4], a[5], a[8], bool(a[6])
    return None


def _explicit_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...], node: fx.Node,
                      d: int) -> tuple[tuple[int, int], ...]:
    if padding == "valid":
        return ((0, 0),) * d
    if padding == "same":  # torch pads (total // 2, total - total // 2), total = dilation * (k - 1)
        out = []
        for k, dl in zip(kernel, dilation):
            total = dl * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in _ints(padding, d, "padding", node))


def _candidates(gm: fx.GraphModule, cfg: LowRank) -> tuple[list[_Layer], list[dict]]:
    """Layers to factor, and report rows for the ones left dense."""
    todo: list[_Layer] = []
    skipped: list[dict] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or len(node.args) < 2:
            continue
        is_linear = node.target is _LINEAR
        conv = _conv_args(node)
        if not is_linear and conv is None and node.target not in _TRANSPOSED:
            continue
        w = node.args[1]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        try:
            param = get_attr(gm, w.target)
        except AttributeError:
            continue
        if not isinstance(param, torch.Tensor) or not param.is_floating_point():
            continue
        if is_linear:
            if param.dim() != 2:
                continue
            layer = _Layer(node, w, "linear", tuple(param.shape))
        else:
            d = param.dim() - 2
            layer = _Layer(node, w, f"conv{d}d", tuple(param.shape))
            if node.target in _TRANSPOSED or conv[5]:
                skipped.append({**layer.row(), "skipped": "transposed convolution (not factored)"})
                continue
            d, stride, padding, dilation, groups, _ = conv
            if groups != 1:
                skipped.append({**layer.row(), "skipped": f"grouped convolution (groups={groups}; not factored)"})
                continue
            layer.stride = _ints(stride, d, "stride", node)
            layer.dilation = _ints(dilation, d, "dilation", node)
            layer.padding = _explicit_padding(padding, tuple(param.shape[2:]), layer.dilation, node, d)
        row = layer.row()
        if any(matches_pattern(w.target, p) for p in cfg.ignore):
            skipped.append({**row, "skipped": "ignored"})
        elif min(layer.m, layer.n) < cfg.min_features:
            skipped.append({**row, "skipped": f"fewer than min_features={cfg.min_features} features"})
        elif len(w.users) != 1:
            skipped.append({**row, "skipped": "weight shared with other ops"})
        else:
            todo.append(layer)
    return todo, skipped


def conv_patches(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """im2col for 1d/2d/3d: ``[N, C, *spatial]`` -> ``[N * L, C * prod(kernel)]``.

    Columns are ordered like a flattened conv weight ``[out, C, *kernel]``, so ``patches @ W.reshape(out,
    -1).T`` is the convolution (without bias) in rows of output positions. Equals ``F.unfold`` in 2d.
    """
    d = len(kernel)
    pad: list[int] = []
    for lo, hi in reversed(padding):
        pad += [lo, hi]
    x = F.pad(x, pad) if any(pad) else x
    for i in range(d):
        x = x.unfold(2 + i, (kernel[i] - 1) * dilation[i] + 1, stride[i])
    if any(dl != 1 for dl in dilation):
        x = x[(Ellipsis, *(slice(None, None, dl) for dl in dilation))]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    return x.permute(perm).reshape(-1, x.shape[1] * math.prod(kernel))


@dataclasses.dataclass
class _Stats:
    gram: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0
    calls: int = 0

    @property
    def rows_per_call(self) -> float:
        return self.rows / max(self.calls, 1)


def _observe_inputs(gm: fx.GraphModule, layers: list[_Layer], captured: Captured,
                    calibration: Any) -> dict[str, _Stats]:
    """Gram matrix ``X^T X`` (float64), column sums of ``|X|`` and row counts of each layer's input rows
    (for a convolution: its unfolded input patches) over the calibration batches."""
    want = {layer.node.name: layer for layer in layers}
    stats: dict[str, _Stats] = {}

    def hook(node: fx.Node, value: Any, interp: Any) -> None:
        layer = want.get(node.name)
        if layer is None:
            return
        x = interp.env[layer.node.args[0]].detach()
        if layer.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])
        else:
            if x.dim() == layer.spatial + 1:  # unbatched conv input
                x = x.unsqueeze(0)
            rows = conv_patches(x, layer.weight_shape[2:], layer.stride, layer.padding, layer.dilation)
        st = stats.get(node.name)
        if st is None:
            n = rows.shape[1]
            st = stats[node.name] = _Stats(torch.zeros(n, n, dtype=torch.float64),
                                           torch.zeros(n, dtype=torch.float64))
        for chunk in rows.split(16384):
            c = chunk.double()
            st.gram += c.T @ c
            st.abs_sum += c.abs().sum(0)
        st.rows += rows.shape[0]
        st.calls += 1

    for args, kwargs in iter_batches(calibration, captured):
        observe(gm, args, kwargs, hook)
    return stats


def _free_name(module: torch.nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


class _Decompositions:
    """``decs[node_name] -> (U, S, Vh, T)`` of the layer under ``cfg.method``, computed on first use (layers
    that the rank rule already leaves dense are never decomposed)."""

    def __init__(self, gm: fx.GraphModule, layers: list[_Layer], stats: dict[str, _Stats], cfg: LowRank) -> None:
        self._gm, self._stats, self._cfg = gm, stats, cfg
        self._layers = {layer.node.name: layer for layer in layers}
        self._cache: dict[str, tuple] = {}

    def __getitem__(self, name: str) -> tuple:
        if name not in self._cache:
            weight = get_attr(self._gm, self._layers[name].w_node.target)
            st, cfg = self._stats[name], self._cfg
            if cfg.method == "activation":
                self._cache[name] = decompose(weight, st.gram, cfg.damping)
            elif cfg.method == "asvd":
                self._cache[name] = decompose(weight, scale=asvd_scale(st.abs_sum / max(st.rows, 1)))
            else:
                self._cache[name] = decompose(weight)
        return self._cache[name]


# ------------------------------------------------------------------------------------------------ rewrite
def _rewrite(gm: fx.GraphModule, layer: _Layer, A64: torch.Tensor, B64: torch.Tensor) -> None:
    """Linear(W) -> Linear(B) . Linear(A);  conv_k(W) -> conv_1x1(B) . conv_k(A), in place on ``gm``."""
    node, w_node = layer.node, layer.w_node
    weight = get_attr(gm, w_node.target)
    r = A64.shape[0]
    A = A64.reshape(r, *layer.weight_shape[1:])
    B = B64.reshape(layer.m, r, *([1] * layer.spatial))
    A = torch.nn.Parameter(A.to(weight.dtype).to(weight.device).contiguous(), requires_grad=weight.requires_grad)
    B = torch.nn.Parameter(B.to(weight.dtype).to(weight.device).contiguous(), requires_grad=weight.requires_grad)

    prefix, _, leaf = w_node.target.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    a_name = _free_name(owner, f"{leaf}_lr_a")
    owner.register_parameter(a_name, A)
    b_name = _free_name(owner, f"{leaf}_lr_b")
    owner.register_parameter(b_name, B)
    a_target = f"{prefix}.{a_name}" if prefix else a_name
    b_target = f"{prefix}.{b_name}" if prefix else b_name

    args = list(node.args)
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    with gm.graph.inserting_before(node):
        a_node = gm.graph.get_attr(a_target)
        b_node = gm.graph.get_attr(b_target)
        if layer.kind == "linear":
            inner = gm.graph.call_function(_LINEAR, (args[0], a_node))
            node.args, node.kwargs = (inner, b_node, bias), {}
        else:
            d = layer.spatial
            ones, zeros = [1] * d, [0] * d
            if node.target is _CONVOLUTION:
                inner = gm.graph.call_function(_CONVOLUTION, (args[0], a_node, None, *args[3:6], False, zeros, 1))
                node.args, node.kwargs = (inner, b_node, bias, ones, zeros, ones, False, zeros, 1), {}
            else:  # conv{d}d.default / .padding: same op for the k x k part, conv{d}d.default for the 1x1
                first = [args[0], a_node, None, *args[3:]]
                inner = gm.graph.call_function(node.target, tuple(first), {k: v for k, v in node.kwargs.items() if k != "bias"})
                node.target = _CONV_DEFAULT[d]
                node.args, node.kwargs = (inner, b_node, bias, ones, zeros, ones, 1), {}
    if not w_node.users:
        gm.graph.erase_node(w_node)
        if not any(nd.op == "get_attr" and nd.target == w_node.target for nd in gm.graph.nodes):
            delattr(owner, leaf)


# ------------------------------------------------------------------------------------------------ the pass
def _not_faster(layer: _Layer, r: int, rows: float) -> str:
    kappa, overhead = _COST["linear" if layer.kind == "linear" else "conv"]
    m, n = layer.m, layer.n
    return (f"not faster: {kappa}*r*(m+n)*rows + {overhead:.3g} >= m*n*rows for r={r}, m={m}, n={n}, "
            f"rows={rows:.0f} per call (cost model)")


@register_pass(LowRank)
def run_lowrank(captured: Captured, cfg: LowRank, calibration: Any = None) -> PassResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(captured.module)
    todo, report = _candidates(gm, cfg)
    if not todo:
        return PassResult(captured, False, report, "LowRank")
    stats = _observe_inputs(gm, todo, captured, calibration)

    reached: list[_Layer] = []
    for layer in todo:
        if layer.node.name not in stats:
            report.append({**layer.row(), "skipped": "not reached by the calibration data"})
        else:
            reached.append(layer)

    decs = _Decompositions(gm, reached, stats, cfg)
    if cfg.allocation == "global":
        ranks, dense_reason = _global_ranks(gm, reached, stats, decs, cfg)
    else:
        ranks, dense_reason = _uniform_ranks(reached, stats, decs, cfg)

    modified = False
    for layer in reached:
        name = layer.node.name
        row = layer.row()
        r = ranks[name]
        if r == 0:
            report.append({**row, **dense_reason[name]})
            continue
        weight = get_attr(gm, layer.w_node.target)
        A64, B64 = factors_from(*decs[name], r)
        err = relative_output_error(weight, B64 @ A64, stats[name].gram)
        _rewrite(gm, layer, A64, B64)
        modified = True
        report.append({**row, "rank": int(r), "params_after": int(r * (layer.m + layer.n)),
                       "relative_error": err, "method": cfg.method, "allocation": cfg.allocation,
                       "rows_per_call": stats[name].rows_per_call})

    order = {nd.name: i for i, nd in enumerate(captured.module.graph.nodes)}
    report.sort(key=lambda row: order.get(row["node"], len(order)))
    if not modified:
        return PassResult(captured, False, report, "LowRank")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(captured.recapture(gm), True, report, "LowRank")


def _uniform_ranks(layers, stats, decs, cfg: LowRank) -> tuple[dict[str, int], dict[str, dict]]:
    """Each layer's rank from the config alone; 0 (dense) where the cost model says it does not pay."""
    ranks: dict[str, int] = {}
    reasons: dict[str, dict] = {}
    for layer in layers:
        name, m, n = layer.node.name, layer.m, layer.n
        r = choose_rank(cfg, m, n, decs[name][1] if cfg.energy is not None else None)
        ranks[name] = r
        if not cfg.cost_model:
            continue
        if r * (m + n) >= m * n:
            ranks[name], reasons[name] = 0, {"rank": r, "skipped": "no saving"}
        elif not factored_is_faster(m, n, r, stats[name].rows_per_call, layer.kind):
            ranks[name] = 0
            reasons[name] = {"rank": r, "skipped": _not_faster(layer, r, stats[name].rows_per_call)}
    return ranks, reasons


def _global_ranks(gm, layers, stats, decs, cfg: LowRank) -> tuple[dict[str, int], dict[str, dict]]:
    """Ranks from one budget over all layers that can be factored (``allocate_global``).

    Layers that the cost model never lets factor (no rank is faster) stay dense and are not part of the
    budget; the budget is ``param_ratio`` times the dense cost of the others.
    """
    ranks: dict[str, int] = {}
    reasons: dict[str, dict] = {}
    choices: list[_Choice] = []
    uniform: list[int] = []
    chosen: list[_Layer] = []
    for layer in layers:
        name, m, n = layer.node.name, layer.m, layer.n
        rows = stats[name].rows_per_call
        max_rank = max_fast_rank(m, n, rows, layer.kind) if cfg.cost_model else min(m, n)
        if max_rank < 1:
            ranks[name] = 0
            reasons[name] = {"skipped": _not_faster(layer, 1, rows).replace("for r=1", "even at rank 1")}
            continue
        U, S, Vh, T = decs[name]
        if cfg.method == "activation":
            err = whitened_error_curve(S)
        else:
            err = error_curve(get_attr(gm, layer.w_node.target), U, S, Vh, T, stats[name].gram)
        scale = rows if cfg.target == "macs" else 1.0
        choices.append(_Choice(err, (m + n) * scale, m * n * scale, max_rank))
        r = choose_rank(cfg, m, n)
        uniform.append(r if r <= max_rank else 0)
        chosen.append(layer)
    if not choices:
        return ranks, reasons
    budget = cfg.param_ratio * sum(c.dense for c in choices)
    alloc = allocate_global(choices, budget)
    # the uniform allocation is a feasible point too whenever it fits: never return a worse one
    if _cost(choices, uniform) <= budget and _error(choices, uniform) < _error(choices, alloc):
        alloc = uniform
    unit = "MACs" if cfg.target == "macs" else "params"
    for layer, r in zip(chosen, alloc):
        ranks[layer.node.name] = r
        if r == 0:
            reasons[layer.node.name] = {"skipped": f"global allocation: dense is the best use of the {unit} budget"}
    return ranks, reasons
