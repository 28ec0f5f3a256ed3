"""Pass infrastructure: a pass maps a ``Captured`` graph to a new one and reports what it did.

A pass never mutates its input (it edits a copy of ``Captured.module`` that shares the weights it leaves
alone, and replaces the tensors it changes); its result carries the new captured graph, whether anything
changed, a per-layer report for ``sparsecomp.report``, and in ``notes["time"]`` the seconds it took (per
phase where the pass records them) and the process's peak resident memory so far.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import resource
import time
from typing import Any, Callable

from ..capture.export import Captured
from ..config import PassConfig
from ..errors import ConfigError


@dataclasses.dataclass
class PassResult:
    captured: Captured
    modified: bool
    report: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    name: str = ""
    #: what the pass decided beyond its config (solved fractions, swapped criteria, skipped layers)
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may see besides its input graph: ``original``, the graph as captured before the first
    pass of a ``compress`` list (the teacher of ``Recover``). Passes must not modify it."""

    original: Captured | None = None


PassFn = Callable[..., PassResult]
_PASSES: dict[type, tuple[PassFn, bool]] = {}


def register_pass(config_type: type[PassConfig], context: bool = False) -> Callable[[PassFn], PassFn]:
    """Register the function that runs configs of ``config_type``: ``fn(captured, config, calibration)``,
    or ``fn(captured, config, calibration, context)`` with ``context=True`` (a :class:`PassContext`)."""

    def deco(fn: PassFn) -> PassFn:
        if config_type in _PASSES:
            raise ConfigError(f"a pass for {config_type.__name__} is registered twice")
        _PASSES[config_type] = (fn, context)
        return fn

    return deco


def run_pass(captured: Captured, config: PassConfig, calibration: Any = None,
             context: PassContext | None = None) -> PassResult:
    """Run the pass registered for ``type(config)`` (passes registered with ``context=True`` also get
    ``context``).

    ``"auto"`` settings are resolved first (``config.resolve(has_calibration)``); the result's
    ``notes["resolved"]`` holds the resolved config. A config whose settings read calibration data
    (``needs_calibration``) with ``calibration=None`` raises :class:`ConfigError`: the capture's example
    inputs are never used as calibration data behind the user's back.
    """
    entry = _PASSES.get(type(config))
    if entry is None:
        raise ConfigError(
            f"no pass for config {type(config).__name__}; known: {sorted(t.__name__ for t in _PASSES)}"
        )
    resolved = config.resolve(calibration is not None)
    if calibration is None and getattr(resolved, "needs_calibration", False):
        raise ConfigError(
            f"{config.type_name}: {_data_settings(resolved)} needs calibration data, and none was given. Pass "
            "calibration= to compress (CLI: --calibration FILE; torch.compile: options={'calibration': ...}), "
            "or use the data-free settings (e.g. StructuredPruning(criterion='auto') without calibration)."
        )
    fn, wants_context = entry
    start = time.perf_counter()
    result = fn(captured, resolved, calibration, context) if wants_context else fn(captured, resolved, calibration)
    result.notes["time"] = {"seconds": round(time.perf_counter() - start, 2), **result.notes.pop("timing", {}),
                            "peak_rss_mib": peak_rss_mib()}
    result.notes.setdefault("resolved", resolved.to_dict())
    result.notes.setdefault("calibration", "none" if calibration is None else "given")
    return result


def peak_rss_mib() -> int:
    """The process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) // 1024


class Stopwatch:
    """Seconds per named phase of a pass (``lap(name)`` closes the phase that started at the last lap)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[f"{name}_s"] = round(now - self._last, 2)
        self._last = now


def _data_settings(config: PassConfig) -> str:
    names = ("criterion", "method", "allocation", "reconstruct")
    if not any(hasattr(config, n) for n in names[:2]):  # no criterion: the amount itself is data-driven
        names = ("ratio", "reconstruct")
    shown = [f"{n}={getattr(config, n)!r}" for n in names if hasattr(config, n)]
    return ", ".join(shown)


def matches_pattern(name: str, pattern: str) -> bool:
    """``ignore``/``per_layer`` matching: fnmatch on the parameter name or its module, or a module prefix."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return (
        fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(module, pattern)
        or name.startswith(pattern + ".")
    )
