"""Public entry points: ``capture``, ``dependency_graph``, ``compress``."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from .capture.export import Captured, capture
from .config import PassConfig
from .errors import ConfigError, VerificationError
from .graph.depgraph import DependencyGraph
from .graph.registry import OpRule
from .passes.base import PassContext, run_pass


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
    original = captured
    reference = _signature(captured.run())
    drift_inputs = _drift_inputs(captured, calibration)
    reference_out = _outputs(captured.module, drift_inputs)
    reports = []
    context = PassContext(original=captured)  # the teacher of Recover; no pass modifies it
    for cfg in configs:
        result = run_pass(captured, cfg, calibration, context)
        if result.modified:
            got = _signature(result.captured.run())
            if got != reference:
                raise VerificationError(result.name, f"output structure changed: {reference} -> {got}")
        captured = result.captured
        entry = {"pass": result.name, "config": cfg.to_dict(), "modified": result.modified,
                 "layers": result.report, **result.notes}
        entry["output_error"] = _relative_error(_outputs(captured.module, drift_inputs), reference_out)
        _warn_unknown_ops(result.name, result.notes.get("unknown_ops"))
        reports.append(entry)
    if original.notes:
        reports[0]["capture"] = list(original.notes)
    err = reports[-1]["output_error"]
    where = "the calibration data" if calibration is not None else "the example inputs"
    if err is not None and err > LARGE_OUTPUT_ERROR:
        warnings.warn(
            f"compress: the output moved by {err:.3g} (relative L2 error on {where}) from the original model's; "
            "check the result on your task before using it"
            + ("" if calibration is not None else ", and consider passing calibration= for data-driven pruning")
            + ". Each pass's figure is in result.sparsecomp_report[i]['output_error'].", stacklevel=2)
    out = captured.module
    out.sparsecomp_report = reports
    return out


#: relative L2 output error above which ``compress`` warns
LARGE_OUTPUT_ERROR = 0.1
#: calibration samples (rows of the batch dim, at most this many, from the first batches) on which
#: ``compress`` measures the output error: enough to warn, a fraction of the cost of a calibration pass
DRIFT_SAMPLES = 8


def _drift_inputs(captured: Captured, calibration: Any) -> list[tuple[tuple, dict]]:
    from .calibration.data import iter_batches

    if calibration is None:
        return [(captured.example_args, captured.example_kwargs)]
    out, left = [], DRIFT_SAMPLES
    for args, kwargs in iter_batches(calibration, captured):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0]
        n = leaves[0].shape[0] if leaves else 1
        if leaves and n > left and all(t.shape[0] == n for t in leaves):
            cut = lambda t: t[:left] if isinstance(t, torch.Tensor) and t.dim() > 0 else t  # noqa: E731
            args, kwargs, n = pytree.tree_map(cut, args), pytree.tree_map(cut, kwargs), left
        out.append((args, kwargs))
        left -= n
        if left <= 0:
            break
    return out


def _outputs(module: torch.nn.Module, inputs: list[tuple[tuple, dict]]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [[t for t in pytree.tree_leaves(module(*a, **k)) if isinstance(t, torch.Tensor)
                 and t.is_floating_point()] for a, k in inputs]


def _relative_error(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float | None:
    """``||got - want|| / ||want||`` over every floating output of every batch."""
    num = den = 0.0
    for gs, ws in zip(got, want):
        for g, w in zip(gs, ws):
            if g.shape != w.shape:
                return None
            for gc, wc in zip(g.reshape(-1).split(1 << 20), w.reshape(-1).split(1 << 20)):  # bounded memory
                num += float(((gc.double() - wc.double()) ** 2).sum())
                den += float((wc.double() ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return round((num / den) ** 0.5, 6)


def _warn_unknown_ops(name: str, unknown: dict | None) -> None:
    if not unknown:
        return
    ops = ", ".join(f"{op} (x{n})" for op, n in unknown["ops"].items())
    share = ("" if unknown["frozen_fraction"] is None else
             f"; they kept {unknown['frozen_params']} parameters ({100 * unknown['frozen_fraction']:.1f} % of the "
             "model) out of every prunable group")
    warnings.warn(f"{name}: ops without a sparsecomp rule fixed the dims they touch: {ops}{share}. Add an "
                  "OpRule for them (docs/ARCHITECTURE.md, 'Adding an op rule') to compress those parts.",
                  stacklevel=3)
