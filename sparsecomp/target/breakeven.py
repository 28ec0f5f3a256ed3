"""Measured break-even sparsities of the sparse ``linear`` kernels, per backend and machine (issue 25.6).

:mod:`sparsecomp.passes.sparsify.cost_model` documents a ``BREAK_EVEN`` table measured once with torch on
the development machine. On another backend (TVM's kernels are 8-15x faster than torch's) or another CPU
the break-even is elsewhere. :func:`measure_break_even` times, on ``backend`` with ``threads`` threads, a
dense ``linear`` against the same layer after ``Sparsify(..., cost_model="always")`` at a sweep of
sparsities and row counts, and keeps, per format and row count, the lowest sparsity from which the sparse
layer stayed at or below the dense one (``None``: never). The table is saved beside the latency tables
(:func:`sparsecomp.target.latency.table_path` with kind ``"breakeven"``); ``Sparsify(backend=...,
threads=...)`` reads it through :func:`measured_break_even` and falls back to the documented table when
nothing was measured, saying which one it used in the report.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..calibration.data import progress_bar
from ..errors import ConfigError
from .latency import Timing, check_backend, machine_identity, measure_models, read_json_cache, table_path, write_json_cache

Table = dict[str, tuple[tuple[int, Optional[float]], ...]]

#: the sweep's defaults: the formats the cost model knows, MiniLM's and BERT-base's row counts
FORMATS = ("csr", "bsr16x1", "bsr4x4", "bsr8x8", "bsr1x16")
ROWS = (1, 8, 128)
SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _sparsify_config(key: str, sparsity: float):
    from ..passes.sparsify import Sparsify

    if key == "csr":
        return Sparsify(sparsity=sparsity, pattern="unstructured", cost_model="always")
    if key.startswith("bsr"):
        r, c = (int(v) for v in key[3:].split("x"))
        return Sparsify(sparsity=sparsity, pattern="block", block=(r, c), cost_model="always")
    raise ConfigError(f"measure_break_even: unknown format key {key!r}; expected 'csr' or 'bsrRxC'")


def break_even_of(sparsities: Sequence[float], sparse_ms: Sequence[float], dense_ms: float) -> Optional[float]:
    """The lowest sparsity from which every sparse timing is at or below ``dense_ms`` (``None``: none)."""
    best = None
    for s, t in sorted(zip(sparsities, sparse_ms), reverse=True):
        if t > dense_ms:
            break
        best = s
    return best


def measure_break_even(backend: str = "torch", timing: Timing = Timing(), *, formats: Sequence[str] = FORMATS,
                       rows: Sequence[int] = ROWS, sparsities: Sequence[float] = SPARSITIES,
                       shape: tuple[int, int] = (768, 768), progress: bool = True, save: bool = True) -> Table:
    """Measure the break-even table of ``backend`` on this machine (and save it for ``Sparsify``).

    ``shape`` is the ``(out, in)`` of the timed layer. Returns ``{format key: ((rows, break-even), ...)}``
    in the form of :data:`sparsecomp.passes.sparsify.cost_model.BREAK_EVEN`.
    """
    import sparsecomp

    check_backend(backend)
    if not sparsities or not rows or not formats:
        raise ConfigError("measure_break_even needs at least one format, row count and sparsity")
    out_f, in_f = (int(v) for v in shape)
    table: Table = {}
    jobs = [(key, r) for key in formats for r in sorted(set(int(r) for r in rows))]
    for key, r in progress_bar(jobs, f"break-even ({backend})", progress):
        torch.manual_seed(0)
        dense = torch.nn.Sequential(torch.nn.Linear(in_f, out_f)).eval()
        x = (torch.randn(r, in_f),)
        models = {"dense": dense}
        for s in sparsities:
            models[str(s)] = sparsecomp.compress(dense, x, _sparsify_config(key, s))
        stats = measure_models(models, x, backend, timing)
        be = break_even_of(list(sparsities), [stats[str(s)].median_ms for s in sparsities], stats["dense"].median_ms)
        table[key] = tuple(sorted(table.get(key, ()) + ((r, be),)))
    if save:
        write_json_cache(table_path(backend, timing.threads, "breakeven"), machine_identity(backend, timing.threads),
                         {k: [list(p) for p in v] for k, v in table.items()})
    return table


def measured_break_even(backend: str = "torch", threads: int = 1) -> Table | None:
    """The table :func:`measure_break_even` saved for ``backend`` at ``threads`` on this machine, or ``None``."""
    entries = read_json_cache(table_path(backend, threads, "breakeven"), "break-even")
    if not entries:
        return None
    return {k: tuple((int(r), None if be is None else float(be)) for r, be in v) for k, v in entries.items()}


__all__ = ["FORMATS", "ROWS", "SPARSITIES", "break_even_of", "measure_break_even", "measured_break_even"]
