"""Calibration data handling: normalise what users pass, and run a captured graph while observing nodes."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree

from .capture.export import Captured
from .errors import ConfigError


def iter_batches(calibration: Any, captured: Captured) -> Iterator[tuple[tuple, dict]]:
    """Yield ``(args, kwargs)`` batches from tensors, tuples, dicts or any iterable (e.g. a DataLoader).

    ``None`` means "use the capture's example inputs". A single tensor, a tuple of tensors, or a dict of
    keyword tensors is one batch; a list (or other iterable) holds one batch per item.
    """
    if calibration is None:
        yield captured.example_args, captured.example_kwargs
        return
    if isinstance(calibration, (torch.Tensor, tuple, dict)):
        calibration = [calibration]
    if not isinstance(calibration, Iterable):
        raise ConfigError(f"calibration must be tensors, tuples, dicts or an iterable of them, got {type(calibration).__name__}")
    n = 0
    for item in calibration:
        n += 1
        if isinstance(item, torch.Tensor):
            yield (item,), {}
        elif isinstance(item, dict):
            yield (), dict(item)
        elif isinstance(item, (tuple, list)):
            if item and isinstance(item[-1], dict):
                yield tuple(item[:-1]), dict(item[-1])
            else:
                yield tuple(item), {}
        else:
            raise ConfigError(f"calibration batch {n} has unsupported type {type(item).__name__}")
    if n == 0:
        raise ConfigError("calibration is empty")


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The placeholder values of an exported graph module for a call with ``args``/``kwargs``."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return list(args)
    return fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec)


class _Observer(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, hook: Callable[[fx.Node, Any, "_Observer"], None]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._hook = hook

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self._hook(n, out, self)
        return out


def observe(gm: fx.GraphModule, args: tuple, kwargs: dict,
            hook: Callable[[fx.Node, Any, Any], None]) -> Any:
    """Run ``gm`` node by node, calling ``hook(node, value, interpreter)`` after each node."""
    with torch.no_grad():
        return _Observer(gm, hook).run(*flat_inputs(gm, args, kwargs))
