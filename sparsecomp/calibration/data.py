"""Calibration data handling: normalise what users pass, and run a captured graph while observing nodes."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch.fx import _pytree as fx_pytree

from ..capture.export import Captured
from ..errors import ConfigError


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


#: Seconds a step runs before its progress shows (quick steps stay silent).
PROGRESS_DELAY = 2.0


class _Lines:
    """A progress counter without tqdm: one stderr line every few seconds with the elapsed time and an
    estimate of the time left (iterate over it, or call ``update``/``close``)."""

    def __init__(self, items: Iterable[Any] | None, desc: str, total: int | None) -> None:
        self.items, self.desc = items, desc
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        self.n, self.start, self.last = 0, time.perf_counter(), 0.0

    def __iter__(self) -> Iterator[Any]:
        for item in self.items:
            yield item
            self.update()
        self.close()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter() - self.start
        if now >= PROGRESS_DELAY and now - self.last >= PROGRESS_DELAY:
            self.last = now
            left = ""
            if self.total:
                left = f", about {now * (self.total - self.n) / max(self.n, 1):.0f} s left"
            print(f"{self.desc}: {self.n}/{self.total or '?'} after {now:.0f} s{left}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def progress_bar(items: Iterable[Any] | None, desc: str, enabled: bool, total: int | None = None) -> Any:
    """``items`` wrapped in a progress bar on stderr when ``enabled`` (tqdm when installed, else lines with
    the time left), shown once the step has run ``PROGRESS_DELAY`` seconds; ``items=None`` gives a counter
    to ``update(k)`` and ``close()`` (``total`` steps)."""
    if not enabled:
        return items if items is not None else _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Lines(items, desc, total)
    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True,
                delay=PROGRESS_DELAY)


class _Silent:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


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


# ------------------------------------------------------------------------------------------------ statistics
def flat_batches(calibration: Any, captured: Captured) -> list[list[Any]]:
    """Every calibration batch as the flat placeholder values of ``captured.module`` (deterministic order)."""
    return [list(flat_inputs(captured.module, a, k)) for a, k in iter_batches(calibration, captured)]


def token_masks(gm: fx.GraphModule, batches: list[list[Any]], mask_input: str | None) -> list[Any]:
    """Per batch, the value of the placeholder named ``mask_input`` (e.g. ``"attention_mask"``) or ``None``.

    Statistics keep only activation rows where this mask is non-zero (padding is ignored) for activations
    whose leading dims match the mask; see :func:`sparsecomp.calibration.reconstruct.token_rows`.
    """
    if mask_input is None:
        return [None] * len(batches)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if mask_input not in names:
        return [None] * len(batches)
    i = names.index(mask_input)
    return [b[i] if isinstance(b[i], torch.Tensor) else None for b in batches]


def collect_moments(gm: fx.GraphModule, batches: list[list[Any]], nodes: Iterable[fx.Node],
                    masks: list[Any] | None = None, progress: bool = False,
                    diagonal: bool = False) -> dict[str, Any]:
    """Input statistics of the given ``linear``/``conv2d`` nodes over the calibration batches.

    Returns ``{node name: Moments}`` with ``X^T X``, the input sum and row count (``Moments.xx/x/n``) and
    the output energy ``sum ||y||^2`` in ``Moments.yy``. Memory is one ``d_in x d_in`` matrix per node
    (float64), or one vector with ``diagonal`` (per-column sums of squares only); activations are dropped
    as soon as the graph no longer needs them. Padding rows are skipped (``masks``, one per batch, from
    :func:`token_masks`).
    """
    from .reconstruct import Moments, input_rows, output_rows, sum_squares

    wanted = {n: n.args[0] for n in nodes}
    masks = masks if masks is not None else [None] * len(batches)
    stats: dict[str, Any] = {}
    bar = progress_bar(None, "calibration statistics", progress, total=len(batches) * len(gm.graph.nodes))
    for i in range(len(batches)):
        mask = masks[i]

        def hook(node: fx.Node, value: Any, interp: Any) -> None:
            bar.update()
            if node in wanted:
                xr = input_rows(node, interp.env[wanted[node]], mask)
                yr = output_rows(node, value, mask)
                mom = stats.get(node.name)
                if mom is None:
                    mom = stats[node.name] = Moments.zeros(xr.shape[1], diagonal=diagonal)
                mom.add(xr)
                mom.yy += sum_squares(yr)

        with torch.no_grad():
            _Observer(gm, hook).run(*batches[i])
    bar.close()
    return stats
