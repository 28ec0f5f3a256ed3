"""N:M kernels: the row kernel on uint8 positions and the AVX2 lane kernel (``vpermps``)."""

from __future__ import annotations

from tvm.script import tirx as T

from .common import (BATCH_VEC, DEFAULT_PLAN, PAIR_ACC_VECTORS, PREFETCH_BYTES, Prefetch, ROWS_PER_CHUNK, ROW_UNROLL,
                     SELL_R, SPARSE_FLOP_COST, by_work, _chunks, _parallel_threshold, _prefetch, _scheduled)


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
    def chunk(XT, val, pos, bias, Y, B, ch, acc, accu, s, in_task):
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

    chunks = by_work(threshold, {"acc": ((V,), dtype), "accu": ((U,), dtype), "s": ((1,), dtype)}, chunk, "ch")

    @T.prim_func(private=True)
    def nm(xt_h: T.handle, val: T.Buffer((N, L), dtype), pos: T.Buffer((N, L), pos_dtype),
           bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        XT = T.match_buffer(xt_h, (K, B), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        chunks(B * flops_per_row, nch, (XT, val, pos, bias, Y, B))

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
