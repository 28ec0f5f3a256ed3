"""Calibration data handling: normalise what users pass, and run a captured graph while observing nodes."""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

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


def progress_bar(items: Sequence[Any], desc: str, enabled: bool) -> Iterable[Any]:
    """``items`` wrapped in a tqdm bar on stderr when ``enabled`` and tqdm is installed, else ``items``."""
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


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
                    masks: list[Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """Input statistics of the given ``linear``/``conv2d`` nodes over the calibration batches.

    Returns ``{node name: Moments}`` with ``X^T X``, the input sum and row count (``Moments.xx/x/n``) and
    the output energy ``sum ||y||^2`` in ``Moments.yy``. Memory is one ``d_in x d_in`` matrix per node
    (float64); activations are dropped as soon as the graph no longer needs them. Padding rows are skipped
    (``masks``, one per batch, from :func:`token_masks`).
    """
    from .reconstruct import Moments, input_rows, output_rows

    wanted = {n: n.args[0] for n in nodes}
    masks = masks if masks is not None else [None] * len(batches)
    stats: dict[str, Any] = {}
    for i in progress_bar(range(len(batches)), "calibration", progress):
        mask = masks[i]

        def hook(node: fx.Node, value: Any, interp: Any) -> None:
            if node in wanted:
                xr = input_rows(node, interp.env[wanted[node]], mask)
                yr = output_rows(node, value, mask)
                mom = stats.get(node.name)
                if mom is None:
                    mom = stats[node.name] = Moments.zeros(xr.shape[1])
                mom.add(xr)
                mom.yy += float((yr.double() ** 2).sum())

        with torch.no_grad():
            _Observer(gm, hook).run(*batches[i])
    return stats
