"""Public entry points: ``capture``, ``dependency_graph``, ``compress``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from .capture.export import Captured, capture
from .config import PassConfig
from .errors import ConfigError, VerificationError
from .graph.depgraph import DependencyGraph
from .graph.registry import OpRule
from .passes.base import run_pass


def _as_captured(model: Any, example_inputs: Any, example_kwargs: dict | None) -> Captured:
    if isinstance(model, Captured):
        return model
    return capture(model, example_inputs, example_kwargs)


def dependency_graph(
    model: Any,
    example_inputs: Any = None,
    example_kwargs: dict | None = None,
    *,
    rules: Mapping[Any, OpRule] | None = None,
    prune_norm_dims: bool = False,
) -> DependencyGraph:
    """Capture ``model`` and build its dependency graph (``.groups``, ``.summary()``, ``.to_networkx()``).

    ``rules`` adds or replaces op rules (``{aten.my_op.default: OpRule(propagate, rewrite)}``).
    """
    return DependencyGraph.build(_as_captured(model, example_inputs, example_kwargs), rules, prune_norm_dims)


def _signature(out: Any) -> list[tuple]:
    leaves, spec = pytree.tree_flatten(out)
    return [str(spec)] + [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in leaves]


def compress(
    model: Any,
    example_inputs: Any,
    config_or_list: PassConfig | Sequence[PassConfig],
    calibration: Any = None,
    example_kwargs: dict | None = None,
) -> torch.nn.Module:
    """Compress ``model`` with one config or a list of configs applied in order; returns a new module.

    The result is an ATen-level ``torch.fx.GraphModule`` called like the original (same positional and
    keyword inputs, same output structure); its weights are physically smaller. ``model`` is not modified.
    Each pass is checked: the new graph re-exports, runs on the example inputs, and keeps the interface.
    The per-pass reports are attached as ``result.sparsecomp_report``.

    Examples
    --------
    >>> import sparsecomp, torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> small = sparsecomp.compress(m, (torch.randn(2, 8),), sparsecomp.StructuredPruning(ratio=0.5))
    >>> small(torch.randn(5, 8)).shape
    torch.Size([5, 4])
    """
    configs = [config_or_list] if isinstance(config_or_list, PassConfig) else list(config_or_list)
    if not configs:
        raise ConfigError("compress needs at least one config")
    for c in configs:
        if not isinstance(c, PassConfig):
            raise ConfigError(f"expected a sparsecomp config, got {type(c).__name__}")
    captured = _as_captured(model, example_inputs, example_kwargs)
    reference = _signature(captured.run())
    reports = []
    for cfg in configs:
        result = run_pass(captured, cfg, calibration)
        if result.modified:
            got = _signature(result.captured.run())
            if got != reference:
                raise VerificationError(result.name, f"output structure changed: {reference} -> {got}")
        captured = result.captured
        reports.append({"pass": result.name, "config": cfg.to_dict(), "modified": result.modified,
                        "layers": result.report})
    out = captured.module
    out.sparsecomp_report = reports
    return out
