"""Size, compute and latency metrics for dense and compressed modules.

The three measurements used throughout sparsecomp's reports:

* :func:`count_params` -- number of stored weight elements, counted the same
  way for an eager ``nn.Module`` and for a ``torch.fx.GraphModule`` produced by
  ``torch.export`` (whose weights may live in buffers or plain constant
  attributes rather than in ``nn.Parameter`` objects).
* :func:`count_macs` -- multiply-accumulates of one forward call (the one MAC model,
  :mod:`sparsecomp.graph.macs`).
* :func:`measure_latency` -- wall-clock latency statistics of a callable with a
  fixed intra-op thread count, under :func:`torch.inference_mode`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..graph.macs import count_macs

__all__ = [
    "LatencyStats",
    "ModuleProfile",
    "count_macs",
    "count_params",
    "measure_latencies",
    "measure_latency",
    "profile_module",
]


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------


def _resolve_attr(root: nn.Module, target: str) -> Any:
    """Follow a dotted ``get_attr`` target from ``root``; ``None`` if missing."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _graph_constants(module: nn.Module) -> Iterator[torch.Tensor]:
    """Yield tensors referenced by ``get_attr`` nodes of every GraphModule in ``module``."""
    for sub in module.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op != "get_attr":
                continue
            value = _resolve_attr(sub, str(node.target))
            if isinstance(value, torch.Tensor):
                yield value


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of the memory a tensor views, used to de-duplicate shared weights."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
        ptr = 0
    if ptr == 0:  # meta / fake / storage-less tensors: fall back to object identity
        return ("id", id(t))
    return ("mem", t.device.type, ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def count_params(module: nn.Module | torch.export.ExportedProgram) -> int:
    """Count the weight elements stored by a module.

    The rule, applied identically to eager modules and exported GraphModules:

    1. every ``nn.Parameter`` (any dtype);
    2. every *floating-point* buffer (e.g. weights that ``torch.export`` or a
       compiler pass turned into buffers, BatchNorm running statistics);
    3. every *floating-point* tensor reached by a ``get_attr`` node of a
       ``torch.fx.GraphModule`` (lifted constants) that is neither of the above.

    Integer / boolean buffers (token-type ids, position ids,
    ``num_batches_tracked``, masks) are bookkeeping, not weights, and are not
    counted. Tensors are de-duplicated by the memory they view (storage pointer,
    offset, shape and stride), so tied weights and a tensor registered under
    several names are counted once.

    Parameters
    ----------
    module : nn.Module or torch.export.ExportedProgram
        The module to inspect. An ``ExportedProgram`` is counted through
        ``program.module()``.

    Returns
    -------
    int
        Number of scalar elements.

    Examples
    --------
    >>> count_params(nn.Linear(3, 2))
    8
    """
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_params expects an nn.Module, got {type(module).__name__}")

    seen: set[tuple[Any, ...]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = _tensor_key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()

    for _, p in module.named_parameters(remove_duplicate=False):
        add(p)
    for _, b in module.named_buffers(remove_duplicate=False):
        if b.is_floating_point() or b.is_complex():
            add(b)
    for c in _graph_constants(module):
        if c.is_floating_point() or c.is_complex():
            add(c)
    return total


# ---------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------


def _as_args(args: Any) -> tuple[Any, ...]:
    if isinstance(args, tuple):
        return args
    if isinstance(args, list):
        return tuple(args)
    return (args,)



# ---------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Latency statistics of repeated calls, all in milliseconds.

    Attributes
    ----------
    median_ms : float
        Median latency of one call.
    p10_ms, p90_ms : float
        10th and 90th percentile latency of one call.
    n : int
        Number of timed calls.
    threads : int
        Intra-op thread count used for the measurement.
    samples_ms : tuple of float
        The individual timings, sorted (not shown in ``repr``).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    threads: int = 1
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], threads: int = 1) -> "LatencyStats":
        """Summarise individual timings (milliseconds).

        Parameters
        ----------
        samples_ms : sequence of float
            Timings of single calls in milliseconds; at least one.
        threads : int, default 1
            Thread count the timings were taken with.

        Returns
        -------
        LatencyStats
        """
        if len(samples_ms) == 0:
            raise ValueError("LatencyStats.from_samples needs at least one sample")
        ms = tuple(sorted(float(t) for t in samples_ms))
        return cls(
            median_ms=statistics.median(ms),
            p10_ms=_percentile(ms, 10.0),
            p90_ms=_percentile(ms, 90.0),
            n=len(ms),
            threads=threads,
            samples_ms=ms,
        )

    @property
    def p10(self) -> float:
        """Alias of :attr:`p10_ms`."""
        return self.p10_ms

    @property
    def p90(self) -> float:
        """Alias of :attr:`p90_ms`."""
        return self.p90_ms

    def __str__(self) -> str:
        return (
            f"{self.median_ms:.2f} ms (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f}, "
            f"n={self.n}, threads={self.threads})"
        )


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of pre-sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return sorted_values[lo] * (1.0 - frac) + sorted_values[hi] * frac


def measure_latency(
    fn: Callable[..., Any],
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
    threads: int = 1,
    warmup: int = 3,
    repeats: int = 20,
    min_time: float = 1.0,
    max_repeats: int = 10_000,
) -> LatencyStats:
    """Measure the latency of ``fn(*args, **kwargs)``.

    ``torch.set_num_threads(threads)`` is applied for the duration of the
    measurement and the previous value restored afterwards (also on error).
    All calls run under :func:`torch.inference_mode`. After ``warmup`` untimed
    calls, calls are timed one by one until at least ``repeats`` calls *and*
    at least ``min_time`` seconds of timed calls have accumulated (capped at
    ``max_repeats`` calls).

    Parameters
    ----------
    fn : callable
        The function or module to time.
    args : tuple or torch.Tensor
        Positional inputs; a single tensor is accepted.
    kwargs : mapping, optional
        Keyword inputs.
    threads : int, default 1
        Intra-op threads for the measurement.
    warmup : int, default 3
        Untimed calls before timing.
    repeats : int, default 20
        Minimum number of timed calls.
    min_time : float, default 1.0
        Minimum total timed duration in seconds.
    max_repeats : int, default 10000
        Upper bound on timed calls.

    Returns
    -------
    LatencyStats
        Median, 10th and 90th percentile latency in milliseconds.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if max_repeats < repeats:
        raise ValueError(f"max_repeats ({max_repeats}) must be >= repeats ({repeats})")
    if min_time < 0:
        raise ValueError(f"min_time must be >= 0, got {min_time}")

    call_args = _as_args(args)
    call_kwargs = dict(kwargs or {})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                fn(*call_args, **call_kwargs)
            times: list[float] = []
            elapsed = 0.0
            while len(times) < max_repeats and (len(times) < repeats or elapsed < min_time):
                start = time.perf_counter()
                fn(*call_args, **call_kwargs)
                dt = time.perf_counter() - start
                times.append(dt)
                elapsed += dt
    finally:
        torch.set_num_threads(previous)

    return LatencyStats.from_samples([t * 1e3 for t in times], threads=threads)


def measure_latencies(
    fns: Mapping[str, Callable[..., Any]],
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
    threads: int = 1,
    rounds: int = 3,
    warmup: int = 3,
    repeats: int = 10,
    min_time: float = 0.3,
) -> dict[str, LatencyStats]:
    """Measure several callables on the same inputs, interleaved in rounds.

    Each round measures every callable once with :func:`measure_latency`; the
    samples of all rounds are pooled. Interleaving spreads slow periods of a
    shared machine over all candidates instead of penalising whichever ran
    during them, which keeps *ratios* of latencies (speedups) stable.

    Parameters
    ----------
    fns : mapping of str to callable
        Named callables, e.g. ``{"dense": dense, "pruned": pruned}``.
    args, kwargs
        Inputs, as for :func:`measure_latency`.
    threads : int, default 1
        Intra-op threads.
    rounds : int, default 3
        Number of interleaved rounds.
    warmup, repeats, min_time
        Per-round settings passed to :func:`measure_latency`.

    Returns
    -------
    dict of str to LatencyStats
        Pooled statistics per name.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            stats = measure_latency(
                fn, args, kwargs, threads=threads, warmup=warmup, repeats=repeats, min_time=min_time
            )
            samples[name].extend(stats.samples_ms)
    return {name: LatencyStats.from_samples(s, threads=threads) for name, s in samples.items()}


# ---------------------------------------------------------------------------
# All three at once
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleProfile:
    """Size, compute and (optionally) latency of one module on given inputs.

    Attributes
    ----------
    params : int
        :func:`count_params` of the module.
    macs : int
        :func:`count_macs` of one call.
    latency : LatencyStats or None
        :func:`measure_latency` result, or ``None`` if latency was not measured.
    """

    params: int
    macs: int
    latency: LatencyStats | None = None


def profile_module(
    module: nn.Module,
    args: Any,
    kwargs: Mapping[str, Any] | None = None,
    threads: int = 1,
    latency: bool = True,
    **latency_options: Any,
) -> ModuleProfile:
    """Count parameters and MACs of ``module`` and optionally time it.

    Parameters
    ----------
    module : nn.Module
        The module to profile.
    args, kwargs
        Inputs for one call.
    threads : int, default 1
        Intra-op threads for the latency measurement.
    latency : bool, default True
        Whether to measure latency.
    **latency_options
        Extra keyword arguments for :func:`measure_latency`
        (``warmup``, ``repeats``, ``min_time``, ``max_repeats``).

    Returns
    -------
    ModuleProfile
    """
    stats = (
        measure_latency(module, args, kwargs, threads=threads, **latency_options)
        if latency
        else None
    )
    return ModuleProfile(
        params=count_params(module), macs=count_macs(module, args, kwargs), latency=stats
    )


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], text_columns: int = 0) -> str:
    """Render a markdown table with padded columns.

    The first ``text_columns`` columns are left-aligned; the others (numbers) are right-aligned.
    """
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i < text_columns else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep, *(line(row) for row in body)])
