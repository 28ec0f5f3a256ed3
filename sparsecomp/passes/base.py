"""Pass infrastructure: a pass maps a ``Captured`` graph to a new one and reports what it did.

A pass never mutates its input (``Captured.module`` is copied before edits); its result carries the new
captured graph, whether anything changed, and a per-layer report for ``sparsecomp.report``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
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


PassFn = Callable[[Captured, Any, Any], PassResult]
_PASSES: dict[type, PassFn] = {}


def register_pass(config_type: type[PassConfig]) -> Callable[[PassFn], PassFn]:
    """Register the function that runs configs of ``config_type``: ``fn(captured, config, calibration)``."""

    def deco(fn: PassFn) -> PassFn:
        if config_type in _PASSES:
            raise ConfigError(f"a pass for {config_type.__name__} is registered twice")
        _PASSES[config_type] = fn
        return fn

    return deco


def run_pass(captured: Captured, config: PassConfig, calibration: Any = None) -> PassResult:
    fn = _PASSES.get(type(config))
    if fn is None:
        raise ConfigError(
            f"no pass for config {type(config).__name__}; known: {sorted(t.__name__ for t in _PASSES)}"
        )
    return fn(captured, config, calibration)


def matches_pattern(name: str, pattern: str) -> bool:
    """``ignore``/``per_layer`` matching: fnmatch on the parameter name or its module, or a module prefix."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return (
        fnmatch.fnmatchcase(name, pattern)
        or fnmatch.fnmatchcase(module, pattern)
        or name.startswith(pattern + ".")
    )
