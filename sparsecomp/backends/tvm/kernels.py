"""Our own TIR kernels: dense ``linear``, batched matmul, sparse ``linear``, convolutions and norms.

Every kernel is a TVMScript ``PrimFunc`` generated for what is known at compile time (``in``/``out``
features, block shape, row count, nnz, tile sizes); only the batch (rows of ``x``) stays symbolic. The
kernels are written at loop level (explicit register tiles, ``T.vectorized`` inner loops, unrolled row
tiles, remainder loops), so they are marked ``tirx.is_scheduled`` and no schedule rule touches them.

Layouts are chosen at compile time from the constant weights (see :mod:`.frontend` for the packing):

* dense: ``W`` packed ``[N/NB, K, NB]`` (NB = 16 outputs, two AVX2 vectors) so a column panel streams
  contiguously; register tile ``MB x NB`` over (rows of x, outputs).
* BSR ``r x c`` with ``r >= c`` (``16x1``, ``4x4``, ``8x8``...): blocks stored ``[c, r]`` (transposed
  at compile time) so the inner loop is an ``r``-wide vector FMA, in groups of 16 behind their column
  indices (:func:`bsr_stored`); register tile ``MB x r``. Single rows of ``x`` (batch 1) read four
  block rows in lockstep, blocks narrower than a vector packed two columns to a vector.
* BSR with ``c > r`` (``1x16``...): blocks ``[nnzb, r, c]``; vector over the block's columns, horizontal sum.
  At batch >= 8, 1xC blocks and blocks narrower than a vector (``4x4``) run 8 rows of the batch as
  one vector on a per-tile ``x^T`` (:func:`_bsr_batch_tiles`).
* CSR: SELL-8 (:func:`sell_layout`): rows sorted by length within windows, 8 output rows in the lanes
  of a vector; batch 1 assembles ``x`` at an entry's 8 columns from scalar loads, batches of 8 / 16
  rows run as vectors over the batch on a per-tile repacked ``x^T``; a parallel chunk is one sorting
  window, whose batch-tile results are buffered and written to ``Y`` row-contiguously.
* N:M: with AVX2 and ``m`` in 2/4/8, 8 output rows in lanes, ``vpermps`` picks each entry's column
  from an 8-column window of ``x`` (:func:`nm_lanes_kernel`; serially two groups in lockstep);
  otherwise a row kernel computes the
  column ``group*m + position`` from the uint8 positions (tiles of 8 rows of ``x`` as vectors over
  the batch, ``U`` independent accumulators per output row for the rest).
* convolutions (NCHW in and out, inputs already padded): direct kernel with weights packed
  ``[OC/NB, IC/g, KD, KH, KW, NB]``, register tile ``TW`` output-width positions x ``NB`` output
  channels; pointwise (1x1) kernel vectorised over positions (:func:`pointwise_tile`); depthwise
  kernel vectorised along output rows (strided rows computed whole, then subsampled). Activations
  (ReLU, hardswish, hardsigmoid) can be fused into the stores; BatchNorm is folded into the weights
  by the frontend.
* GroupNorm / LayerNorm: two-pass statistics into 8-lane vectors, then one vectorised affine pass.
* mean over trailing dims: vector accumulators per row (:func:`mean_kernel`).
* index check (before embedding, ``index_select``, one-tensor indexing, ``gather``): torch's bounds
  check on indices that reach Relax ``take`` / ``gather_elements`` (:func:`index_check_kernel`).

Parallelism: the outer loop (output panels / chunks of rows) runs ``T.parallel`` only when the call's
work, known at run time from the batch, is at least :data:`MIN_PARALLEL_FLOPS`: a parallel launch costs
~12 us even on one thread, more than a whole small layer (a 64x64 linear on 32 rows: 12.8 -> 3.4 us).
Every generator takes ``parallel=False`` for models lowered for one thread: the body of a parallel
loop is compiled as a closure and ran 1.5-3x slower than the same loop inline (3072x768 CSR at 90 %,
batch 1, cold: 453 us through the parallel path vs ~0.35 of that per nonzero serially).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

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


def _block_prefetch(r: int, c: int, pd: int, last: int, locality: int):
    """Macro ``prefetch_block(val, col, j)``: every cache line of stored block ``j + pd`` (clamped to
    the last block) and its column index, for values stored ``[nnzb, r, c]`` (``c`` contiguous; the
    ``r >= c`` kernel passes its transposed ``[nnzb, c, r]`` as ``(c, r)``)."""

    @T.macro
    def prefetch_block(val, col, j):
        for ln in T.unroll(_prefetch_lines(4 * r * c)):
            _prefetch(T.address_of(val[T.min(j + pd, last), ln * 16 // c, ln * 16 % c]), locality)
        _prefetch(T.address_of(col[T.min(j + pd, last)]), locality)

    return prefetch_block


def _bsr_group_width(r: int, c: int) -> int:
    """Elements (4 bytes each) of one group of :func:`bsr_stored`: its column indices, its blocks."""
    return BSR_GROUP * (1 + r * c)


def bsr_groups(nnzb: int) -> int:
    """Groups of :data:`BSR_GROUP` blocks that hold ``nnzb`` blocks (at least one)."""
    return max(1, -(-nnzb // BSR_GROUP))


def _gcol(GI, j, bs: int):
    """Column index of block ``j`` in a :func:`bsr_stored` buffer viewed as int32 (``GI``), ``bs``
    values a block: group ``j // G`` starts at ``(j // G) * G * (1 + bs)`` (``G`` = BSR_GROUP), so
    the index sits at ``j + (j - j % G) * bs`` (one ``and`` and a shift besides the induction)."""
    return GI[j + T.bitwise_and(j, -BSR_GROUP) * bs]


def _gblock(j, bs: int):
    """Offset of block ``j``'s first value in a :func:`bsr_stored` buffer: ``j * bs + (j - j % G)
    + G``."""
    return j * bs + T.bitwise_and(j, -BSR_GROUP) + BSR_GROUP


def _groups_of(crow, br):
    """Loop over the groups that hold block row ``br``'s blocks (``for g in _groups_of(...)``)."""
    return T.serial(T.shift_right(crow[br], _GROUP_BITS),
                    T.shift_right(crow[br + 1] + BSR_GROUP - 1, _GROUP_BITS))


def _gcol_at(GI, g, j, bs: int, GW: int):
    """:func:`_gcol`; with ``g`` (block ``j``'s group, from a group-by-group walk) in a form linear
    in ``j`` within the group."""
    return _gcol(GI, j, bs) if g is None else GI[g * GW + j - g * BSR_GROUP]


def _gblock_at(g, j, bs: int, GW: int):
    """:func:`_gblock`; with ``g``, linear in ``j`` within the group."""
    return _gblock(j, bs) if g is None else g * GW + BSR_GROUP + (j - g * BSR_GROUP) * bs


def _block_walk(body, by_group: bool):
    """Macro ``walk(crow, br, a0..a4)``: ``body(a0..a4, g, j)`` for every block ``j`` of block row
    ``br``. ``by_group``: group by group of :func:`bsr_stored` (``g`` = the group), for block rows
    of >= 32 blocks on average, whose addresses then step with ``j`` (the per-block group
    arithmetic took batch 8 of 16x1 at 90 % to ~1.2x the time); else block by block (``g`` =
    ``None``: short rows lose more to a loop exit per group, 4x4 at 90 %, ~1.15x). A loop from a
    non-zero start (``range(j0, j1)``) crashed the compiled kernel, hence ``jj``."""

    @T.macro
    def walk(crow, br, a0, a1, a2, a3, a4):
        if by_group:
            for g in _groups_of(crow, br):
                j0: T.let = T.max(crow[br], g * BSR_GROUP)
                for jj in range(T.min(crow[br + 1], g * BSR_GROUP + BSR_GROUP) - j0):
                    body(a0, a1, a2, a3, a4, g, j0 + jj)
        else:
            for j in range(crow[br], crow[br + 1]):
                body(a0, a1, a2, a3, a4, None, j)

    return walk


def _grouped_prefetch(bs: int, pd: int, last: int, locality: int):
    """Macro ``prefetch_block(GI, gv, j)``: every cache line of block ``j + pd`` (clamped to the
    last block) and its group's column indices, in a :func:`bsr_stored` buffer."""

    @T.macro
    def prefetch_block(GI, gv, j):
        jp: T.let = T.min(j + pd, last)
        for ln in T.unroll(_prefetch_lines(4 * bs)):
            _prefetch(T.address_of(gv[_gblock(jp, bs) + ln * 16]), locality)
        _prefetch(T.address_of(GI[T.bitwise_and(jp, -BSR_GROUP) * (1 + bs)]), locality)

    return prefetch_block


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


def dense_kernel(K: int, NP: int, MB: int = DENSE_MB, NB: int = DENSE_NB, dtype: str = "float32",
                 parallel: bool = True):
    """``Y[B, NP] = X[B, K] @ Wp + bias`` with ``Wp`` packed ``[NP/NB, K, NB]``; ``NP % NB == 0``."""
    nblk = NP // NB
    flops_per_row = 2 * K * NP
    threshold = _parallel_threshold(parallel)

    @T.macro
    def panel(X, w, bias, Y, B, nb, acc, acc1):
        for bo in range(B // MB):
            for mi in T.unroll(MB):
                for ni in T.vectorized(NB):
                    acc[mi, ni] = bias[nb * NB + ni]
            for k in range(K):
                for mi in T.unroll(MB):
                    for ni in T.vectorized(NB):
                        acc[mi, ni] = acc[mi, ni] + X[bo * MB + mi, k] * w[nb, k, ni]
            for mi in T.unroll(MB):
                for ni in T.vectorized(NB):
                    Y[bo * MB + mi, nb * NB + ni] = acc[mi, ni]
        for bt in range(B - B // MB * MB):
            for ni in T.vectorized(NB):
                acc1[ni] = bias[nb * NB + ni]
            for k in range(K):
                for ni in T.vectorized(NB):
                    acc1[ni] = acc1[ni] + X[B // MB * MB + bt, k] * w[nb, k, ni]
            for ni in T.vectorized(NB):
                Y[B // MB * MB + bt, nb * NB + ni] = acc1[ni]

    @T.prim_func(private=True)
    def dense(x_h: T.handle, w: T.Buffer((nblk, K, NB), dtype), bias: T.Buffer((NP,), dtype),
              y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, NP), dtype)
        if B * flops_per_row >= threshold:
            for nb in T.parallel(nblk):
                acc = T.alloc_buffer((MB, NB), dtype)
                acc1 = T.alloc_buffer((NB,), dtype)
                panel(X, w, bias, Y, B, nb, acc, acc1)
        else:
            acc = T.alloc_buffer((MB, NB), dtype)
            acc1 = T.alloc_buffer((NB,), dtype)
            for nb in range(nblk):
                panel(X, w, bias, Y, B, nb, acc, acc1)

    return _scheduled(dense)


def _bsr_rows_per_tile(vectors_per_row: int) -> int:
    """Rows of ``x`` per register tile: 8 accumulator vectors in flight (FMA latency x 2 pipes)."""
    return max(1, 8 // vectors_per_row)


def _bsr_batch_tiles(K: int, r: int, c: int, dtype: str, cv, wv, by_group: bool = False):
    """Batch tiles for the BSR kernels: ``TB`` rows of ``x`` as one vector over the batch.

    ``x^T`` is repacked per tile (``XP[t*TB*K + k*TB + q] = X[t*TB + q, k]``, 24 KiB at K = 768:
    L1) and each stored weight is broadcast against the tile's column of ``x^T``: no horizontal
    sums (1xC blocks) and full-width vectors whatever ``r`` is (4x4 blocks ran on half vectors).
    ``RA`` rotating accumulator sets over the block's columns keep 8 vectors in flight. ``cv(col,
    g, j)`` reads block ``j``'s column index and ``wv(val, g, j, i, cc)`` its weight at row ``i``,
    column ``cc`` (the two kernels store blocks differently); ``g`` and ``by_group`` as in
    :func:`_block_walk`. Returns ``(TB, RA, batch_tile, repack)``.
    """
    TB = BSR_BATCH_TILE
    RA = max(1, 8 // (r * TB // 8))
    while c % RA:
        RA //= 2

    @T.macro
    def tile_block(XP, col, val, b0, acct, g, j):
        for cc in T.unroll(c):
            for i in T.unroll(r):
                for q in T.vectorized(TB):
                    acct[cc % RA, i, q] = acct[cc % RA, i, q] + wv(val, g, j, i, cc) * XP[
                        b0 * K + (T.Cast("int64", cv(col, g, j)) * c + cc) * TB + q]

    walk = _block_walk(tile_block, by_group)

    @T.macro
    def batch_tile(XP, crow, col, val, bias, Y, br, b0, acct):
        for a in T.unroll(RA):
            for i in T.unroll(r):
                for q in T.vectorized(TB):
                    acct[a, i, q] = T.Cast(dtype, 0)
        walk(crow, br, XP, col, val, b0, acct)
        for i in range(r):
            for a in range(1, RA):
                for q in T.vectorized(TB):
                    acct[0, i, q] = acct[0, i, q] + acct[a, i, q]
            for q in range(TB):
                Y[b0 + q, br * r + i] = acct[0, i, q] + bias[br * r + i]

    @T.macro
    def repack(X, XP, B):
        for t in range(B // TB):
            for q in range(TB):
                for k in range(K):
                    XP[t * TB * K + k * TB + q] = X[t * TB + q, k]

    return TB, RA, batch_tile, repack


def bsr_row_vector_kernel(N: int, K: int, r: int, c: int, nnzb: int, idx: str, MB: int | None = None,
                          dtype: str = "float32", parallel: bool = True, pf: Prefetch | None = None,
                          S: int = BSR_STREAMS):
    """BSR with ``r >= c``: blocks stored ``[c, r]`` in :func:`bsr_stored`'s groups;
    ``Y[B, N] = X[B, K] @ W^T + bias``.

    Register tile ``MB`` rows of ``x`` x ``r`` outputs, ``MB`` chosen so that 8 accumulator vectors
    are in flight (4x4 / 8x8 blocks: 8 rows; 16x1: 4); rows of ``x`` past the tiles (all of them at
    batch 1) run one at a time, the weights read as ``S`` streams in lockstep (:func:`rows_lockstep`),
    prefetched as ``pf`` says (default: :data:`DEFAULT_PLAN`'s entry for ``r x c``).
    """
    if idx != "int32":
        raise ValueError(f"bsr kernels store int32 column indices beside the values, got {idx}")
    pf = DEFAULT_PLAN.bsr(r, c) if pf is None else pf
    if MB is None:
        MB = _bsr_rows_per_tile(-(-r // 8))
    nbr = N // r
    per_chunk = max(1, ROWS_PER_CHUNK // r)
    nch = _chunks(nbr, per_chunk)
    flops_per_row = 2 * nnzb * r * c * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)
    # blocks ahead, per stream of rows_lockstep. On a Zen 3 (the default plan): 2 KiB ahead for blocks
    # narrower than a vector (4x4 reached 0.88-0.97 of the bound with it, 0.84-0.94 without at
    # 70-90 %; 1 KiB a stream instead of 2 took it to 0.87-0.98x the time); none for taller blocks,
    # which stream in lockstep like a plain read: 16x1 0.83-1.02 without vs 0.74-0.89 with, 8x8
    # 0.75-0.95 vs 0.68-0.84 (3072x768 at 70-95 %, cold, batch 1; same-run A/Bs)
    pd = pf.ahead(4 * r * c, S)
    PF = pd > 0
    last = max(nnzb - 1, 0)

    # blocks narrower than a vector (4x4, 2x2...): batch tiles of x^T at full vector width
    tiled = int(r % 8 != 0)
    single_from = lambda B: B // TB * TB * tiled + (B - B // TB * TB * tiled) // MB * MB  # noqa: E731
    # batch 1: blocks narrower than a vector (4x4, 4x2, 2x4...) share one: P block columns per
    # vector, lane l = row l % r of column l // r (4x4: 2 FMAs a block instead of 4 half-width ones)
    P = 8 // r if r < 8 and 8 % r == 0 and c % (8 // r) == 0 else 1
    VW = r * P           # accumulator width
    VB = c // P          # FMAs (accumulator vectors) per block
    # accumulators per stream: one per FMA of a block breaks its FMA chain, capped at
    # 2 x :data:`PAIR_ACC_VECTORS` registers over the S streams (8x8: 2 x 8 filled all 16 AVX2
    # registers, and LLVM spilled and shuffled ~30 registers per block pair)
    A = max(1, min(VB, 2 * PAIR_ACC_VECTORS // S // -(-VW // 8)))
    bs = r * c
    GW = _bsr_group_width(r, c)
    G = bsr_groups(nnzb)
    # block rows of >= 32 blocks on average: the batch paths walk them group by group
    LONG = nnzb >= 32 * nbr
    TB, RA, batch_tile, repack = _bsr_batch_tiles(
        K, r, c, dtype, lambda GI, g, j: _gcol_at(GI, g, j, bs, GW),
        lambda gv, g, j, i, cc: gv[_gblock_at(g, j, bs, GW) + cc * r + i], LONG)

    @T.macro
    def row_tile_block(X, GI, gv, acc, x0, g, j):
        for cc in T.unroll(c):
            for mi in T.unroll(MB):
                for i in T.vectorized(r):
                    acc[mi, i] = acc[mi, i] + gv[_gblock_at(g, j, bs, GW) + cc * r + i] * X[
                        x0 + mi, T.Cast("int64", _gcol_at(GI, g, j, bs, GW)) * c + cc]

    row_tile_walk = _block_walk(row_tile_block, LONG)

    @T.macro
    def chunk(X, XP, crow, GI, gv, bias, Y, B, ch, acc, acct):
        # rows [0, t_end): x^T batch tiles; [t_end, m_end): MB-row register tiles; the rest: rows_lockstep()
        t_end: T.let = B // TB * TB * tiled
        m_end: T.let = single_from(B)
        # tiles outside the chunk's block rows: a tile's rows of x stay in L1 across the chunk
        for t in range(t_end // TB):
            for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
                batch_tile(XP, crow, GI, gv, bias, Y, ch * per_chunk + bri, t * TB, acct)
        for bo in range((m_end - t_end) // MB):
            for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
                br: T.let = ch * per_chunk + bri
                for mi in T.unroll(MB):
                    for i in T.vectorized(r):
                        acc[mi, i] = bias[br * r + i]
                row_tile_walk(crow, br, X, GI, gv, acc, t_end + bo * MB)
                for mi in T.unroll(MB):
                    for i in T.vectorized(r):
                        Y[t_end + bo * MB + mi, br * r + i] = acc[mi, i]

    prefetch_block = _grouped_prefetch(bs, pd, last, pf.locality)

    @T.macro
    def fma_plain(X, GI, gv, acc1, b, j, a0):
        for q in T.unroll(c):
            for i in T.vectorized(r):
                acc1[a0 + q % A, i] = acc1[a0 + q % A, i] + gv[_gblock(j, bs) + q * r + i] * X[
                    b, T.Cast("int64", _gcol(GI, j, bs)) * c + q]

    @T.macro
    def fma_packed(X, GI, gv, acc1, b, j, a0):
        for q in T.unroll(VB):
            acc1[a0 + q % A, T.ramp(0, 1, VW)] = acc1[a0 + q % A, T.ramp(0, 1, VW)] + gv[
                T.ramp(_gblock(j, bs) + q * P * r, 1, VW)] * tirx.Shuffle(
                    [X[b, T.ramp(T.Cast("int64", _gcol(GI, j, bs)) * c + q * P, 1, P)]] * r,  # >= VW lanes
                    [tirx.IntImm("int32", v // r) for v in range(VW)])

    block_fma = fma_packed if P > 1 else fma_plain

    @T.macro
    def store(acc1, bias, Y, b, br, a0):
        for a in T.unroll(1, A):
            for i in T.vectorized(VW):
                acc1[a0, i] = acc1[a0, i] + acc1[a0 + a, i]
        for p in T.unroll(1, P):
            for i in T.vectorized(r):
                acc1[a0, i] = acc1[a0, i] + acc1[a0, p * r + i]
        for i in T.vectorized(r):
            Y[b, br * r + i] = acc1[a0, i] + bias[br * r + i]

    @T.macro
    def rows_lockstep(X, crow, GI, gv, bias, Y, b, br0, nb, acc1, js, ns):
        """Row ``b`` of ``x`` alone against block rows ``[br0, br0 + nb)``, cut into ``S``
        contiguous parts: block row ``bri`` of each part walked block by block together (``S``
        accumulator sets), so the weights are read as ``S`` sequential streams in lockstep."""
        step: T.let = (nb + S - 1) // S
        for bri in range(step):
            for s in T.unroll(S):
                if s * step + bri < nb:
                    js[s] = crow[br0 + s * step + bri]
                    ns[s] = crow[br0 + s * step + bri + 1] - crow[br0 + s * step + bri]
                else:
                    js[s] = 0
                    ns[s] = 0
            m: T.let = _min_of(ns, S)
            for a in T.unroll(S * A):
                for i in T.vectorized(VW):
                    acc1[a, i] = T.Cast(dtype, 0)
            for t in range(m):
                for s in T.unroll(S):
                    if PF:
                        prefetch_block(GI, gv, js[s] + t)
                    block_fma(X, GI, gv, acc1, b, js[s] + t, s * A)
            for s in T.unroll(S):
                for t in range(ns[s] - m):
                    if PF:
                        prefetch_block(GI, gv, js[s] + m + t)
                    block_fma(X, GI, gv, acc1, b, js[s] + m + t, s * A)
            for s in T.unroll(S):
                if s * step + bri < nb:
                    store(acc1, bias, Y, b, br0 + s * step + bri, s * A)

    @T.prim_func(private=True)
    def bsr(x_h: T.handle, crow: T.Buffer((nbr + 1,), idx), gv: T.Buffer((G * GW,), dtype),
            bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        GI = T.decl_buffer((G * GW,), idx, data=gv.data)
        XP = T.alloc_buffer((B // TB * TB * tiled * K,), dtype)
        repack(X, XP, B * tiled)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((MB, r), dtype)
                acc1 = T.alloc_buffer((S * A, VW), dtype)
                acct = T.alloc_buffer((RA, r, TB), dtype)
                js = T.alloc_buffer((S,), idx)
                ns = T.alloc_buffer((S,), idx)
                chunk(X, XP, crow, GI, gv, bias, Y, B, ch, acc, acct)
                for b in range(single_from(B), B):
                    rows_lockstep(X, crow, GI, gv, bias, Y, b, ch * per_chunk,
                                  T.min(per_chunk, nbr - ch * per_chunk), acc1, js, ns)
        else:
            acc = T.alloc_buffer((MB, r), dtype)
            acc1 = T.alloc_buffer((S * A, VW), dtype)
            acct = T.alloc_buffer((RA, r, TB), dtype)
            js = T.alloc_buffer((S,), idx)
            ns = T.alloc_buffer((S,), idx)
            for ch in range(nch):
                chunk(X, XP, crow, GI, gv, bias, Y, B, ch, acc, acct)
            for b in range(single_from(B), B):
                rows_lockstep(X, crow, GI, gv, bias, Y, b, 0, nbr, acc1, js, ns)

    return _scheduled(bsr)


def bsr_col_vector_kernel(N: int, K: int, r: int, c: int, nnzb: int, idx: str, MB: int | None = None,
                          dtype: str = "float32", parallel: bool = True, pf: Prefetch | None = None):
    """BSR with ``c > r``: values ``[nnzb, r, c]``; vector over a block's ``c`` columns, then a sum.

    ``MB`` rows of ``x`` share each loaded block (1x16: 4 rows x 2 vectors = 8 accumulators; one
    row alone is an FMA-latency chain); single rows prefetch the weight stream as ``pf`` says
    (default: :data:`DEFAULT_PLAN`'s ``narrow_blocks``).
    """
    pf = DEFAULT_PLAN.bsr(r, c) if pf is None else pf
    if MB is None:
        MB = _bsr_rows_per_tile(r * -(-c // 8))
    nbr = N // r
    per_chunk = max(1, ROWS_PER_CHUNK // r)
    nch = _chunks(nbr, per_chunk)
    flops_per_row = 2 * nnzb * r * c * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)
    # 1x16 on a Zen 3: 1 KiB a stream instead of 2 took 0.93-0.95x the time at 70-80 % (equal at
    # 90-95 %); 512 B / 1.5 KiB a stream were no better
    pd = pf.ahead(4 * r * c, READ_STREAMS)
    PF = pd > 0
    last = max(nnzb - 1, 0)

    @T.macro
    def hsum_tree(A, mi, i, bias, Y, b, o, red):
        """``Y[b, o] = bias[o] + sum(A[mi, i, :])`` for ``c % 8 == 0``: 8-lane adds in place, one
        4-lane add of the two halves, then two scalar levels (a 16-add scalar chain per output was
        most of the 1x16 kernel's time at batch 64). Written this way, on accumulators updated as
        8-lane vectors, LLVM emits extract / add / shuffle. The earlier form (16-lane accumulators,
        copied into an 8-lane buffer that was then halved in place) made it rebuild the second half
        lane by lane, ~15 extra instructions: 1x16 at 95 %, batch 1, 36 instead of 29 us hot."""
        for cb in T.unroll(1, c // 8):
            for q in T.vectorized(8):
                A[mi, i, q] = A[mi, i, q] + A[mi, i, cb * 8 + q]
        for q in T.vectorized(4):
            red[q] = A[mi, i, q] + A[mi, i, q + 4]
        Y[b, o] = bias[o] + ((red[0] + red[2]) + (red[1] + red[3]))

    @T.macro
    def hsum_scalar(A, mi, i, bias, Y, b, o, red):
        red[0] = bias[o]
        for cc in range(c):
            red[0] = red[0] + A[mi, i, cc]
        Y[b, o] = red[0]

    hsum = hsum_tree if c % 8 == 0 else hsum_scalar
    prefetch_block = _block_prefetch(r, c, pd, last, pf.locality)
    cv = 8 if c % 8 == 0 else c  # vector width over a block's columns: one AVX2 register
    RS = READ_STREAMS
    # rows of x from here on run alone (rows()): after the x^T batch tiles and the MB-row tiles
    single_from = lambda B: B // TB * TB + B % TB // MB * MB  # noqa: E731
    TB, RA, batch_tile, repack = _bsr_batch_tiles(K, r, c, dtype, lambda col, g, j: col[j],
                                                  lambda val, g, j, i, cc: val[j, i, cc])

    @T.macro
    def chunk(X, XP, crow, col, val, bias, Y, B, ch, acc, acct, s):
        # rows [0, t_end): x^T batch tiles; [t_end, m_end): MB-row register tiles; the rest: rows()
        t_end: T.let = B // TB * TB
        m_end: T.let = single_from(B)
        # tiles outside the chunk's block rows: a tile's rows of x stay in L1 / L2 across the chunk
        for t in range(t_end // TB):
            for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
                batch_tile(XP, crow, col, val, bias, Y, ch * per_chunk + bri, t * TB, acct)
        for bo in range((m_end - t_end) // MB):
            for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
                br: T.let = ch * per_chunk + bri
                for mi in T.unroll(MB):
                    for i in T.unroll(r):
                        for cb in T.unroll(c // cv):
                            for q in T.vectorized(cv):
                                acc[mi, i, cb * cv + q] = T.Cast(dtype, 0)
                for j in range(crow[br], crow[br + 1]):
                    for mi in T.unroll(MB):
                        for i in T.unroll(r):
                            for cb in T.unroll(c // cv):
                                for q in T.vectorized(cv):
                                    acc[mi, i, cb * cv + q] = acc[mi, i, cb * cv + q] + val[j, i, cb * cv + q] * X[
                                        t_end + bo * MB + mi, T.Cast("int64", col[j]) * c + cb * cv + q]
                for mi in range(MB):
                    for i in range(r):
                        hsum(acc, mi, i, bias, Y, t_end + bo * MB + mi, br * r + i, s)

    @T.macro
    def rows(X, crow, col, val, bias, Y, b, br0, nb, acc1, s):
        """Row ``b`` of ``x`` alone against block rows ``[br0, br0 + nb)``, as :data:`READ_STREAMS`
        interleaved streams, weights prefetched.

        Kept out of :func:`chunk` so that the serial kernel walks every block row in one loop (and
        its streams are halves of the whole matrix), with the row of ``x`` outside it: at 90-95 % a
        block row has 2-5 blocks, so the loop levels around them count (1x16 at 95 %, batch 1,
        measured before the ``T.let`` bindings: 31 -> 24 us hot)."""
        step: T.let = (nb + RS - 1) // RS
        for bri in range(step):
            for st in T.unroll(RS):
                if st * step + bri < nb:
                    br: T.let = br0 + st * step + bri
                    for i in T.unroll(r):
                        for cb in T.unroll(c // cv):
                            for q in T.vectorized(cv):
                                acc1[0, i, cb * cv + q] = T.Cast(dtype, 0)
                    for j in range(crow[br], crow[br + 1]):
                        if PF:
                            prefetch_block(val, col, j)
                        for i in T.unroll(r):
                            for cb in T.unroll(c // cv):
                                for q in T.vectorized(cv):
                                    acc1[0, i, cb * cv + q] = acc1[0, i, cb * cv + q] + val[j, i, cb * cv + q] * X[
                                        b, T.Cast("int64", col[j]) * c + cb * cv + q]
                    for i in range(r):
                        hsum(acc1, 0, i, bias, Y, b, br * r + i, s)

    @T.prim_func(private=True)
    def bsr(x_h: T.handle, crow: T.Buffer((nbr + 1,), idx), col: T.Buffer((nnzb,), idx),
            val: T.Buffer((nnzb, r, c), dtype), bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        XP = T.alloc_buffer((B // TB * TB * K,), dtype)
        repack(X, XP, B)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((MB, r, c), dtype)
                acc1 = T.alloc_buffer((1, r, c), dtype)
                acct = T.alloc_buffer((RA, r, TB), dtype)
                s = T.alloc_buffer((8,), dtype)
                chunk(X, XP, crow, col, val, bias, Y, B, ch, acc, acct, s)
                for b in range(single_from(B), B):
                    rows(X, crow, col, val, bias, Y, b, ch * per_chunk, T.min(per_chunk, nbr - ch * per_chunk),
                         acc1, s)
        else:
            acc = T.alloc_buffer((MB, r, c), dtype)
            acc1 = T.alloc_buffer((1, r, c), dtype)
            acct = T.alloc_buffer((RA, r, TB), dtype)
            s = T.alloc_buffer((8,), dtype)
            for ch in range(nch):
                chunk(X, XP, crow, col, val, bias, Y, B, ch, acc, acct, s)
            for b in range(single_from(B), B):
                rows(X, crow, col, val, bias, Y, b, 0, nbr, acc1, s)

    return _scheduled(bsr)


def bsr_kernel(N: int, K: int, r: int, c: int, nnzb: int, idx: str, dtype: str = "float32",
               parallel: bool = True, pf: Prefetch | None = None):
    """The BSR kernel for ``r x c`` blocks: :func:`bsr_row_vector_kernel` when ``r >= c``, else
    :func:`bsr_col_vector_kernel`; arguments ``(x, crow_indices, *bsr_stored(...), bias, y)``."""
    gen = bsr_row_vector_kernel if r >= c else bsr_col_vector_kernel
    return gen(N, K, r, c, nnzb, idx, dtype=dtype, parallel=parallel, pf=pf)


def bsr_stored(col, values, r: int, c: int) -> tuple:
    """Packed BSR ``col_indices [nnzb]`` and ``values [nnzb, r, c]`` as :func:`bsr_kernel` reads
    them (numpy arrays, passed after ``crow_indices``).

    ``r >= c`` (the row-vector kernel): one float32 array of groups of :data:`BSR_GROUP` blocks,
    each the group's int32 column indices (bit-cast) then its blocks stored ``[c, r]``, the last
    group padded with zero blocks at column 0. ``r < c`` (the column-vector kernel): int32 column
    indices and ``[nnzb, r, c]`` values, apart (grouped, 1x16 took 0.97-1.05x the time at 70-95 %,
    with 2-4 streams)."""
    import numpy as np

    col = np.asarray(col, np.int32)
    values = np.asarray(values, np.float32)
    nnzb = len(col)
    if values.shape != (nnzb, r, c):
        raise ValueError(f"bsr_stored: values of shape {values.shape}, expected {(nnzb, r, c)}")
    if r < c:
        return col, np.ascontiguousarray(values)
    values = values.transpose(0, 2, 1)
    G = bsr_groups(nnzb)
    cols = np.zeros(G * BSR_GROUP, np.int32)
    cols[:nnzb] = col
    blocks = np.zeros((G * BSR_GROUP, r * c), np.float32)
    blocks[:nnzb] = values.reshape(nnzb, r * c)
    out = np.empty((G, _bsr_group_width(r, c)), np.float32)
    out[:, :BSR_GROUP] = cols.reshape(G, BSR_GROUP).view(np.float32)
    out[:, BSR_GROUP:] = blocks.reshape(G, BSR_GROUP * r * c)
    return (out.reshape(-1),)


def sell_layout(crow, col, values, R: int = SELL_R, sigma: int = SELL_SIGMA, align: int = ROW_UNROLL):
    """CSR -> SELL-R (sliced ELLPACK): rows sorted by length, ``R`` rows per slice in vector lanes.

    Returns ``(sptr [S+1], col [E, R], values [E, R], perm [S*R])``: slice ``s`` owns entries
    ``sptr[s]:sptr[s+1]``, lane ``v`` of an entry belongs to output row ``perm[s*R + v]`` (``>= N``
    for padding lanes). Rows are sorted by length (longest first) so the rows sharing a slice have
    nearly the same length: the padding (zero values at column 0) is 1-3 % of the entries on random
    sparsity. The padding is counted in the bytes a kernel streams.
    """
    import numpy as np

    crow = np.asarray(crow, np.int64)
    col = np.asarray(col)
    values = np.asarray(values, np.float32)
    n = len(crow) - 1
    lens = np.diff(crow)
    # sort by length within windows of ``sigma`` rows (SELL-C-sigma): slices of similar lengths, and
    # a slice's output rows stay close together (its batched stores hit few cache lines)
    window = np.arange(n) // sigma
    order = np.lexsort((-lens, window))
    slices = max(1, -(-n // R))
    perm = np.full(slices * R, n, np.int32)
    perm[:n] = order
    slen = np.zeros(slices * R, np.int64)
    slen[:n] = lens[order]
    slen = slen.reshape(slices, R).max(1)
    # slice lengths rounded up to ``align`` (the kernels' unroll): no remainder loop with a
    # data-dependent trip count per slice (3072x768 at 90 %: +2 % bytes)
    slen = -(-slen // align) * align
    sptr = np.concatenate([[0], np.cumsum(slen)]).astype(np.int32)
    entries = max(int(sptr[-1]), 1)
    col_out = np.zeros((entries, R), col.dtype)
    val_out = np.zeros((entries, R), np.float32)
    where = np.empty(n, np.int64)
    where[order] = np.arange(n)  # sorted position of each row
    rows = np.repeat(np.arange(n), lens)
    within = np.arange(len(values)) - crow[rows]
    slot = where[rows]
    dest = sptr[slot // R] + within
    col_out[dest, slot % R] = col
    val_out[dest, slot % R] = values
    return sptr, col_out, val_out, perm


def csr_kernel(N: int, K: int, slices: int, entries: int, idx: str, dtype: str = "float32",
               U: int = ROW_UNROLL, parallel: bool = True, sigma: int = SELL_SIGMA, bmi: bool = False,
               pf: Prefetch | None = None):
    """Unstructured sparse ``Y[B, N] = X @ W^T + bias`` on the SELL layout of :func:`sell_layout`.

    Reads ``xt = X^T [K, B]``. One slice = ``SELL_R`` output rows in the lanes of one vector:

    * rows of ``x`` one at a time (all of them at batch 1): the vector of ``x`` at the entry's 8
      columns is assembled from scalar loads (no AVX2 gather: it is slower on Zen 3) and FMA'd into
      ``U`` rotating accumulators; no horizontal sums, and one loop exit per 8 rows instead of per row
      (the per-row CSR loop lost ~1 mispredicted exit per row). 3072x768 at 90 %, batch 1, cold:
      207 us (scipy) / 148 us (per-row CSR) / 104 us (this, with prefetch); int64 index words and
      one-window chunks then took 0.87-0.92x of that time (A/B on separate cold copies). A slice's
      sums are one vector store in slice order; one pass through ``perm`` at the end puts them in
      their output rows.
    * tiles of 16 (then 8) rows of ``x``, repacked per tile: vectors over the batch, 4 (8) lanes'
      rows at a time: 8 independent accumulators (the per-row kernel had one FMA chain).

    ``sigma`` must be the layout's window: a chunk (parallel task) is one window's slices, which
    hold exactly the window's output rows. ``bmi``: the target has x86 BMI (``bextr``), used to take
    int16 columns out of their index words. ``pf``: the batch-1 walk's software prefetch (default:
    :data:`DEFAULT_PLAN`'s ``csr``; on a Zen 3 1 KiB and 512 B ahead were slower than 2 KiB).
    """
    pf = DEFAULT_PLAN.csr if pf is None else pf
    R = SELL_R
    flops_per_row = 2 * entries * R * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)
    if sigma % R:
        raise ValueError(f"csr_kernel: the SELL window ({sigma} rows) must be a multiple of {R}")
    per_chunk = sigma // R   # a chunk is one window of the layout: its slices cover its rows
    nch = _chunks(slices, per_chunk)
    pd = pf.ahead(4 * R)  # entries ahead
    PF = pd > 0
    loc = pf.locality
    i32 = "int32"

    packed = idx == "int16"

    def column(col, CW, e, v):
        if not packed:
            return T.Cast("int64", col[e, v])
        # 4 int16 columns per int64 word: 2 loads + shifts instead of 8 index loads (the loads,
        # not the FMAs, bound this loop: 17 loads per 8 nonzeros otherwise)
        word = CW[e * (R // 4) + v // 4]
        if bmi and v % 4 in (1, 2):
            # the middle two columns in one bextr each, where LLVM's shifts took a copy and 1-2
            # operations more: 14 -> 8 operations per 8 columns, the loop being bound by its
            # operation count (loads of the columns instead: 1.13x the time hot). 3072x768 at 70-95 %,
            # batch 1, cold: 0.94-0.97x the time (two same-run A/Bs)
            return T.call_llvm_pure_intrin("int64", "llvm.x86.bmi.bextr.64", word,
                                           T.int64(16 * (v % 4) | 16 << 8))
        return T.bitwise_and(T.shift_right(word, T.int64(16 * (v % 4))), T.int64(0xFFFF))

    def xvec(XF, col, CW, e, stride, off):
        """The ``R`` values of ``x`` at entry ``e``'s columns (scalar loads, one vector)."""
        loads = [XF[column(col, CW, e, v) * stride + off] for v in range(R)]
        return tirx.Shuffle(loads, [tirx.IntImm("int32", v) for v in range(R)])

    @T.macro
    def lanes(XF, sptr, col, CW, val, YS, g, slot, stride, b, acc):
        """Slice ``g`` for row ``b`` of ``x``: its ``R`` sums, in slice order, to ``YS[slot:]``."""
        s0: T.let = T.Cast("int64", sptr[g])
        ln: T.let = T.Cast("int64", sptr[g + 1]) - s0
        for u in T.unroll(U):
            acc[u, T.ramp(0, 1, R)] = T.Broadcast(T.Cast(dtype, 0), R)
        for jo in range(ln // U):
            if PF:
                _prefetch(T.address_of(val[T.min(s0 + jo * U + pd, entries - 1), 0]), loc)
                _prefetch(T.address_of(val[T.min(s0 + jo * U + pd + 2, entries - 1), 0]), loc)
                _prefetch(T.address_of(col[T.min(s0 + jo * U + pd, entries - 1), 0]), loc)
            for u in T.unroll(U):
                acc[u, T.ramp(0, 1, R)] = acc[u, T.ramp(0, 1, R)] + val[
                    s0 + jo * U + u, T.ramp(0, 1, R)] * xvec(XF, col, CW, s0 + jo * U + u, stride, b)
        for jt in range(ln - ln // U * U):
            acc[0, T.ramp(0, 1, R)] = acc[0, T.ramp(0, 1, R)] + val[
                s0 + ln // U * U + jt, T.ramp(0, 1, R)] * xvec(XF, col, CW, s0 + ln // U * U + jt, stride, b)
        for u in range(1, U):
            acc[0, T.ramp(0, 1, R)] = acc[0, T.ramp(0, 1, R)] + acc[u, T.ramp(0, 1, R)]
        YS[T.ramp(slot, 1, R)] = acc[0, T.ramp(0, 1, R)]

    @T.macro
    def scatter(YS, perm, bias, Y, lo, hi, b, slot):
        """Sums ``lo:hi`` (slice order, at ``YS[slot + lo:]``) of row ``b`` to their output rows."""
        for i in range(lo, hi):
            if perm[i] < N:
                Y[b, perm[i]] = YS[slot + i] + bias[perm[i]]

    @T.macro
    def tile(XP, sptr, col, val, perm, bias, YT, g, b0, TW, LG, acc):
        """Rows ``b0 : b0 + TW`` of ``x`` (packed ``[K, TW]`` at ``XP[b0 * K]``), ``LG`` lanes' rows at
        a time: ``LG x TW/8`` = 8 accumulator vectors. Results go to the chunk's ``YT [rows, 16]``
        (L1), written out to ``Y`` row-contiguously once the chunk's slices are done: 16 scalar
        stores per output into 16 rows of ``Y`` missed L2 and took ~half of the batch-64 time."""
        s0: T.let = T.Cast("int64", sptr[g])
        ln: T.let = T.Cast("int64", sptr[g + 1]) - s0
        for h in range(R // LG):
            for v in T.unroll(LG):
                for q in T.vectorized(TW):
                    acc[v, q] = T.Cast(dtype, 0)
            for e in range(ln):
                for v in T.unroll(LG):
                    for q in T.vectorized(TW):
                        acc[v, q] = acc[v, q] + val[s0 + e, h * LG + v] * XP[
                            b0 * K + T.Cast("int64", col[s0 + e, h * LG + v]) * TW + q]
            for v in range(LG):
                if perm[g * R + h * LG + v] < N:
                    for q in T.vectorized(TW):
                        YT[(perm[g * R + h * LG + v] - g // per_chunk * sigma) * 16 + q] = (
                            acc[v, q] + bias[perm[g * R + h * LG + v]])

    @T.macro
    def flush(YT, Y, B, ch, b0, TW):
        for q in range(TW):
            for r in range(T.min(sigma, N - ch * sigma)):  # the last window may be partial
                Y[b0 + q, ch * sigma + r] = YT[r * 16 + q]

    @T.macro
    def chunk(XF, XP, sptr, col, CW, val, perm, bias, Y, B, ch, acc, acc16, acc8, YT, YS, own_scatter):
        # a chunk = the slices of one sorting window (``sigma`` output rows); batch tiles outside
        # its slices: the window's weights (L2) are reused by every tile
        for t in range(B // 16):
            for gi in range(T.min(per_chunk, slices - ch * per_chunk)):
                tile(XP, sptr, col, val, perm, bias, YT, ch * per_chunk + gi, t * 16, 16, 4, acc16)
            flush(YT, Y, B, ch, t * 16, 16)
        if B % 16 >= 8:
            for gi in range(T.min(per_chunk, slices - ch * per_chunk)):
                tile(XP, sptr, col, val, perm, bias, YT, ch * per_chunk + gi, B // 16 * 16, 8, 8, acc8)
            flush(YT, Y, B, ch, B // 16 * 16, 8)
        # rows of x one at a time (the B % 8 left; all of them at batch 1): a slice's sums are one
        # vector store to YS (slice order) and reach their output rows through perm in one pass,
        # after every chunk (serial), or at the chunk's end (parallel: its rows are its own)
        for gi in range(T.min(per_chunk, slices - ch * per_chunk)):
            if B == 1:  # constant stride and row: simpler addressing in the batch-1 loop
                lanes(XF, sptr, col, CW, val, YS, ch * per_chunk + gi, (ch * per_chunk + gi) * R, 1, 0, acc)
            else:
                for bt in range(B % 8):
                    lanes(XF, sptr, col, CW, val, YS, ch * per_chunk + gi,
                          bt * slices * R + (ch * per_chunk + gi) * R, B, B // 8 * 8 + bt, acc)
        if own_scatter:
            for bt in range(B % 8):
                scatter(YS, perm, bias, Y, ch * sigma, T.min((ch + 1) * sigma, slices * R),
                        B // 8 * 8 + bt, bt * slices * R)

    @T.prim_func(private=True)
    def csr(xt_h: T.handle, sptr: T.Buffer((slices + 1,), i32), col: T.Buffer((entries, R), idx),
            val: T.Buffer((entries, R), dtype), perm: T.Buffer((slices * R,), i32),
            bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        XT = T.match_buffer(xt_h, (K, B), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        XF = T.decl_buffer((K * B,), dtype, data=XT.data)
        CW = T.decl_buffer((entries * R // 4,), "int64", data=col.data)
        # x^T repacked per batch tile ([K, 16] per 16 rows, then [K, 8]): a tile's rows of x are
        # one contiguous 64 / 32-byte vector per column
        XP = T.alloc_buffer((B // 8 * 8 * K,), dtype)
        for t in range(B // 16):
            for k in range(K):
                for q in T.vectorized(16):
                    XP[t * 16 * K + k * 16 + q] = XT[k, t * 16 + q]
        if B % 16 >= 8:
            for k in range(K):
                for q in T.vectorized(8):
                    XP[B // 16 * 16 * K + k * 8 + q] = XT[k, B // 16 * 16 + q]
        # the single rows' sums in slice order. Scattering each slice's 8 sums through perm as the
        # slice ended (stores waiting on perm's cold loads) took 1.04-1.13x the time of one pass at
        # the end, which reads perm as a stream (3072x768 at 70-95 %, batch 1, cold, same-run A/B on
        # separate copies; csr_c_reference.c's `each` column: 0.97-1.12x)
        YS = T.alloc_buffer((B % 8 * slices * R,), dtype)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((U, R), dtype)
                acc16 = T.alloc_buffer((4, 16), dtype)
                acc8 = T.alloc_buffer((8, 8), dtype)
                YT = T.alloc_buffer((sigma * 16,), dtype)
                chunk(XF, XP, sptr, col, CW, val, perm, bias, Y, B, ch, acc, acc16, acc8, YT, YS, True)
        else:
            acc = T.alloc_buffer((U, R), dtype)
            acc16 = T.alloc_buffer((4, 16), dtype)
            acc8 = T.alloc_buffer((8, 8), dtype)
            YT = T.alloc_buffer((sigma * 16,), dtype)
            for ch in range(nch):
                chunk(XF, XP, sptr, col, CW, val, perm, bias, Y, B, ch, acc, acc16, acc8, YT, YS, False)
            for bt in range(B % 8):
                scatter(YS, perm, bias, Y, 0, slices * R, B // 8 * 8 + bt, bt * slices * R)

    return _scheduled(csr)


def nm_kernel(N: int, K: int, n: int, m: int, pos_dtype: str, dtype: str = "float32",
              V: int = BATCH_VEC, U: int = ROW_UNROLL, rows_per_chunk: int = ROWS_PER_CHUNK,
              parallel: bool = True):
    """N:M ``Y[B, N] = X @ W^T + bias`` with values/positions ``[N, K*n/m]``; reads ``X^T [K, B]``.

    The column of stored entry ``j`` of a row is ``(j // n) * m + pos[row, j]``; same loop structure
    as :func:`csr_kernel` with a fixed row length.
    """
    L = K // m * n
    nch = _chunks(N, rows_per_chunk)
    flops_per_row = 2 * N * L * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)

    @T.macro
    def chunk(XT, val, pos, bias, Y, B, ch, acc, accu, s):
        for rr in range(T.min(rows_per_chunk, N - ch * rows_per_chunk)):
            row: T.let = ch * rows_per_chunk + rr
            for bo in range(B // V):
                for v in T.vectorized(V):
                    acc[v] = bias[row]
                for j in range(L):
                    for v in T.vectorized(V):
                        acc[v] = acc[v] + val[row, j] * XT[
                            T.Cast("int64", j // n * m + T.Cast("int32", pos[row, j])),
                            bo * V + v]
                for v in range(V):
                    Y[bo * V + v, row] = acc[v]
            for bt in range(B - B // V * V):
                b: T.let = B // V * V + bt
                for u in T.unroll(U):
                    accu[u] = T.Cast(dtype, 0)
                for jo in range(L // U):
                    for u in T.unroll(U):
                        accu[u] = accu[u] + val[row, jo * U + u] * XT[
                            T.Cast("int64", (jo * U + u) // n * m
                                   + T.Cast("int32", pos[row, jo * U + u])), b]
                s[0] = bias[row]
                for jt in range(L - L // U * U):
                    s[0] = s[0] + val[row, L // U * U + jt] * XT[
                        T.Cast("int64", (L // U * U + jt) // n * m
                               + T.Cast("int32", pos[row, L // U * U + jt])), b]
                for u in range(U):
                    s[0] = s[0] + accu[u]
                Y[b, row] = s[0]

    @T.prim_func(private=True)
    def nm(xt_h: T.handle, val: T.Buffer((N, L), dtype), pos: T.Buffer((N, L), pos_dtype),
           bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        XT = T.match_buffer(xt_h, (K, B), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((V,), dtype)
                accu = T.alloc_buffer((U,), dtype)
                s = T.alloc_buffer((1,), dtype)
                chunk(XT, val, pos, bias, Y, B, ch, acc, accu, s)
        else:
            acc = T.alloc_buffer((V,), dtype)
            accu = T.alloc_buffer((U,), dtype)
            s = T.alloc_buffer((1,), dtype)
            for ch in range(nch):
                chunk(XT, val, pos, bias, Y, B, ch, acc, accu, s)

    return _scheduled(nm)


NM_LANES_M = (2, 4, 8)


def nm_lanes_supported(n_out: int, k: int, n: int, m: int, avx2: bool) -> bool:
    """Whether :func:`nm_lanes_kernel` applies: AVX2, ``m`` in 2/4/8 and ``k % 8 == 0``."""
    return avx2 and m in NM_LANES_M and 0 < n <= m and k % 8 == 0 and n_out > 0


def nm_lane_layout(values, positions, R: int = SELL_R):
    """N:M ``values``/``positions`` ``[N, L]`` -> ``[ceil(N/R), L, R]`` (rows in lanes, zero-padded)."""
    import numpy as np

    values = np.asarray(values, np.float32)
    positions = np.asarray(positions, np.uint8)
    n, length = values.shape
    groups = -(-n // R)
    v = np.zeros((groups * R, length), np.float32)
    p = np.zeros((groups * R, length), np.uint8)
    v[:n], p[:n] = values, positions
    return (np.ascontiguousarray(v.reshape(groups, R, length).transpose(0, 2, 1)),
            np.ascontiguousarray(p.reshape(groups, R, length).transpose(0, 2, 1)))


def nm_lanes_kernel(N: int, K: int, n: int, m: int, U: int = ROW_UNROLL, dtype: str = "float32",
                    parallel: bool = True, pf: Prefetch | None = None):
    """N:M (``m`` in 2/4/8) ``Y[B, NP] = X[B, K] @ W^T + bias``, ``NP = ceil(N/8)*8``; AVX2 only.

    8 output rows in the lanes of a vector (:func:`nm_lane_layout`). For each 8-column window of
    ``x`` (one vector load), each stored entry selects its lane's column with ``vpermps`` (the uint8
    position + the group's offset in the window): no gathers and no index arithmetic per nonzero.
    3072x768 1:4, batch 1, cold: 346 us (per-row kernel) -> 185 us; scipy 532, torch CSR 419.

    The serial kernel walks group ``g`` and group ``g + ceil(G/2)`` window by window together
    (:func:`group_pair`, two accumulator sets of :data:`PAIR_ACC_VECTORS`), the weights read as two
    sequential streams in lockstep without software prefetch, like the taller BSR blocks: 3072x768,
    batch 1, cold: 1:4 0.97-1.00 of the bound (0.87-0.95 before), 1:8 0.94-0.97 (0.85-0.86), 2:4
    1.03 (0.91); same-run A/Bs (a Zen 3). ``pf``: that walk's software prefetch (default:
    :data:`DEFAULT_PLAN`'s ``nm``, none). Patterns with more than 4 entries a window (3:4, 7:8) keep
    one group at a time, prefetched :data:`PREFETCH_BYTES` ahead.
    """
    pf = DEFAULT_PLAN.nm if pf is None else pf
    R = SELL_R
    E = 8 // m * n            # stored entries per 8-column window
    W = K // 8
    L = K // m * n
    G = -(-N // R)
    NP = G * R
    WU = max(1, -(-U // E))   # windows per unrolled step: >= U independent accumulators
    A = WU * E
    # the serial kernel walks two groups in lockstep (group_pair) while both accumulator sets fit in
    # half the registers
    WP = max(1, PAIR_ACC_VECTORS // E)
    AP = WP * E
    PAIRED = E <= PAIR_ACC_VECTORS
    flops_per_row = 2 * NP * L * 2
    threshold = _parallel_threshold(parallel)
    pd = PREFETCH_BYTES // (4 * R)
    pd2 = pf.ahead(4 * R, 2)  # entries ahead, per group of group_pair
    loc = pf.locality
    u8 = "uint8"

    def select(X, pos, b, g, w, e):
        """``x`` at the columns of entry ``e`` of window ``w`` for the 8 rows of group ``g``."""
        idx = T.Cast("int32x8", pos[g, w * E + e, T.ramp(0, 1, R)]) + T.Broadcast(T.int32(e // n * m), R)
        return T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps",
                                       X[b, T.ramp(w * 8, 1, R)], idx)

    @T.macro
    def entry_fma(X, val, pos, acc, a, b, g, w, e):
        acc[a, T.ramp(0, 1, R)] = acc[a, T.ramp(0, 1, R)] + val[g, w * E + e, T.ramp(0, 1, R)] * select(
            X, pos, b, g, w, e)

    @T.macro
    def finish(acc, a0, n, bias, Y, b, g):
        """Sum accumulators ``a0 .. a0 + n`` and store group ``g``'s 8 outputs of row ``b``."""
        for a in range(1, n):
            acc[a0, T.ramp(0, 1, R)] = acc[a0, T.ramp(0, 1, R)] + acc[a0 + a, T.ramp(0, 1, R)]
        Y[b, T.ramp(g * R, 1, R)] = acc[a0, T.ramp(0, 1, R)] + bias[T.ramp(g * R, 1, R)]

    @T.macro
    def group(X, val, pos, VF, PF, bias, Y, B, g, acc):
        for b in range(B):
            for a in T.unroll(A):
                acc[a, T.ramp(0, 1, R)] = T.Broadcast(T.Cast(dtype, 0), R)
            for wo in range(W // WU):
                # along the whole stream (flat views), into the next groups: a group is only
                # L * 32 bytes (3 KiB at 1:8), shorter than the prefetch distance
                _prefetch(T.address_of(VF[T.min((g * L + wo * A + pd) * R, G * L * R - 1)]))
                _prefetch(T.address_of(VF[T.min((g * L + wo * A + pd + 2) * R, G * L * R - 1)]))
                _prefetch(T.address_of(PF[T.min((g * L + wo * A + pd * 4) * R, G * L * R - 1)]))
                for wu in T.unroll(WU):
                    for e in T.unroll(E):
                        entry_fma(X, val, pos, acc, wu * E + e, b, g, wo * WU + wu, e)
            for wt in range(W - W // WU * WU):
                for e in T.unroll(E):
                    entry_fma(X, val, pos, acc, e, b, g, W // WU * WU + wt, e)
            finish(acc, 0, A, bias, Y, b, g)

    @T.macro
    def pair_prefetch(VF, PF, g, wo):
        # values: the two lines (4 entries of 8 lanes) a step reads, ``pd2`` entries ahead; positions
        # (a quarter of the bytes): the same byte distance, one line a step
        for gg in T.unroll(2):
            _prefetch(T.address_of(VF[T.min((gg * (G + 1) // 2 * L + g * L + wo * AP + pd2) * R,
                                            G * L * R - 1)]), loc)
            _prefetch(T.address_of(VF[T.min((gg * (G + 1) // 2 * L + g * L + wo * AP + pd2 + 2) * R,
                                            G * L * R - 1)]), loc)
            _prefetch(T.address_of(PF[T.min((gg * (G + 1) // 2 * L + g * L + wo * AP + pd2 * 4) * R,
                                            G * L * R - 1)]), loc)

    @T.macro
    def group_pair(X, val, pos, VF, PF, bias, Y, B, g, g2, acc):
        """Groups ``g`` and ``g2 = g + ceil(G / 2)`` walked window by window together: the weights
        read as two sequential streams in lockstep, prefetched as ``pf`` says."""
        for b in range(B):
            for a in T.unroll(2 * AP):
                acc[a, T.ramp(0, 1, R)] = T.Broadcast(T.Cast(dtype, 0), R)
            for wo in range(W // WP):
                if pd2 > 0:
                    pair_prefetch(VF, PF, g, wo)
                for wu in T.unroll(WP):
                    for e in T.unroll(E):
                        entry_fma(X, val, pos, acc, wu * E + e, b, g, wo * WP + wu, e)
                        entry_fma(X, val, pos, acc, AP + wu * E + e, b, g2, wo * WP + wu, e)
            for wt in range(W - W // WP * WP):
                for e in T.unroll(E):
                    entry_fma(X, val, pos, acc, e, b, g, W // WP * WP + wt, e)
                    entry_fma(X, val, pos, acc, AP + e, b, g2, W // WP * WP + wt, e)
            finish(acc, 0, AP, bias, Y, b, g)
            finish(acc, AP, AP, bias, Y, b, g2)

    @T.prim_func(private=True)
    def nm(x_h: T.handle, val: T.Buffer((G, L, R), dtype), pos: T.Buffer((G, L, R), u8),
           bias: T.Buffer((NP,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, NP), dtype)
        VF = T.decl_buffer((G * L * R,), dtype, data=val.data)
        PF = T.decl_buffer((G * L * R,), u8, data=pos.data)
        if B * flops_per_row >= threshold:
            for g in T.parallel(G):
                acc = T.alloc_buffer((A, R), dtype)
                group(X, val, pos, VF, PF, bias, Y, B, g, acc)
        else:
            acc = T.alloc_buffer((max(A, 2 * AP), R), dtype)
            if PAIRED:
                for g in range(G // 2):
                    group_pair(X, val, pos, VF, PF, bias, Y, B, g, g + (G + 1) // 2, acc)
                if G % 2 == 1:
                    group(X, val, pos, VF, PF, bias, Y, B, G // 2, acc)
            else:
                for g in range(G):
                    group(X, val, pos, VF, PF, bias, Y, B, g, acc)

    return _scheduled(nm)


def index_check_kernel(dtype: str, idx_dtype: str, wrap: bool, what: str):
    """``O[m] = I[m]`` as int64, checked against the indexed dimension ``V`` of ``X [A, V, P]`` (only
    its shape is used; every size symbolic) with torch's bounds: an index outside ``[0, V)`` --
    ``[-V, V)`` with ``wrap``, a negative index counting from the end and coming out as ``i + V`` --
    raises ``RuntimeError("<what>: index out of range ...")``. Placed before Relax ``take`` /
    ``gather_elements``, whose CPU code reads whatever an index points at (garbage just past the
    end, a segfault further)."""
    valid = "-size <= index < size" if wrap else "0 <= index < size"
    msg = f"{what}: index out of range (valid: {valid} of the indexed dimension)"
    i64 = "int64"

    @T.prim_func(private=True, s_tir=True)
    def index_check(x_h: T.handle, i_h: T.handle, o_h: T.handle):
        # opaque to FuseOps (8 = kOpaque): as an elementwise op it was fused with the reshapes around
        # it, and FuseTIR failed on the symbolic shapes
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        A = T.int64()
        V = T.int64()
        P = T.int64()
        M = T.int64()
        T.match_buffer(x_h, (A, V, P), dtype)  # for V only
        ids = T.match_buffer(i_h, (M,), idx_dtype)
        out = T.match_buffer(o_h, (M,), i64)
        with T.sblock("root"):  # Relax's reshape-pattern analysis requires a root block
            for m in range(M):
                raw: T.let = T.Cast(i64, ids[m])
                i: T.let = T.if_then_else(raw < 0, raw + V, raw) if wrap else raw
                T.Assert(0 <= i and i < V, msg)
                out[m] = i

    return _scheduled(index_check)


def nonzero_check_kernel(dtype: str, what: str):
    """``O[m] = I[m]`` checked nonzero: an integer divisor of 0 raises ``RuntimeError("<what>:
    ZeroDivisionError ...")`` as torch does, where the CPU's integer division traps (SIGFPE kills the
    process). Placed before integer ``floor_divide`` / ``trunc`` division / ``remainder`` / ``fmod``
    by a tensor."""
    msg = f"{what}: ZeroDivisionError (an integer divisor is 0)"

    @T.prim_func(private=True, s_tir=True)
    def nonzero_check(i_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})  # opaque to FuseOps, as index_check
        M = T.int64()
        vals = T.match_buffer(i_h, (M,), dtype)
        out = T.match_buffer(o_h, (M,), dtype)
        with T.sblock("root"):
            for m in range(M):
                T.Assert(vals[m] != T.Cast(dtype, 0), msg)
                out[m] = vals[m]

    return _scheduled(nonzero_check)


def bmm_kernel(M: int, K: int, N: int, MB: int = DENSE_MB, dtype: str = "float32",
               parallel: bool = True):
    """Batched ``C[b] = A[b] @ B[b]`` (``A [bt, M, K]``, ``B [bt, K, N]``), any ``N``.

    Attention products between activations: register tile ``MB x NB`` (NB = 16 or 8 outputs), the
    ``B`` panel row is a contiguous vector load, ``A`` is broadcast; (batch x column panels) in parallel.
    ``N % NB`` trailing columns form one narrower panel (ViT's 65 tokens: 4 panels of 16 + 1): before
    it, such products fell back to the legalized matmul, 0.8 ms of ViT's ~2 ms.
    """
    NB = 16 if N % 16 == 0 or N >= 32 else 8
    nblk = N // NB
    RN = N - nblk * NB  # static remainder panel width
    RNB = max(RN, 1)
    mfull = M // MB
    flops_per_batch = 2 * M * K * N
    threshold = _parallel_threshold(parallel)

    @T.macro
    def panel(A, Bm, C, b, n0, width, acc, acc1):
        for mo in range(mfull):
            for mi in T.unroll(MB):
                for ni in T.vectorized(width):
                    acc[mi, ni] = T.Cast(dtype, 0)
            for k in range(K):
                for mi in T.unroll(MB):
                    for ni in T.vectorized(width):
                        acc[mi, ni] = acc[mi, ni] + A[b, mo * MB + mi, k] * Bm[b, k, n0 + ni]
            for mi in T.unroll(MB):
                for ni in T.vectorized(width):
                    C[b, mo * MB + mi, n0 + ni] = acc[mi, ni]
        for mt in range(M - mfull * MB):
            for ni in T.vectorized(width):
                acc1[ni] = T.Cast(dtype, 0)
            for k in range(K):
                for ni in T.vectorized(width):
                    acc1[ni] = acc1[ni] + A[b, mfull * MB + mt, k] * Bm[b, k, n0 + ni]
            for ni in T.vectorized(width):
                C[b, mfull * MB + mt, n0 + ni] = acc1[ni]

    @T.prim_func(private=True)
    def bmm(a_h: T.handle, b_h: T.handle, c_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        bt = T.int64()
        A = T.match_buffer(a_h, (bt, M, K), dtype)
        Bm = T.match_buffer(b_h, (bt, K, N), dtype)
        C = T.match_buffer(c_h, (bt, M, N), dtype)
        if bt * flops_per_batch >= threshold:
            if nblk > 0:
                for bn in T.parallel(bt * nblk):
                    acc = T.alloc_buffer((MB, NB), dtype)
                    acc1 = T.alloc_buffer((NB,), dtype)
                    panel(A, Bm, C, bn // nblk, bn % nblk * NB, NB, acc, acc1)
            if RN > 0:
                for b in T.parallel(bt):
                    accr = T.alloc_buffer((MB, RNB), dtype)
                    accr1 = T.alloc_buffer((RNB,), dtype)
                    panel(A, Bm, C, b, nblk * NB, RN, accr, accr1)
        else:
            acc = T.alloc_buffer((MB, NB), dtype)
            acc1 = T.alloc_buffer((NB,), dtype)
            accr = T.alloc_buffer((MB, RNB), dtype)
            accr1 = T.alloc_buffer((RNB,), dtype)
            for b in range(bt):
                for j in range(nblk):
                    panel(A, Bm, C, b, j * NB, NB, acc, acc1)
                if RN > 0:
                    panel(A, Bm, C, b, nblk * NB, RN, accr, accr1)

    return _scheduled(bmm)


# --------------------------------------------------------------------------- convolutions
# Direct convolution: outputs per vector (output channels) and output-width positions per register
# tile; see conv_tile() for the choice (measured on the zoo's layers, 1 thread).
CONV_NB = 8
CONV_TW = 8
# Pointwise (1x1) convolution: output channels x positions per register tile. 6x16 measured best of
# 4x16 / 6x16 / 3x32 / 8x8 on the zoo's 1x1 layers (e.g. 84->48 at 32x32: 61 vs 45 / 28 / 32 GF/s).
POINTWISE_MB = 6
POINTWISE_PB = 16
# depthwise rows with a stride up to this are computed at every input column, then subsampled
# (:func:`depthwise_conv_kernel`)
DW_WIDE_MAX_STRIDE = 4


ACTIVATIONS = ("relu", "hardswish", "hardsigmoid")


def activation(act: str | None, x, dtype: str = "float32"):
    """``x`` through a fused activation (evaluated while a kernel is parsed): ``relu``,
    ``hardswish`` ``x * clamp(x + 3, 0, 6) / 6`` or ``hardsigmoid`` ``clamp(x + 3, 0, 6) / 6``, in
    torch's decomposition's operation order (same rounding); ``None``: ``x`` itself."""
    if act is None:
        return x
    zero, three, six = (tirx.const(v, dtype) for v in (0, 3, 6))
    if act == "relu":
        return tirx.max(x, zero)
    gate = tirx.min(tirx.max(x + three, zero), six)
    if act == "hardswish":
        return x * gate / six
    if act == "hardsigmoid":
        return gate / six
    raise ValueError(f"unknown fused activation {act!r}; expected one of {ACTIVATIONS}")


def conv_tile(ocg: int, groups: int, ow: int, avx512: bool = False) -> tuple[int, int]:
    """``(NB, TW)`` for :func:`conv_kernel`: channels per vector and width positions per tile.

    8 channels x 8 positions when the output row is at least 8 wide (16->16 3x3 at 32x32: 76 GF/s vs
    50 for 16x4); narrower rows (the late, small stages) take 16 channels x up to 4 positions (1x1
    128->512 at 4x4: 84 vs 48 GF/s). A grouped conv's vector must stay inside one group (8, else 4).
    With AVX-512 (``avx512``) a 16-channel vector is one register: 16 channels x up to 8 positions
    wherever 16 channels fit (the zoo's ResNet on an AVX-512 Xeon: 0.197 -> 0.135 ms, 1 thread), and
    for 9-15 channels, which 8-channel vectors pad to 16 as well (DenseNet's growth-12 3x3 convs:
    the whole model 1.79 -> 1.27 ms).
    """
    if groups > 1 and ocg % 8:
        return 4, min(ow, 8)
    if (ow < 8 or avx512) and (groups == 1 or ocg % 16 == 0) and (ocg >= 16 or avx512 and ocg > 8):
        return 16, min(ow, 8 if avx512 else 4)
    return 8, min(ow, 8)


def pointwise_tile(positions: int, avx512: bool = False) -> tuple[int, int]:
    """``(MB, PB)`` for :func:`pointwise_conv_kernel`: output channels x positions per tile.

    AVX2: 6 x 16 (12 accumulator vectors). With AVX-512 a 16-position row is one register, and 6 x 16
    kept only 6 in flight: 6 x 32 where a row has 32 positions or more, else 12 x 16. Batch 2, one
    thread, on an AVX-512 Xeon: 84->48 at 32x32 105 -> 82 us, 16->64 at 16x16 5.9 -> 5.7 us, 40->120
    at 4x4 2.1 -> 1.7 us, 120->32 at 1x1 1.06 -> 0.62 us; the zoo MobileNet's 18 1x1 layers ~36 ->
    ~31 us (6 x 32 everywhere: 8 % slower on the 4x4 layers; 8 x 16: between the two)."""
    if not avx512:
        return POINTWISE_MB, POINTWISE_PB
    return (6, 32) if positions >= 32 else (12, 16)


def conv_out_size(padded: int, k: int, s: int, d: int) -> int:
    """Output extent of a convolution over an already padded input extent."""
    return (padded - d * (k - 1) - 1) // s + 1


def conv_kernel(IC: int, IS: tuple, OC: int, KS: tuple, S: tuple, D: tuple, G: int,
                NB: int = CONV_NB, TW: int = CONV_TW, dtype: str = "float32", act: str | None = None,
                x_dims: tuple | None = None, y_dims: tuple | None = None, parallel: bool = True,
                residual: bool = False):
    """Direct ``N``-batch convolution on an NCDHW input that is already padded.

    ``X [N, IC, DP, HP, WP]`` (``IS = (DP, HP, WP)``), weights packed ``[OCP/NB, IC/G, KD, KH, KW, NB]``
    (``OCP`` = ``OC`` rounded up to ``NB``; padded outputs have zero weights and are not stored), bias
    ``[OCP]``, output ``Y [N, OC, OD, OH, OW]``. Register tile: ``TW`` consecutive output-width
    positions x ``NB`` output channels (one ``NB``-wide vector FMA per position and reduction step, the
    weight vector loaded once per step and the input broadcast); the reduction runs over ``IC/G x KD x
    KH x KW``. Groups need ``OC/G % NB == 0`` (a vector never straddles two groups); ``act`` is an
    activation fused into the store (:func:`activation`). 1-D and 2-D convolutions use ``DP = KD = 1``;
    ``x_dims`` / ``y_dims`` (dims after ``N``) give the argument buffers their own rank (the kernel
    views them as 5-D), so the caller needs no reshape. (image, vector block) pairs run in parallel
    above :data:`MIN_PARALLEL_FLOPS`, as the dense kernel. ``residual``: the function takes one more
    input shaped like ``Y`` that is added before the activation (a fused ``conv + x`` skip
    connection; arguments ``x, w, bias, residual, y``).
    """
    DP, HP, WP = IS
    KD, KH, KW = KS
    sd, sh, sw = S
    dd, dh, dw = D
    OD, OH, OW = (conv_out_size(p, k, s, d) for p, k, s, d in zip(IS, KS, S, D))
    ICG, OCG = IC // G, OC // G
    if G > 1 and OCG % NB:
        raise ValueError(f"grouped convolution needs out_channels/groups % {NB} == 0, got {OCG}")
    OCP = -(-OC // NB) * NB
    OCB = OCP // NB
    BPG = OCB if G == 1 else OCG // NB  # vector blocks per group
    xd = x_dims or (IC, DP, HP, WP)
    yd = y_dims or (OC, OD, OH, OW)
    full = OW // TW
    R = OW - full * TW  # static remainder tile
    RR = max(R, 1)
    flops_per_image = 2 * OCP * OD * OH * OW * ICG * KD * KH * KW
    threshold = _parallel_threshold(parallel)

    @T.macro
    def tile(X, w, bias, Rs, Y, n, ocb, od, oh, ow0, width, acc):
        for t in T.unroll(width):
            for v in T.vectorized(NB):
                acc[t, v] = bias[ocb * NB + v]
        for ic, kd, kh, kw in T.grid(ICG, KD, KH, KW):
            for t in T.unroll(width):
                for v in T.vectorized(NB):
                    acc[t, v] = acc[t, v] + X[
                        n, ocb // BPG * ICG + ic, od * sd + kd * dd, oh * sh + kh * dh,
                        (ow0 + t) * sw + kw * dw] * w[ocb, ic, kd, kh, kw, v]
        for t in T.unroll(width):
            for v in T.unroll(NB):
                if ocb * NB + v < OC:
                    if residual:
                        Y[n, ocb * NB + v, od, oh, ow0 + t] = activation(
                            act, acc[t, v] + Rs[n, ocb * NB + v, od, oh, ow0 + t], dtype)
                    else:
                        Y[n, ocb * NB + v, od, oh, ow0 + t] = activation(act, acc[t, v], dtype)

    @T.macro
    def block(X, w, bias, Rs, Y, n, ocb, acc, acc1):
        for od, oh in T.grid(OD, OH):
            for owo in range(full):
                tile(X, w, bias, Rs, Y, n, ocb, od, oh, owo * TW, TW, acc)
            if R > 0:
                tile(X, w, bias, Rs, Y, n, ocb, od, oh, full * TW, R, acc1)

    @T.macro
    def body(X, w, bias, Rs, Y, N):
        if N * flops_per_image >= threshold:
            for i in T.parallel(N * OCB):
                acc = T.alloc_buffer((TW, NB), dtype)
                acc1 = T.alloc_buffer((RR, NB), dtype)
                block(X, w, bias, Rs, Y, i // OCB, i % OCB, acc, acc1)
        else:
            acc = T.alloc_buffer((TW, NB), dtype)
            acc1 = T.alloc_buffer((RR, NB), dtype)
            for n, ocb in T.grid(N, OCB):
                block(X, w, bias, Rs, Y, n, ocb, acc, acc1)

    @T.prim_func(private=True)
    def conv(x_h: T.handle, w: T.Buffer((OCB, ICG, KD, KH, KW, NB), dtype),
             bias: T.Buffer((OCP,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        Xa = T.match_buffer(x_h, (N, *xd), dtype)
        Ya = T.match_buffer(y_h, (N, *yd), dtype)
        X = T.decl_buffer((N, IC, DP, HP, WP), dtype, data=Xa.data)
        Y = T.decl_buffer((N, OC, OD, OH, OW), dtype, data=Ya.data)
        body(X, w, bias, Y, Y, N)

    @T.prim_func(private=True)
    def conv_residual(x_h: T.handle, w: T.Buffer((OCB, ICG, KD, KH, KW, NB), dtype),
                      bias: T.Buffer((OCP,), dtype), r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        Xa = T.match_buffer(x_h, (N, *xd), dtype)
        Ra = T.match_buffer(r_h, (N, *yd), dtype)
        Ya = T.match_buffer(y_h, (N, *yd), dtype)
        X = T.decl_buffer((N, IC, DP, HP, WP), dtype, data=Xa.data)
        Rs = T.decl_buffer((N, OC, OD, OH, OW), dtype, data=Ra.data)
        Y = T.decl_buffer((N, OC, OD, OH, OW), dtype, data=Ya.data)
        body(X, w, bias, Rs, Y, N)

    return _scheduled(conv_residual if residual else conv)


def pointwise_conv_kernel(IC: int, P: int, OC: int, MB: int = POINTWISE_MB, PB: int = POINTWISE_PB,
                          dtype: str = "float32", act: str | None = None, x_dims: tuple | None = None,
                          y_dims: tuple | None = None, parallel: bool = True,
                          residual: bool = False):
    """1x1, stride-1, ungrouped convolution as ``Y[n] = W @ X[n]`` over ``P`` flattened positions.

    ``X [N, IC, P]``, weights packed ``[OCP/MB, IC, MB]`` (``OCP`` = ``OC`` rounded up to ``MB``), bias
    ``[OCP]``, ``Y [N, OC, P]``. Register tile ``MB`` output channels x ``PB`` positions, vectorised
    over positions: every input load and output store is contiguous in NCHW, and each input row line
    is used whole (the direct kernel's per-channel input rows, 4 KiB apart at 32x32, thrashed L1 sets).
    ``x_dims`` / ``y_dims``: the argument buffers' own dims after ``N`` (viewed as ``[IC, P]``);
    ``residual`` as :func:`conv_kernel`.
    """
    xd = x_dims or (IC, P)
    yd = y_dims or (OC, P)
    OCP = -(-OC // MB) * MB
    OCB = OCP // MB
    flops_per_image = 2 * OCP * P * IC
    threshold = _parallel_threshold(parallel)
    full = P // PB
    R = P - full * PB
    RR = max(R, 1)

    @T.macro
    def tile(X, w, bias, Rs, Y, n, ob, p0, width, acc):
        for m in T.unroll(MB):
            for v in T.vectorized(width):
                acc[m, v] = bias[ob * MB + m]
        for ic in range(IC):
            for m in T.unroll(MB):
                for v in T.vectorized(width):
                    acc[m, v] = acc[m, v] + w[ob, ic, m] * X[n, ic, p0 + v]
        for m in T.unroll(MB):
            if ob * MB + m < OC:
                for v in T.vectorized(width):
                    if residual:
                        Y[n, ob * MB + m, p0 + v] = activation(
                            act, acc[m, v] + Rs[n, ob * MB + m, p0 + v], dtype)
                    else:
                        Y[n, ob * MB + m, p0 + v] = activation(act, acc[m, v], dtype)

    @T.macro
    def block(X, w, bias, Rs, Y, n, ob, acc, acc1):
        for po in range(full):
            tile(X, w, bias, Rs, Y, n, ob, po * PB, PB, acc)
        if R > 0:
            tile(X, w, bias, Rs, Y, n, ob, full * PB, R, acc1)

    @T.macro
    def body(X, w, bias, Rs, Y, N):
        if N * flops_per_image >= threshold:
            for i in T.parallel(N * OCB):
                acc = T.alloc_buffer((MB, PB), dtype)
                acc1 = T.alloc_buffer((MB, RR), dtype)
                block(X, w, bias, Rs, Y, i // OCB, i % OCB, acc, acc1)
        else:
            acc = T.alloc_buffer((MB, PB), dtype)
            acc1 = T.alloc_buffer((MB, RR), dtype)
            for n, ob in T.grid(N, OCB):
                block(X, w, bias, Rs, Y, n, ob, acc, acc1)

    @T.prim_func(private=True)
    def conv1x1(x_h: T.handle, w: T.Buffer((OCB, IC, MB), dtype), bias: T.Buffer((OCP,), dtype),
                y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        Xa = T.match_buffer(x_h, (N, *xd), dtype)
        Ya = T.match_buffer(y_h, (N, *yd), dtype)
        X = T.decl_buffer((N, IC, P), dtype, data=Xa.data)
        Y = T.decl_buffer((N, OC, P), dtype, data=Ya.data)
        body(X, w, bias, Y, Y, N)

    @T.prim_func(private=True)
    def conv1x1_residual(x_h: T.handle, w: T.Buffer((OCB, IC, MB), dtype),
                         bias: T.Buffer((OCP,), dtype), r_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        Xa = T.match_buffer(x_h, (N, *xd), dtype)
        Ra = T.match_buffer(r_h, (N, *yd), dtype)
        Ya = T.match_buffer(y_h, (N, *yd), dtype)
        X = T.decl_buffer((N, IC, P), dtype, data=Xa.data)
        Rs = T.decl_buffer((N, OC, P), dtype, data=Ra.data)
        Y = T.decl_buffer((N, OC, P), dtype, data=Ya.data)
        body(X, w, bias, Rs, Y, N)

    return _scheduled(conv1x1_residual if residual else conv1x1)


def mean_kernel(S: int, V: int = BATCH_VEC, dtype: str = "float32", parallel: bool = True):
    """``Y[r] = sum(X[r, :S]) / S`` for ``X [R, S]`` (``R`` symbolic): a mean over trailing dims.

    Up to 4 ``V``-wide accumulators over each row (independent adds), summed, a scalar tail. The
    legalized Relax ``mean`` reduced each row one scalar at a time: a squeeze-excite block's mean
    over 2x16x16x16 took 3.5 us through the VM, this kernel 0.3 us (0.56 / 1.28 us at 2x120x4x4).
    """
    A = max(1, min(4, S // V))
    step = V * A
    full, rest = S // step, S % step
    threshold = _parallel_threshold(parallel)
    inv = S  # divide (as torch does), not multiply by 1/S

    @T.macro
    def row(X, Y, r, acc, red):
        for a in T.unroll(A):
            for v in T.vectorized(V):
                acc[a, v] = T.Cast(dtype, 0)
        for so in range(full):
            for a in T.unroll(A):
                for v in T.vectorized(V):
                    acc[a, v] = acc[a, v] + X[r, so * step + a * V + v]
        for a in T.unroll(1, A):
            for v in T.vectorized(V):
                acc[0, v] = acc[0, v] + acc[a, v]
        red[0] = T.Cast(dtype, 0)
        for v in range(V):
            red[0] = red[0] + acc[0, v]
        for t in range(rest):
            red[0] = red[0] + X[r, full * step + t]
        Y[r] = red[0] / T.Cast(dtype, inv)

    @T.prim_func(private=True, s_tir=True)
    def mean(x_h: T.handle, y_h: T.handle):
        # opaque to FuseOps, and a root block: with one input and one output, Relax's reshape-pattern
        # analysis inspects it (as for index_check_kernel)
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})
        R = T.int64()
        X = T.match_buffer(x_h, (R, S), dtype)
        Y = T.match_buffer(y_h, (R,), dtype)
        with T.sblock("root"):
            if R * S >= threshold:
                for r in T.parallel(R):
                    with T.sblock("row"):  # per-task accumulators
                        T.reads(X[r, 0:S])
                        T.writes(Y[r])
                        acc_p = T.alloc_buffer((A, V), dtype)
                        red_p = T.alloc_buffer((1,), dtype)
                        row(X, Y, r, acc_p, red_p)
            else:
                acc = T.alloc_buffer((A, V), dtype)
                red = T.alloc_buffer((1,), dtype)
                for r in range(R):
                    row(X, Y, r, acc, red)

    return _scheduled(mean)


def group_norm_kernel(C: int, G: int, S: int, eps: float, relu: bool = False, V: int = BATCH_VEC,
                      dtype: str = "float32", dims: tuple | None = None):
    """GroupNorm over ``X [N, G, C/G * S]`` (an NC... input viewed per group), affine per channel.

    Two passes over each group for the statistics (mean, then the mean of squared deviations, as
    torch), each accumulating a ``V``-lane vector; then one pass writing ``x * a[c] + b[c]`` with
    ``a = rstd * gamma``, ``b = beta - mean * a`` (``relu`` clamps it: a fused ReLU). TVM's legalized
    ``group_norm`` ran its reductions scalar, a third of U-Net's time after the conv kernels.
    ``dims``: the argument buffers' own dims after ``N`` (default ``(G, C/G * S)``).
    """
    CG = C // G
    L = CG * S
    LV, LR = L // V, L % V
    SV, SR = S // V, S % V
    xd = dims or (G, L)

    @T.macro
    def store(X, Y, n, g, c, j, a, b):
        if relu:
            Y[n, g, c * S + j] = T.max(X[n, g, c * S + j] * a + b, T.Cast(dtype, 0))
        else:
            Y[n, g, c * S + j] = X[n, g, c * S + j] * a + b

    @T.prim_func(private=True)
    def group_norm(x_h: T.handle, gamma: T.Buffer((C,), dtype), beta: T.Buffer((C,), dtype),
                   y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        Xa = T.match_buffer(x_h, (N, *xd), dtype)
        Ya = T.match_buffer(y_h, (N, *xd), dtype)
        X = T.decl_buffer((N, G, L), dtype, data=Xa.data)
        Y = T.decl_buffer((N, G, L), dtype, data=Ya.data)
        acc = T.alloc_buffer((V,), dtype)
        st = T.alloc_buffer((4,), dtype)  # mean, rstd, a, b
        for n, g in T.grid(N, G):
            for v in T.vectorized(V):
                acc[v] = T.Cast(dtype, 0)
            for j in range(LV):
                for v in T.vectorized(V):
                    acc[v] = acc[v] + X[n, g, j * V + v]
            st[0] = T.Cast(dtype, 0)
            for j in range(LR):
                st[0] = st[0] + X[n, g, LV * V + j]
            for v in range(V):
                st[0] = st[0] + acc[v]
            st[0] = st[0] / T.Cast(dtype, L)
            for v in T.vectorized(V):
                acc[v] = T.Cast(dtype, 0)
            for j in range(LV):
                for v in T.vectorized(V):
                    acc[v] = acc[v] + (X[n, g, j * V + v] - st[0]) * (X[n, g, j * V + v] - st[0])
            st[1] = T.Cast(dtype, 0)
            for j in range(LR):
                st[1] = st[1] + (X[n, g, LV * V + j] - st[0]) * (X[n, g, LV * V + j] - st[0])
            for v in range(V):
                st[1] = st[1] + acc[v]
            st[1] = T.Cast(dtype, 1) / T.sqrt(st[1] / T.Cast(dtype, L) + T.Cast(dtype, eps))
            for c in range(CG):
                st[2] = st[1] * gamma[g * CG + c]
                st[3] = beta[g * CG + c] - st[0] * st[2]
                for jo in range(SV):
                    for v in T.vectorized(V):
                        store(X, Y, n, g, c, jo * V + v, st[2], st[3])
                for j in range(SR):
                    store(X, Y, n, g, c, SV * V + j, st[2], st[3])

    return _scheduled(group_norm)


def depthwise_conv_kernel(IC: int, IS: tuple, OC: int, KS: tuple, S: tuple, D: tuple,
                          V: int = BATCH_VEC, dtype: str = "float32", act: str | None = None,
                          x_dims: tuple | None = None, y_dims: tuple | None = None,
                          parallel: bool = True):
    """Depthwise convolution (``groups == IC``, ``OC = IC * multiplier``) on a padded NCDHW input.

    ``X [N, IC, DP, HP, WP]``, weights ``[OC, KD, KH, KW]``, bias ``[OC]``, ``Y [N, OC, OD, OH, OW]``;
    output channel ``o`` reads input channel ``o // multiplier``. Each output row is computed in
    ``V``-wide vectors along the width (a static remainder vector for the rest): one broadcast weight
    FMA per tap. The generic schedule ran these per element; with few taps per output there is no
    reduction worth vectorising, only the row. ``x_dims`` / ``y_dims`` as :func:`conv_kernel`.

    A strided row (width stride ``sw`` <= :data:`DW_WIDE_MAX_STRIDE`) is computed at every input
    column in between, on contiguous vectors, and every ``sw``-th lane is stored: ``sw`` times the
    FMAs, but a strided vector of ``x`` was 8 scalar loads per tap. Stride 2, batch 2 / 1, one
    thread: 64 ch 16x16 k3 15.8 -> 4.0 us, 96 ch 8x8 k5 14.3 -> 6.4 us, 144 ch 28x28 k3 53 -> 19 us,
    32 ch 112x112 k3 193 -> 68 us; stride 3: 0.89 -> 0.60 us. Also tried for MobileNet's small planes:
    16-channel vectors over a channel-last copy of each block of planes (the two transposes cost more
    than the scalar loads: 1.2-7x the time), and stride-1 planes as one flat vector over padded rows
    (0.85-2.3x the time); copying each plane into a zero-bordered buffer inside the kernel instead
    of the separate pad operator (the whole MobileNet: 0.13 -> 0.15 ms).
    """
    DP, HP, WP = IS
    KD, KH, KW = KS
    sd, sh, sw = S
    dd, dh, dw = D
    OD, OH, OW = (conv_out_size(p, k, s, d) for p, k, s, d in zip(IS, KS, S, D))
    M = OC // IC
    full, R = OW // V, OW % V
    xd = x_dims or (IC, DP, HP, WP)
    yd = y_dims or (OC, OD, OH, OW)
    flops_per_image = 2 * OC * OD * OH * OW * KD * KH * KW
    threshold = _parallel_threshold(parallel)

    @T.macro
    def row(X, w, bias, Y, n, oc, od, oh, ow0, width, acc):
        for v in T.vectorized(width):
            acc[v] = bias[oc]
        for kd, kh, kw in T.grid(KD, KH, KW):
            for v in T.vectorized(width):
                acc[v] = acc[v] + X[n, oc // M, od * sd + kd * dd, oh * sh + kh * dh,
                                    (ow0 + v) * sw + kw * dw] * w[oc, kd, kh, kw]
        for v in T.vectorized(width):
            Y[n, oc, od, oh, ow0 + v] = activation(act, acc[v], dtype)

    def lanes(width: int) -> int:
        return (width - 1) * sw + 1

    @T.macro
    def row_wide(X, w, bias, Y, n, oc, od, oh, ow0, width, acc):
        # strided rows: every input column in between too, contiguous vectors, then every sw-th
        for v in T.vectorized(lanes(width)):
            acc[v] = bias[oc]
        for kd, kh, kw in T.grid(KD, KH, KW):
            for v in T.vectorized(lanes(width)):
                acc[v] = acc[v] + X[n, oc // M, od * sd + kd * dd, oh * sh + kh * dh,
                                    ow0 * sw + v + kw * dw] * w[oc, kd, kh, kw]
        for v in T.vectorized(width):
            Y[n, oc, od, oh, ow0 + v] = activation(act, acc[v * sw], dtype)

    body = row_wide if 1 < sw <= DW_WIDE_MAX_STRIDE else row

    @T.macro
    def plane(X, w, bias, Y, n, oc, acc):
        for od, oh in T.grid(OD, OH):
            for owo in range(full):
                body(X, w, bias, Y, n, oc, od, oh, owo * V, V, acc)
            if R > 0:
                body(X, w, bias, Y, n, oc, od, oh, full * V, R, acc)

    @T.prim_func(private=True)
    def depthwise(x_h: T.handle, w: T.Buffer((OC, KD, KH, KW), dtype), bias: T.Buffer((OC,), dtype),
                  y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        N = T.int64()
        Xa = T.match_buffer(x_h, (N, *xd), dtype)
        Ya = T.match_buffer(y_h, (N, *yd), dtype)
        X = T.decl_buffer((N, IC, DP, HP, WP), dtype, data=Xa.data)
        Y = T.decl_buffer((N, OC, OD, OH, OW), dtype, data=Ya.data)
        if N * flops_per_image >= threshold:
            for i in T.parallel(N * OC):
                acc = T.alloc_buffer((V * sw,), dtype)
                plane(X, w, bias, Y, i // OC, i % OC, acc)
        else:
            acc = T.alloc_buffer((V * sw,), dtype)
            for n, oc in T.grid(N, OC):
                plane(X, w, bias, Y, n, oc, acc)

    return _scheduled(depthwise)


def layer_norm_kernel(D: int, eps: float, V: int = BATCH_VEC, rows_per_chunk: int = ROWS_PER_CHUNK,
                      dtype: str = "float32", parallel: bool = True):
    """LayerNorm over the last ``D`` elements of ``X [R, D]`` (leading dims flattened by the caller).

    Per row: mean, then the mean of squared deviations (two passes, as torch), each into a
    ``V``-lane vector; then ``(x - mean) * rstd * gamma + beta`` vectorised over the row. dlight's
    ``Reduction`` rule ran ViT's LayerNorm ([130, 64]) at ~60 us; this is a few us. Chunks of rows run
    in parallel above :data:`MIN_PARALLEL_FLOPS` (counting ~8 flops per element).
    """
    DV, DR = D // V, D % V
    threshold = _parallel_threshold(parallel)

    @T.macro
    def row(X, gamma, beta, Y, r, acc, st):
        for v in T.vectorized(V):
            acc[v] = T.Cast(dtype, 0)
        for j in range(DV):
            for v in T.vectorized(V):
                acc[v] = acc[v] + X[r, j * V + v]
        st[0] = T.Cast(dtype, 0)
        for j in range(DR):
            st[0] = st[0] + X[r, DV * V + j]
        for v in range(V):
            st[0] = st[0] + acc[v]
        st[0] = st[0] / T.Cast(dtype, D)
        for v in T.vectorized(V):
            acc[v] = T.Cast(dtype, 0)
        for j in range(DV):
            for v in T.vectorized(V):
                acc[v] = acc[v] + (X[r, j * V + v] - st[0]) * (X[r, j * V + v] - st[0])
        st[1] = T.Cast(dtype, 0)
        for j in range(DR):
            st[1] = st[1] + (X[r, DV * V + j] - st[0]) * (X[r, DV * V + j] - st[0])
        for v in range(V):
            st[1] = st[1] + acc[v]
        st[1] = T.Cast(dtype, 1) / T.sqrt(st[1] / T.Cast(dtype, D) + T.Cast(dtype, eps))
        for j in range(DV):
            for v in T.vectorized(V):
                Y[r, j * V + v] = (X[r, j * V + v] - st[0]) * st[1] * gamma[j * V + v] + beta[j * V + v]
        for j in range(DR):
            Y[r, DV * V + j] = (X[r, DV * V + j] - st[0]) * st[1] * gamma[DV * V + j] + beta[DV * V + j]

    @T.prim_func(private=True)
    def layer_norm(x_h: T.handle, gamma: T.Buffer((D,), dtype), beta: T.Buffer((D,), dtype),
                   y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        R = T.int64()
        X = T.match_buffer(x_h, (R, D), dtype)
        Y = T.match_buffer(y_h, (R, D), dtype)
        if R * (8 * D) >= threshold:
            for ch in T.parallel((R + rows_per_chunk - 1) // rows_per_chunk):
                acc = T.alloc_buffer((V,), dtype)
                st = T.alloc_buffer((2,), dtype)
                for rr in range(T.min(rows_per_chunk, R - ch * rows_per_chunk)):
                    row(X, gamma, beta, Y, ch * rows_per_chunk + rr, acc, st)
        else:
            acc = T.alloc_buffer((V,), dtype)
            st = T.alloc_buffer((2,), dtype)
            for r in range(R):
                row(X, gamma, beta, Y, r, acc, st)

    return _scheduled(layer_norm)
