"""When does a sparse ``linear`` beat the dense one? A table of measured break-even sparsities.

The Sparsify pass asks :func:`decide` for every pruned layer whether to store the weight compressed and
call a ``sparsecomp::sparse_linear_*`` operator, or to keep the dense ``aten.linear`` with the pruned
entries zeroed ("dense-with-zeros"). The answer depends on the storage format, the block shape, the
sparsity and the number of input rows per call (``batch_size`` times the other leading dims of the layer's
input, e.g. the sequence length of a transformer).

Where the numbers come from
---------------------------
``BREAK_EVEN`` holds, per format and row count, the sparsity above which our torch CPU kernels
(``sparsecomp/ops/sparse_linear.py``, MKL sparse BLAS) ran faster than dense ``F.linear`` on this
project's development machine (x86-64, 2 cores shared with other jobs, torch 2.13 CPU, 1 intra-op thread,
fp32), for the BERT-base FFN shapes 3072x768 and 768x3072::

    python benchmarks/bench_sparse_ops.py --threads 1 --batch 1 8 128 \\
        --sparsity 0.5 0.6 0.7 0.8 0.9 0.95 --blocks 16x1 4x4 1x16 8x8 --nm 2:4

A value is the lowest measured sparsity from which the sparse kernel stayed at or below the paired dense
latency on both shapes, rounded up to the next step of the sweep (the machine was noisy: the table is
deliberately conservative). The 128-row entries of ``csr`` and ``bsr16x1`` were raised from 0.9 to 0.95
by ``benchmarks/bench_rewrites.py``: on all-MiniLM-L6-v2 at seq 128 (384-wide layers), 90% CSR and 90%
16x1 ran 1.10x and 1.07x *slower* than dense at batch 1. ``None`` means the kernel never beat dense in the sweep (2:4 N:M: its
effective sparsity is fixed at 50%, where no sparse CPU kernel of torch wins). Re-run the command on the
deployment machine and pass your own table to :func:`decide`. ``Sparsify(backend=..., threads=...)`` uses
the table measured for that backend on this machine by :func:`sparsecomp.target.breakeven.measure_break_even`
when there is one (:func:`table_for`), and this documented table otherwise; its report says which.

Between two measured row counts the larger of the two break-evens is used (conservative); above the
largest measured row count, the largest one's. Block shapes without a row of their own use the CSR
break-even: their kernels (square sub-blocks, or expanded column runs) are no faster than CSR per stored
value. This is a ranking heuristic, not a latency predictor: ``estimate`` gives MACs and bytes only.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from ...graph.macs import linear_macs

POLICIES = ("auto", "always", "never")

#: A layer counts as reaching a break-even up to this much below it: masks keep a whole number of weights
#: per row, so 70% of 768 inputs is 69.9%.
SPARSITY_SLACK = 0.005

#: ``format key -> ((rows, break-even sparsity or None), ...)``, rows ascending; see the module docstring.
BREAK_EVEN: dict[str, tuple[tuple[int, Optional[float]], ...]] = {
    "csr": ((1, 0.8), (8, 0.8), (128, 0.95)),
    "bsr16x1": ((1, 0.7), (8, 0.8), (128, 0.95)),
    "bsr4x4": ((1, 0.9), (8, 0.7), (128, 0.9)),
    "bsr8x8": ((1, 0.8), (8, 0.8), (128, 0.8)),
    "bsr1x16": ((1, 0.9), (8, 0.8), (128, 0.9)),
    "nm2:4": ((1, None), (8, None), (128, None)),
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """The cost model's answer for one layer.

    Attributes
    ----------
    sparse:
        Use the sparse operator (``True``) or keep the layer dense-with-zeros (``False``).
    reason:
        Why, in words (shown by ``sparsecomp.report``).
    break_even:
        The break-even sparsity that was compared against (``None``: never wins, or not consulted).
    """

    sparse: bool
    reason: str
    break_even: Optional[float] = None


def format_key(fmt: str, block: tuple[int, int] = (1, 1), n: int = 2, m: int = 4) -> str:
    """The ``BREAK_EVEN`` key of a storage format: ``"csr"``, ``"bsr16x1"``, ``"nm2:4"``."""
    if fmt == "csr":
        return "csr"
    if fmt == "bsr":
        return f"bsr{int(block[0])}x{int(block[1])}"
    if fmt == "nm":
        return f"nm{int(n)}:{int(m)}"
    raise ValueError(f"unknown sparse format {fmt!r}; expected 'csr', 'bsr' or 'nm'")


def break_even(key: str, rows: int,
               table: Mapping[str, tuple[tuple[int, Optional[float]], ...]] = BREAK_EVEN
               ) -> tuple[Optional[float], str]:
    """Break-even sparsity for ``key`` at ``rows`` input rows, and the table key that supplied it.

    Returns ``(None, key)`` when the format never beat dense at that row count.
    """
    used = key
    if key not in table:
        if key.startswith("nm"):
            return None, key  # N:M kernels never beat dense in our measurements
        used = "csr"
    points = table[used]
    if rows <= points[0][0]:
        return points[0][1], used
    for (r0, s0), (r1, s1) in zip(points, points[1:]):
        if rows == r1:
            return s1, used
        if r0 < rows < r1:
            if s0 is None or s1 is None:
                return None, used
            return max(s0, s1), used
    return points[-1][1], used


#: where the documented table's numbers come from (the reasons of :func:`decide` name it)
DOCUMENTED = "our CPU measurements"


def table_for(backend: str, threads: int = 1) -> tuple[Mapping[str, tuple[tuple[int, Optional[float]], ...]], str]:
    """The break-even table for ``backend`` at ``threads`` threads: the one measured on this machine
    (:func:`sparsecomp.target.breakeven.measure_break_even`) when it exists, else :data:`BREAK_EVEN`;
    and where it comes from, in words."""
    from ...target.breakeven import measured_break_even

    measured = measured_break_even(backend, threads)
    if measured:
        return measured, f"measurements of {backend} with {threads} thread(s) on this machine"
    return BREAK_EVEN, DOCUMENTED


def decide(fmt: str, sparsity: float, rows: int, *, block: tuple[int, int] = (1, 1), n: int = 2,
           m: int = 4, policy: str = "auto",
           table: Mapping[str, tuple[tuple[int, Optional[float]], ...]] = BREAK_EVEN,
           source: str = DOCUMENTED) -> Decision:
    """Should a layer with this format and (actual) sparsity use the sparse operator?

    Parameters
    ----------
    fmt:
        ``"csr"``, ``"bsr"`` or ``"nm"``.
    sparsity:
        Fraction of zero weights in the layer (for N:M: ``1 - n/m``).
    rows:
        Input rows per call (batch size times the other leading dims of the layer's input).
    policy:
        ``"auto"`` consults the table, ``"always"`` / ``"never"`` force the answer.
    table, source:
        The break-even table and where it comes from (see :func:`table_for`).

    Examples
    --------
    >>> decide("csr", 0.95, rows=1).sparse
    True
    >>> decide("nm", 0.5, rows=1, n=2, m=4).reason
    'nm2:4 never beat dense at 1 rows in our CPU measurements'
    """
    if policy not in POLICIES:
        raise ValueError(f"cost model policy must be one of {POLICIES}, got {policy!r}")
    if policy == "always":
        return Decision(True, "forced (cost_model='always')")
    if policy == "never":
        return Decision(False, "cost_model='never'")
    key = format_key(fmt, block, n, m)
    be, used = break_even(key, rows, table)
    via = "" if used == key else f" (no measurement for {key}; using the {used} break-even)"
    if be is None:
        return Decision(False, f"{key} never beat dense at {rows} rows in {source}{via}")
    src = "" if source == DOCUMENTED else f" ({source})"
    if sparsity + SPARSITY_SLACK >= be:
        return Decision(True, f"sparsity {sparsity:.2f} >= break-even {be:.2f} for {key} at {rows} rows{via}{src}", be)
    return Decision(False, f"sparsity {sparsity:.2f} < break-even {be:.2f} for {key} at {rows} rows{via}{src}", be)


def estimate(out_features: int, in_features: int, rows: int, stored_values: int, dense_bytes: int,
             sparse_bytes: int, use_sparse: bool) -> dict[str, int]:
    """MACs and weight bytes of one call, dense vs what the layer runs after the pass.

    A sparse layer does ``rows * stored_values`` multiply-accumulates and stores ``sparse_bytes``; a
    dense-with-zeros layer still does ``rows * out * in`` and stores ``dense_bytes``.
    """
    dense_macs = linear_macs(int(rows), int(out_features), int(in_features))
    return {
        "macs_before": dense_macs,
        "macs_after": linear_macs(int(rows), 1, int(stored_values)) if use_sparse else dense_macs,
        "bytes_before": int(dense_bytes),
        "bytes_after": int(sparse_bytes) if use_sparse else int(dense_bytes),
    }


def rows_per_call(leading_sizes, batch_size: int, batch_symbols=None) -> int:
    """Input rows of a layer per call: the product of its input's leading sizes, with the symbols of the
    dynamic batch dim (``batch_symbols``; ``None``: every symbol) set to ``batch_size`` and any other
    symbol (e.g. a dynamic sequence length) at its size in the example inputs."""
    total = 1
    for s in leading_sizes:
        total *= _size_at(s, batch_size, batch_symbols)
    return max(1, int(total))


def _size_at(size, batch_size: int, batch_symbols=None) -> int:
    import torch

    if not isinstance(size, torch.SymInt):
        return int(size)
    concrete = size.node.maybe_as_int()
    if isinstance(concrete, int):
        return concrete
    expr = size.node.expr
    example = getattr(size.node.shape_env, "var_to_val", {})
    value = expr.subs({s: batch_size if batch_symbols is None or s in batch_symbols else example.get(s, s)
                       for s in expr.free_symbols})
    try:
        return int(value)
    except TypeError:
        hint = size.node.hint
        return int(hint) if hint is not None else 1


__all__ = ["BREAK_EVEN", "DOCUMENTED", "Decision", "POLICIES", "SPARSITY_SLACK", "break_even", "decide", "estimate", "format_key",
           "rows_per_call", "table_for"]
