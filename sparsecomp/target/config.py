"""``Target``: what ``compress_to_target`` must reach, as measured on a backend of this machine."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..config import check_choice, check_positive_int, is_number
from ..errors import ConfigError
from .latency import BACKENDS


@dataclasses.dataclass(frozen=True)
class Target:
    """A measured speedup over the dense model on ``backend``, ``batch`` rows, ``threads`` threads.

    Parameters
    ----------
    speedup:
        Dense latency / compressed latency to reach (> 1), both measured end to end on ``backend``.
    backend:
        ``"torch"`` (the captured graph run eagerly), ``"ort"`` (ONNX Runtime) or ``"tvm"``.
    batch, threads:
        Batch size the latency is measured at (dim 0 of every input is cut or repeated to it) and
        intra-op threads of the backend.
    tolerance:
        Measurement noise accepted: the target is met when the measured speedup is at least
        ``speedup * (1 - tolerance)`` (default 0: strictly).
    max_tries:
        Compressions the search may run (each one is measured end to end).
    round_to:
        Channel multiple kept by the pruning, or ``"auto"``: measured for the backend
        (:func:`sparsecomp.target.widths.suitable_round_to`).
    max_ratio:
        Largest fraction of the model's MACs the search may remove.
    rounds:
        Interleaved timing rounds of each end-to-end comparison (dense and candidate).

    >>> Target(speedup=2.0, backend="ort")  # doctest: +ELLIPSIS
    Target(speedup=2.0, backend='ort', ...)
    """

    speedup: float
    backend: str = "torch"
    batch: int = 1
    threads: int = 1
    tolerance: float = 0.0
    max_tries: int = 4
    round_to: int | str = "auto"
    max_ratio: float = 0.85
    rounds: int = 3

    def __post_init__(self) -> None:
        if not is_number(self.speedup) or not self.speedup > 1.0:
            raise ConfigError(f"Target.speedup must be a number > 1 (dense / compressed latency), got {self.speedup!r}")
        check_choice("Target.backend", self.backend, BACKENDS)
        for name in ("batch", "threads", "max_tries", "rounds"):
            check_positive_int(f"Target.{name}", getattr(self, name))
        if not is_number(self.tolerance) or not 0.0 <= self.tolerance < 0.2:
            raise ConfigError(f"Target.tolerance must be in [0, 0.2), got {self.tolerance!r}")
        if self.round_to != "auto":
            check_positive_int("Target.round_to", self.round_to)
        if not is_number(self.max_ratio) or not 0.0 < self.max_ratio < 1.0:
            raise ConfigError(f"Target.max_ratio must be in (0, 1), got {self.max_ratio!r}")

    @property
    def threshold(self) -> float:
        """The lowest measured speedup that counts as meeting the target."""
        return self.speedup * (1.0 - self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "Target", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Target":
        data = dict(data)
        if data.pop("type", "Target") != "Target":
            raise ConfigError(f"Target.from_dict got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Target has no field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


__all__ = ["Target"]
