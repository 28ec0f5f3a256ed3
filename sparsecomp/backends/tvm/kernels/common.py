"""What every kernel generator shares: tile and threshold constants, the software-prefetch plan,
``T.parallel`` thresholds and small TIR helpers."""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder

# Outputs per dense panel (two 8-float AVX2 vectors) and rows per register tile; see
# docs/_drafts/tvm.md for the measurements behind the defaults.
DENSE_NB = 16
DENSE_MB = 4
# With AVX-512 a panel row is one vector: 8 rows keep the same 8 accumulators in flight (FMA latency x
# 2 pipes; 32 registers). MiniLM (batch 1, seq 128) on an AVX-512 Xeon: 30.9 -> 24.3 ms (MB 4 -> 8;
# 6: 27.5), the zoo's gpt 0.33 -> 0.31 ms; same-run A/B.
DENSE_MB_AVX512 = 8
BATCH_VEC = 8
# CSR / N:M: independent (rotating) accumulators, and rows per parallel task (register buffers
# are allocated once per task: allocating them per row inside a parallel loop cost ~1 ms per call)
ROW_UNROLL = 4
ROWS_PER_CHUNK = 32
MIN_PARALLEL_FLOPS = 1 << 20
# a sparse multiply-add (index load, gathered x) costs about this many dense ones, for that threshold
SPARSE_FLOP_COST = 4
# Sparse kernels prefetch their weight stream this many bytes ahead: the hardware prefetcher alone
# left the CSR kernel at 0.64 of the bandwidth bound (3072x768, 90 %, cold); 2 KiB ahead: 0.78.
# Walks that read several streams split it between them (:meth:`Prefetch.ahead`). The default of
# :class:`Prefetch`; a host's own choice comes from :mod:`.calibrate`.
PREFETCH_BYTES = 2048
# SELL slices: rows per slice (one AVX2 vector of outputs); rows are sorted by length within
# windows of SELL_SIGMA rows.
SELL_R = 8
SELL_SIGMA = 128
# rows of x per batch tile of the 1xC BSR kernel: x^T [K, 8] (24 KiB at K = 768) stays in L1
BSR_BATCH_TILE = 8
# BSR rows of x run alone (batch 1) walk the weights as several streams, each a contiguous part of
# the block rows: one core reads DRAM faster from several sequential streams than from one (a plain
# TIR read of 256 MiB: ~1.14x the bandwidth with 4). On a Zen 3, with column and value arrays apart,
# 3072x768 at 70-95 %, cold, two streams against one: 1x16 0.85-0.91x the time (rows alternate
# between the streams), 4x4 0.86-0.94x, 16x1 0.90-0.92x (block rows walked block by block in
# lockstep: ``rows_lockstep`` of the ``r >= c`` kernel); 4 streams were worse than 2 there. CSR keeps
# one (compute-bound at 90-95 % on the Zen 3; 2 / 4 streams: 1.0 / 1.25x). The column-vector
# kernel (1x16, 2x8, 1x8...) keeps two streams on arrays apart; the r >= c kernel takes BSR_STREAMS
# on groups (below).
READ_STREAMS = 2
# BSR weights are stored in groups of BSR_GROUP blocks: the group's column indices (one 64-byte line
# of int32), then its blocks (:func:`bsr_stored`), so that each walk over block rows is one sequential
# stream instead of a value stream and a column stream. The batch-1 walks then take BSR_STREAMS
# walks at once: on the AVX-512 Xeon four walks on separate column / value arrays (8 hardware
# streams) were slower than two (a C prototype: 16x1 at 70-95 %, cold, 0.88-0.94 against 0.93-1.0 of
# a plain read), and four on the grouped layout faster (0.94-1.03). This kernel against the two-walk
# one on arrays apart, 3072x768, cold, batch 1, 70-95 % (same-run A/B, separate copies): 16x1
# 0.91-0.97x the time, 8x8 0.97-0.98x, 4x4 0.95-0.98x.
BSR_GROUP = 16
_GROUP_BITS = 4
assert BSR_GROUP == 1 << _GROUP_BITS
BSR_STREAMS = 4
# accumulator vectors per stream of the paired batch-1 walks (N:M ``group_pair``), and in total
# over the BSR_STREAMS lockstep walks of the ``r >= c`` BSR kernel (``2 * PAIR_ACC_VECTORS``): 8
# leave half the 16 AVX2 registers for the broadcasts of x and the loop's addresses
PAIR_ACC_VECTORS = 4


@dataclass(frozen=True)
class Prefetch:
    """Software prefetch of the weight stream in a sparse kernel's batch-1 walk.

    ``distance``: bytes ahead over all the walk's streams (split between them); ``0``: none, the
    hardware prefetcher alone. ``locality``: ``llvm.prefetch``'s hint, 3 = ``prefetcht0`` (into L1),
    2 = ``prefetcht1`` (into L2), 1 = ``prefetcht2``.

    What is fastest depends on the host: on a Zen 3, ``prefetcht1`` 2 KiB ahead for the narrow
    blocks and CSR, and none for the lockstep walks of tall blocks and N:M (the defaults, below); on
    an AVX-512 Xeon, 4 KiB ahead everywhere and ``prefetcht0`` for CSR (3072x768 at 90 %, cold: 16x1
    0.78 -> 0.91-0.97 of the bandwidth bound, CSR 0.82 -> 0.89). :mod:`.calibrate` picks a
    :class:`PrefetchPlan` per host by measurement.
    """

    distance: int = PREFETCH_BYTES
    locality: int = 2

    def __post_init__(self):
        if not isinstance(self.distance, int) or not 0 <= self.distance <= 1 << 16:
            raise ValueError(f"Prefetch.distance must be an int in [0, 65536] bytes, got {self.distance!r}")
        if self.locality not in (1, 2, 3):
            raise ValueError(f"Prefetch.locality must be 1, 2 or 3 (prefetcht2/t1/t0), got {self.locality!r}")

    def ahead(self, unit_bytes: int, streams: int = 1) -> int:
        """Units of ``unit_bytes`` each of ``streams`` streams prefetches ahead (>= 1); 0 if off."""
        return max(1, self.distance // streams // unit_bytes) if self.distance else 0


OFF = Prefetch(0)


@dataclass(frozen=True)
class PrefetchPlan:
    """One :class:`Prefetch` per batch-1 walk: ``narrow_blocks`` (BSR blocks narrower than a vector
    or wider than they are tall: 4x4, 1x16...), ``tall_blocks`` (BSR ``r >= c`` with ``r >= 8``: 16x1, 8x8,
    walked block rows in lockstep), ``csr`` (SELL slices) and ``nm`` (N:M lanes, two groups in
    lockstep)."""

    narrow_blocks: Prefetch = Prefetch()
    tall_blocks: Prefetch = OFF
    csr: Prefetch = Prefetch()
    nm: Prefetch = OFF

    def __post_init__(self):
        for name in ("narrow_blocks", "tall_blocks", "csr", "nm"):
            if not isinstance(getattr(self, name), Prefetch):
                raise TypeError(f"PrefetchPlan.{name} must be a Prefetch, got {getattr(self, name)!r}")

    def bsr(self, r: int, c: int) -> Prefetch:
        """The entry for ``r x c`` blocks."""
        return self.tall_blocks if r >= c and r >= 8 else self.narrow_blocks


DEFAULT_PLAN = PrefetchPlan()


def _scheduled(func):
    return func.with_attr("tirx.is_scheduled", True)


def _prefetch(addr, locality: int = 2):
    """Software prefetch (read) of ``addr`` with ``llvm.prefetch`` locality ``locality``; a hint,
    never faults.

    The default, into L2 (``prefetcht1``) rather than L1 (``prefetcht0``): 1-13 % faster on a Zen 3
    (cold 3072x768 kernels: 16x1 and CSR at 90 %, 4x4 at 95 %, N:M 1:8; same-run A/B), the weights
    being used once, shortly after. An AVX-512 Xeon prefers ``prefetcht0`` for CSR (see
    :class:`Prefetch`)."""
    return T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", addr, 0, locality, 1))


def _prefetch_lines(block_bytes: int) -> int:
    """Cache lines (64 B) per stored block: each is prefetched (an 8x8 block is 4 lines; prefetching
    its first line only left 8x8 at 0.5-0.65 of the bound at batch 1)."""
    return max(1, block_bytes // 64)


def _min_of(buf, n: int):
    """``min(buf[0], ..., buf[n - 1])`` as one expression."""
    e = buf[0]
    for s in range(1, n):
        e = T.min(e, buf[s])
    return e


def _parallel_threshold(parallel: bool) -> int:
    """Work (flops) from which the outer loop runs ``T.parallel``; never when ``parallel`` is off."""
    return MIN_PARALLEL_FLOPS if parallel else 1 << 62


def _chunks(rows: int, per_chunk: int) -> int:
    return -(-rows // per_chunk)


def _named(var, name: str):
    """``var`` (a loop variable) printed and compiled as ``name``."""
    IRBuilder.name(name, var)
    return var


def _scratch(scratch: dict[str, tuple]) -> list:
    """One buffer per entry ``name: (shape, dtype)`` of ``scratch``, in order, each named by its key (as
    ``name = T.alloc_buffer(shape, dtype)`` in the kernel's own text would name it)."""
    out = []
    for name, (shape, dtype) in scratch.items():
        buf = T.alloc_buffer(shape, dtype)
        IRBuilder.name(name, buf)
        out.append(buf)
    return out


def by_work(threshold: int, scratch: dict[str, tuple], task, loop, tail=None):
    """A kernel's outer loop over its tasks, parallel only when the call has the work for it.

    Returns a macro ``run(work, extent, args)``. When ``work >= threshold`` (see
    :func:`_parallel_threshold`), ``for <loop> in T.parallel(extent)`` allocates the ``scratch`` buffers
    (``name: (shape, dtype)``, e.g. register tiles) per task and calls ``task(*args, index, *scratch, True)``;
    otherwise the buffers are allocated once, a serial loop calls ``task(*args, index, *scratch, False)``
    for every task, and then ``tail(*args, *scratch)`` runs (if given). ``loop`` names the loop variable;
    a pair ``(a, b)`` with ``extent = (n_a, n_b)`` makes it a grid: one parallel loop ``i`` over
    ``n_a * n_b`` tasks (``task`` gets ``i // n_b, i % n_b``) or a serial ``T.grid(n_a, n_b)``. The last
    argument tells ``task`` whether it runs as a parallel task. Every kernel decides this way:
    a ``T.parallel`` launch costs ~12 us even on one thread (:data:`MIN_PARALLEL_FLOPS`).
    """
    grid = not isinstance(loop, str)

    @T.macro
    def run(work, extent, args):
        if work >= threshold:
            if grid:
                for i in T.parallel(extent[0] * extent[1]):
                    task(*args, i // extent[1], i % extent[1], *_scratch(scratch), True)
            else:
                for i in T.parallel(extent):
                    task(*args, _named(i, loop), *_scratch(scratch), True)
        else:
            bufs = T.meta_var(_scratch(scratch))
            if grid:
                for a, b in T.grid(extent[0], extent[1]):
                    task(*args, _named(a, loop[0]), _named(b, loop[1]), *bufs, False)
            else:
                for i in range(extent):
                    task(*args, _named(i, loop), *bufs, False)
            if tail is not None:
                tail(*args, *bufs)

    return run

