"""The math of LowRank: whitened / scaled SVD, rank choice, error curves and the measured cost model."""

from __future__ import annotations

import math

import torch

from ...errors import ConfigError
from .config import ASVD_ALPHA, LowRank

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
