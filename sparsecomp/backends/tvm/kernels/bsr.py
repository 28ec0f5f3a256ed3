"""BSR kernels: the ``r >= c`` row-vector and ``c > r`` column-vector kernels, their batch tiles and the
grouped storage of blocks (:func:`bsr_stored`)."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .common import (BSR_BATCH_TILE, BSR_GROUP, BSR_STREAMS, by_work, DEFAULT_PLAN, PAIR_ACC_VECTORS, Prefetch,
                     READ_STREAMS, ROWS_PER_CHUNK, SPARSE_FLOP_COST, _GROUP_BITS, _chunks, _min_of, _parallel_threshold,
                     _prefetch, _prefetch_lines, _scheduled)


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


def _bsr_tasks(N: int, r: int, c: int, nnzb: int, parallel: bool) -> tuple[int, int, int, int, int]:
    """Block rows, block rows per parallel task (:data:`ROWS_PER_CHUNK` output rows), tasks, flops per row of
    ``x`` and the parallel threshold of a BSR kernel."""
    nbr = N // r
    per_chunk = max(1, ROWS_PER_CHUNK // r)
    return nbr, per_chunk, _chunks(nbr, per_chunk), 2 * nnzb * r * c * SPARSE_FLOP_COST, _parallel_threshold(parallel)


def _bsr_chunk(TB: int, MB: int, tiled: int | None, per_chunk: int, nbr: int, single_from, batch_tile, row_tile):
    """A BSR kernel's task over its chunk of block rows: rows ``[0, t_end)`` of ``x`` in ``x^T`` batch tiles
    (``batch_tile``; only where ``tiled``), rows ``[t_end, m_end)`` in ``MB``-row register tiles
    (``row_tile``); the rows after them run alone, outside. Tiles are the outer loops: a tile's rows of ``x``
    stay in L1 / L2 across the chunk's block rows. Returns a macro ``chunk(X, XP, W, bias, Y, B, ch, acc,
    acct, extra)``, ``W`` the weight buffers both tiles read, ``extra`` the row tile's other scratch."""

    def tile_end(B):
        return B // TB * TB if tiled is None else B // TB * TB * tiled

    @T.macro
    def chunk(X, XP, W, bias, Y, B, ch, acc, acct, extra):
        t_end: T.let = tile_end(B)
        m_end: T.let = single_from(B)
        for t in range(t_end // TB):
            for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
                batch_tile(XP, *W, bias, Y, ch * per_chunk + bri, t * TB, acct)
        for bo in range((m_end - t_end) // MB):
            for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
                br: T.let = ch * per_chunk + bri
                row_tile(X, *W, bias, Y, br, t_end + bo * MB, acc, *extra)

    return chunk


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
    nbr, per_chunk, nch, flops_per_row, threshold = _bsr_tasks(N, r, c, nnzb, parallel)
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
    def row_tile(X, crow, GI, gv, bias, Y, br, x0, acc):
        for mi in T.unroll(MB):
            for i in T.vectorized(r):
                acc[mi, i] = bias[br * r + i]
        row_tile_walk(crow, br, X, GI, gv, acc, x0)
        for mi in T.unroll(MB):
            for i in T.vectorized(r):
                Y[x0 + mi, br * r + i] = acc[mi, i]

    chunk = _bsr_chunk(TB, MB, tiled, per_chunk, nbr, single_from, batch_tile, row_tile)

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

    @T.macro
    def task(X, XP, crow, GI, gv, bias, Y, B, ch, acc, acc1, acct, js, ns, in_task):
        chunk(X, XP, (crow, GI, gv), bias, Y, B, ch, acc, acct, ())
        if in_task:  # the single rows of this chunk's block rows; serially all block rows at once, after
            for b in range(single_from(B), B):
                rows_lockstep(X, crow, GI, gv, bias, Y, b, ch * per_chunk,
                              T.min(per_chunk, nbr - ch * per_chunk), acc1, js, ns)

    @T.macro
    def single_rows(X, XP, crow, GI, gv, bias, Y, B, acc, acc1, acct, js, ns):
        for b in range(single_from(B), B):
            rows_lockstep(X, crow, GI, gv, bias, Y, b, 0, nbr, acc1, js, ns)

    tasks = by_work(threshold, {"acc": ((MB, r), dtype), "acc1": ((S * A, VW), dtype), "acct": ((RA, r, TB), dtype),
                                "js": ((S,), idx), "ns": ((S,), idx)}, task, "ch", single_rows)

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
        tasks(B * flops_per_row, nch, (X, XP, crow, GI, gv, bias, Y, B))

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
    nbr, per_chunk, nch, flops_per_row, threshold = _bsr_tasks(N, r, c, nnzb, parallel)
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
    def row_tile(X, crow, col, val, bias, Y, br, x0, acc, s):
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
                                x0 + mi, T.Cast("int64", col[j]) * c + cb * cv + q]
        for mi in range(MB):
            for i in range(r):
                hsum(acc, mi, i, bias, Y, x0 + mi, br * r + i, s)

    chunk = _bsr_chunk(TB, MB, None, per_chunk, nbr, single_from, batch_tile, row_tile)

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

    @T.macro
    def task(X, XP, crow, col, val, bias, Y, B, ch, acc, acc1, acct, s, in_task):
        chunk(X, XP, (crow, col, val), bias, Y, B, ch, acc, acct, (s,))
        if in_task:  # the single rows of this chunk's block rows; serially all block rows at once, after
            for b in range(single_from(B), B):
                rows(X, crow, col, val, bias, Y, b, ch * per_chunk, T.min(per_chunk, nbr - ch * per_chunk), acc1, s)

    @T.macro
    def single_rows(X, XP, crow, col, val, bias, Y, B, acc, acc1, acct, s):
        for b in range(single_from(B), B):
            rows(X, crow, col, val, bias, Y, b, 0, nbr, acc1, s)

    tasks = by_work(threshold, {"acc": ((MB, r, c), dtype), "acc1": ((1, r, c), dtype),
                                "acct": ((RA, r, TB), dtype), "s": ((8,), dtype)}, task, "ch", single_rows)

    @T.prim_func(private=True)
    def bsr(x_h: T.handle, crow: T.Buffer((nbr + 1,), idx), col: T.Buffer((nnzb,), idx),
            val: T.Buffer((nnzb, r, c), dtype), bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        XP = T.alloc_buffer((B // TB * TB * K,), dtype)
        repack(X, XP, B)
        tasks(B * flops_per_row, nch, (X, XP, crow, col, val, bias, Y, B))

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
