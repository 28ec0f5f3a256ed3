"""CSR kernel on the SELL-8 layout (:func:`sell_layout`)."""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .common import (DEFAULT_PLAN, Prefetch, ROW_UNROLL, SELL_R, SELL_SIGMA, SPARSE_FLOP_COST, _chunks,
                     _parallel_threshold, _prefetch, _scheduled, by_work)


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
    def chunk(XF, XP, sptr, col, CW, val, perm, bias, Y, B, YS, ch, acc, acc16, acc8, YT, own_scatter):
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

    @T.macro
    def scatter_all(XF, XP, sptr, col, CW, val, perm, bias, Y, B, YS, acc, acc16, acc8, YT):
        for bt in range(B % 8):
            scatter(YS, perm, bias, Y, 0, slices * R, B // 8 * 8 + bt, bt * slices * R)

    chunks = by_work(threshold, {"acc": ((U, R), dtype), "acc16": ((4, 16), dtype), "acc8": ((8, 8), dtype),
                                 "YT": ((sigma * 16,), dtype)}, chunk, "ch", scatter_all)

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
        chunks(B * flops_per_row, nch, (XF, XP, sptr, col, CW, val, perm, bias, Y, B, YS))

    return _scheduled(csr)
