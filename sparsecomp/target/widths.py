"""Backend-suitable widths (issue 25.12): measure which channel counts stay on a backend's fast path.

EfficientNet-Lite0 pruned to half its MACs ran at 0.66x the dense speed in ONNX Runtime: odd channel
counts fell off its fast convolution kernels. :func:`suitable_round_to` times one representative op of
the model (its largest linear or conv, at the model's own rows / image size) at every width of a window
below half its width, and returns the smallest multiple ``m`` (of :data:`CANDIDATES`) such that every
width that is a multiple of ``m`` is *fast*: no wider width in the window is faster than it by more than
``tolerance``. ``compress_to_target`` passes the answer to ``StructuredPruning(round_to=...)``. The timings
go into the backend's :class:`~sparsecomp.target.latency.LatencyTable`, so a second call is free.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from ..errors import ConfigError
from .latency import LatencyTable, OpKey, model_ops

#: the multiples tried, smallest first
CANDIDATES = (1, 2, 4, 8, 16, 32)
#: the dim of each op kind that pruning shrinks (its output channels)
PRUNED_DIM = {"linear": "out", "conv2d": "cout"}


@dataclasses.dataclass(frozen=True)
class WidthChoice:
    """What :func:`suitable_round_to` found: ``round_to``, the op it timed, and ``(width, ms, fast)`` rows."""

    round_to: int
    op: str
    widths: tuple[tuple[int, float, bool], ...]

    def summary(self) -> str:
        slow = [w for w, _, fast in self.widths if not fast]
        return (f"round_to={self.round_to} for {self.op} (widths {self.widths[0][0]}-{self.widths[-1][0]} timed; "
                f"{len(slow)} off the fast path{': ' + ', '.join(map(str, slow[:8])) if slow else ''})")


def representative_op(model: Any, inputs: tuple) -> OpKey:
    """The model's op of :data:`PRUNED_DIM` kind with the largest weight (out x in), at its shape."""
    best, size = None, -1
    for _, key in model_ops(model, inputs):
        d = dict(key.dims)
        if key.kind == "linear":
            n = d["in"] * d["out"]
        elif key.kind == "conv2d" and d["groups"] == 1:
            n = d["cin"] * d["cout"] * d["kh"] * d["kw"] * d["h"] * d["w"]
        else:
            continue
        if n > size:
            best, size = key, n
    if best is None:
        raise ConfigError("suitable_round_to: the model has no linear or (non-grouped) conv2d to time")
    return best


def _with_width(key: OpKey, width: int) -> OpKey:
    dim = PRUNED_DIM[key.kind]
    return OpKey(key.kind, tuple((k, width if k == dim else v) for k, v in key.dims))


def suitable_round_to(table: LatencyTable, op: OpKey, *, candidates: Sequence[int] = CANDIDATES,
                      tolerance: float = 0.05, progress: bool = False) -> WidthChoice:
    """The smallest ``round_to`` whose widths are all on ``table.backend``'s fast path for ``op``.

    The window is the ``max(candidates)`` widths ending at the multiple of ``max(candidates)`` nearest half
    of ``op``'s width (where a pruned model's widths lie), both ends included.
    """
    if op.kind not in PRUNED_DIM:
        raise ConfigError(f"suitable_round_to times {sorted(PRUNED_DIM)} ops, got {op.kind!r}")
    if not candidates or any(not isinstance(c, int) or c < 1 for c in candidates):
        raise ConfigError(f"candidates must be positive integers, got {candidates!r}")
    step = max(candidates)
    full = op.get(PRUNED_DIM[op.kind])
    top = max(step, round(full / 2 / step) * step)
    widths = list(range(max(1, top - step), top + 1))
    table.measure_all((_with_width(op, w) for w in widths), progress)
    ms = {w: table.ms(_with_width(op, w)) for w in widths}
    fast = {w: ms[w] <= (1 + tolerance) * min(ms[v] for v in widths if v >= w) for w in widths}
    chosen = max(candidates)
    for m in sorted(candidates):
        if all(fast[w] for w in widths if w % m == 0):
            chosen = m
            break
    return WidthChoice(chosen, str(op), tuple((w, ms[w], fast[w]) for w in widths))


__all__ = ["CANDIDATES", "WidthChoice", "representative_op", "suitable_round_to"]
