"""The LowRank config: what to factor, how ranks are chosen, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


from ...config import PassConfig, check_choice, check_positive_int, is_number, name_patterns, register_config
from ...errors import ConfigError

METHODS = ("svd", "activation", "asvd")
ALLOCATIONS = ("uniform", "global")
TARGETS = ("params", "macs")
COST_POLICIES = ("auto", "always", "never")

#: ASVD's exponent of the per-column activation scale (alpha = 0.5 in the ASVD paper).
ASVD_ALPHA = 0.5


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
        ``"auto"`` (default): a layer stays dense when ``r*(m+n) >= m*n`` or when the factored pair is not
        predicted to be faster on CPU (``factored_is_faster``). ``"always"``: factor at the chosen rank
        regardless (e.g. to check that full rank reproduces the model). ``"never"``: the chosen rank-r
        approximation stored back into the dense weight, no second op (the accuracy of the ranks without
        the factored form), as ``Sparsify(cost_model=...)``.

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
    cost_model: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", name_patterns("ignore", self.ignore))
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
        check_choice("method", self.method, METHODS)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("target", self.target, TARGETS)
        if self.allocation == "global" and self.param_ratio is None:
            raise ConfigError(
                f"allocation='global' needs param_ratio (the global budget), got {chosen[0]}"
            )
        check_positive_int("min_features", self.min_features)
        d = self.damping
        if not is_number(d) or d <= 0:
            raise ConfigError(f"damping must be a positive number, got {d!r}")
        if isinstance(self.cost_model, bool):
            raise ConfigError(f"cost_model is one of {COST_POLICIES} (as in Sparsify), not a bool: "
                              f"{self.cost_model!r} was {'auto' if self.cost_model else 'always'!r}")
        if self.cost_model not in COST_POLICIES:
            raise ConfigError(f"cost_model must be one of {COST_POLICIES}, got {self.cost_model!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd" or self.allocation == "global"


def _check_number(name: str, v: Any, *, upper_inclusive: bool) -> None:
    ok = is_number(v) and 0.0 < v and (v <= 1.0 if upper_inclusive else v < 1.0)
    if not ok:
        interval = "(0, 1]" if upper_inclusive else "(0, 1)"
        raise ConfigError(f"{name} must be a number in {interval}, got {v!r}")
