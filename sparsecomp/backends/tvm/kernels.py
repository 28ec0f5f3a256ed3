"""Our own TIR kernels: packed dense ``linear``, batched matmul, BSR, CSR and N:M sparse ``linear``.

Every kernel is a TVMScript ``PrimFunc`` generated for what is known at compile time (``in``/``out``
features, block shape, row count, nnz, tile sizes); only the batch (rows of ``x``) stays symbolic. The
kernels are written at loop level (explicit register tiles, ``T.vectorized`` inner loops, unrolled row
tiles, remainder loops), so they are marked ``tirx.is_scheduled`` and no schedule rule touches them.

Layouts are chosen at compile time from the constant weights (see :mod:`.frontend` for the packing):

* dense: ``W`` packed ``[N/NB, K, NB]`` (NB = 16 outputs, two AVX2 vectors) so a column panel streams
  contiguously; register tile ``MB x NB`` over (rows of x, outputs).
* BSR ``r x c`` with ``r >= c`` (``16x1``, ``4x4``, ``8x8``...): blocks stored ``[nnzb, c, r]`` (transposed
  at compile time) so the inner loop is an ``r``-wide vector FMA; register tile ``MB x r``.
* BSR with ``c > r`` (``1x16``...): blocks ``[nnzb, r, c]``; vector over the block's columns, horizontal sum.
* CSR / N:M: rows of ``x`` in tiles of 8 run as vectors over the batch (the kernel reads ``x^T [K, B]``);
  the other rows (all of them at batch 1) reduce each output row with ``U`` independent accumulators.
  N:M computes its column indices as ``group*m + position`` from the uint8 positions.

Parallelism: the outer loop (output panels / chunks of rows) runs ``T.parallel`` only when the call's
work, known at run time from the batch, is at least :data:`MIN_PARALLEL_FLOPS`: a parallel launch costs
~12 us even on one thread, more than a whole small layer (a 64x64 linear on 32 rows: 12.8 -> 3.4 us).
Every generator takes ``parallel=False`` for models lowered for one thread: the body of a parallel
loop is compiled as a closure and ran 1.5-3x slower than the same loop inline (3072x768 CSR at 90 %,
batch 1, cold: 453 us through the parallel path vs ~0.35 of that per nonzero serially).
"""

from __future__ import annotations

from tvm.script import tirx as T

# Outputs per dense panel (two 8-float AVX2 vectors) and rows per register tile; see
# docs/_drafts/tvm.md for the measurements behind the defaults.
DENSE_NB = 16
DENSE_MB = 4
BATCH_VEC = 8
# CSR / N:M: independent accumulators per output row, and rows per parallel task (register buffers
# are allocated once per task: allocating them per row inside a parallel loop cost ~1 ms per call)
ROW_UNROLL = 4
ROWS_PER_CHUNK = 32
MIN_PARALLEL_FLOPS = 1 << 20
# a sparse multiply-add (index load, gathered x) costs about this many dense ones, for that threshold
SPARSE_FLOP_COST = 4


def _scheduled(func):
    return func.with_attr("tirx.is_scheduled", True)


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
                acc = T.alloc_buffer((MB, NB), dtype, scope="local")
                acc1 = T.alloc_buffer((NB,), dtype, scope="local")
                panel(X, w, bias, Y, B, nb, acc, acc1)
        else:
            acc = T.alloc_buffer((MB, NB), dtype, scope="local")
            acc1 = T.alloc_buffer((NB,), dtype, scope="local")
            for nb in range(nblk):
                panel(X, w, bias, Y, B, nb, acc, acc1)

    return _scheduled(dense)


def bsr_row_vector_kernel(N: int, K: int, r: int, c: int, nnzb: int, idx: str, MB: int = DENSE_MB,
                          dtype: str = "float32", parallel: bool = True):
    """BSR with ``r >= c``: values ``[nnzb, c, r]``; ``Y[B, N] = X[B, K] @ W^T + bias``."""
    nbr = N // r
    per_chunk = max(1, ROWS_PER_CHUNK // r)
    nch = _chunks(nbr, per_chunk)
    flops_per_row = 2 * nnzb * r * c * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)

    @T.macro
    def chunk(X, crow, col, val, bias, Y, B, ch, acc, acc1):
        for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
            br = ch * per_chunk + bri
            for bo in range(B // MB):
                for mi in T.unroll(MB):
                    for i in T.vectorized(r):
                        acc[mi, i] = bias[br * r + i]
                for j in range(crow[br], crow[br + 1]):
                    for cc in T.unroll(c):
                        for mi in T.unroll(MB):
                            for i in T.vectorized(r):
                                acc[mi, i] = acc[mi, i] + val[j, cc, i] * X[
                                    bo * MB + mi, T.Cast("int64", col[j]) * c + cc]
                for mi in T.unroll(MB):
                    for i in T.vectorized(r):
                        Y[bo * MB + mi, br * r + i] = acc[mi, i]
            for bt in range(B - B // MB * MB):
                for i in T.vectorized(r):
                    acc1[i] = bias[br * r + i]
                for j in range(crow[br], crow[br + 1]):
                    for cc in T.unroll(c):
                        for i in T.vectorized(r):
                            acc1[i] = acc1[i] + val[j, cc, i] * X[
                                B // MB * MB + bt, T.Cast("int64", col[j]) * c + cc]
                for i in T.vectorized(r):
                    Y[B // MB * MB + bt, br * r + i] = acc1[i]

    @T.prim_func(private=True)
    def bsr(x_h: T.handle, crow: T.Buffer((nbr + 1,), idx), col: T.Buffer((nnzb,), idx),
            val: T.Buffer((nnzb, c, r), dtype), bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((MB, r), dtype, scope="local")
                acc1 = T.alloc_buffer((r,), dtype, scope="local")
                chunk(X, crow, col, val, bias, Y, B, ch, acc, acc1)
        else:
            acc = T.alloc_buffer((MB, r), dtype, scope="local")
            acc1 = T.alloc_buffer((r,), dtype, scope="local")
            for ch in range(nch):
                chunk(X, crow, col, val, bias, Y, B, ch, acc, acc1)

    return _scheduled(bsr)


def bsr_col_vector_kernel(N: int, K: int, r: int, c: int, nnzb: int, idx: str,
                          dtype: str = "float32", parallel: bool = True):
    """BSR with ``c > r``: values ``[nnzb, r, c]``; vector over a block's ``c`` columns, then a sum."""
    nbr = N // r
    per_chunk = max(1, ROWS_PER_CHUNK // r)
    nch = _chunks(nbr, per_chunk)
    flops_per_row = 2 * nnzb * r * c * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)

    @T.macro
    def chunk(X, crow, col, val, bias, Y, B, ch, acc, s):
        for bri in range(T.min(per_chunk, nbr - ch * per_chunk)):
            br = ch * per_chunk + bri
            for b in range(B):
                for i in T.unroll(r):
                    for cc in T.vectorized(c):
                        acc[i, cc] = T.Cast(dtype, 0)
                for j in range(crow[br], crow[br + 1]):
                    for i in T.unroll(r):
                        for cc in T.vectorized(c):
                            acc[i, cc] = acc[i, cc] + val[j, i, cc] * X[
                                b, T.Cast("int64", col[j]) * c + cc]
                for i in range(r):
                    s[0] = bias[br * r + i]
                    for cc in range(c):
                        s[0] = s[0] + acc[i, cc]
                    Y[b, br * r + i] = s[0]

    @T.prim_func(private=True)
    def bsr(x_h: T.handle, crow: T.Buffer((nbr + 1,), idx), col: T.Buffer((nnzb,), idx),
            val: T.Buffer((nnzb, r, c), dtype), bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((r, c), dtype, scope="local")
                s = T.alloc_buffer((1,), dtype, scope="local")
                chunk(X, crow, col, val, bias, Y, B, ch, acc, s)
        else:
            acc = T.alloc_buffer((r, c), dtype, scope="local")
            s = T.alloc_buffer((1,), dtype, scope="local")
            for ch in range(nch):
                chunk(X, crow, col, val, bias, Y, B, ch, acc, s)

    return _scheduled(bsr)


def csr_kernel(N: int, K: int, nnz: int, idx: str, dtype: str = "float32", V: int = BATCH_VEC,
               U: int = ROW_UNROLL, rows_per_chunk: int = ROWS_PER_CHUNK, parallel: bool = True):
    """CSR ``Y[B, N] = X @ W^T + bias``; reads ``xt = X^T [K, B]``; ``idx`` is the column dtype.

    Rows are processed in chunks (register buffers allocated once per chunk). Batch tiles of ``V`` rows
    of ``x`` run as vectors over the batch; the other rows of ``x`` (all of them at batch 1) reduce each
    output row with ``U`` independent accumulators, which breaks the FMA latency chain that bounds a
    one-accumulator loop (scipy's) to one nonzero per FMA latency.
    """
    nch = _chunks(N, rows_per_chunk)
    crow_dtype = "int32"
    flops_per_row = 2 * nnz * SPARSE_FLOP_COST
    threshold = _parallel_threshold(parallel)

    @T.macro
    def chunk(XT, crow, col, val, bias, Y, B, ch, acc, accu, s):
        for rr in range(T.min(rows_per_chunk, N - ch * rows_per_chunk)):
            row = ch * rows_per_chunk + rr
            start = crow[row]
            length = crow[row + 1] - start
            for bo in range(B // V):
                for v in T.vectorized(V):
                    acc[v] = bias[row]
                for j in range(length):
                    for v in T.vectorized(V):
                        acc[v] = acc[v] + val[start + j] * XT[
                            T.Cast("int64", col[start + j]), bo * V + v]
                for v in range(V):
                    Y[bo * V + v, row] = acc[v]
            for bt in range(B - B // V * V):
                b = B // V * V + bt
                for u in T.unroll(U):
                    accu[u] = T.Cast(dtype, 0)
                for jo in range(length // U):
                    for u in T.unroll(U):
                        accu[u] = accu[u] + val[start + jo * U + u] * XT[
                            T.Cast("int64", col[start + jo * U + u]), b]
                s[0] = bias[row]
                for jt in range(length - length // U * U):
                    s[0] = s[0] + val[start + length // U * U + jt] * XT[
                        T.Cast("int64", col[start + length // U * U + jt]), b]
                for u in range(U):
                    s[0] = s[0] + accu[u]
                Y[b, row] = s[0]

    @T.prim_func(private=True)
    def csr(xt_h: T.handle, crow: T.Buffer((N + 1,), crow_dtype), col: T.Buffer((nnz,), idx),
            val: T.Buffer((nnz,), dtype), bias: T.Buffer((N,), dtype), y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        XT = T.match_buffer(xt_h, (K, B), dtype)
        Y = T.match_buffer(y_h, (B, N), dtype)
        if B * flops_per_row >= threshold:
            for ch in T.parallel(nch):
                acc = T.alloc_buffer((V,), dtype, scope="local")
                accu = T.alloc_buffer((U,), dtype, scope="local")
                s = T.alloc_buffer((1,), dtype, scope="local")
                chunk(XT, crow, col, val, bias, Y, B, ch, acc, accu, s)
        else:
            acc = T.alloc_buffer((V,), dtype, scope="local")
            accu = T.alloc_buffer((U,), dtype, scope="local")
            s = T.alloc_buffer((1,), dtype, scope="local")
            for ch in range(nch):
                chunk(XT, crow, col, val, bias, Y, B, ch, acc, accu, s)

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
            row = ch * rows_per_chunk + rr
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
                b = B // V * V + bt
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
                acc = T.alloc_buffer((V,), dtype, scope="local")
                accu = T.alloc_buffer((U,), dtype, scope="local")
                s = T.alloc_buffer((1,), dtype, scope="local")
                chunk(XT, val, pos, bias, Y, B, ch, acc, accu, s)
        else:
            acc = T.alloc_buffer((V,), dtype, scope="local")
            accu = T.alloc_buffer((U,), dtype, scope="local")
            s = T.alloc_buffer((1,), dtype, scope="local")
            for ch in range(nch):
                chunk(XT, val, pos, bias, Y, B, ch, acc, accu, s)

    return _scheduled(nm)


def bmm_kernel(M: int, K: int, N: int, MB: int = DENSE_MB, dtype: str = "float32",
               parallel: bool = True):
    """Batched ``C[b] = A[b] @ B[b]`` (``A [bt, M, K]``, ``B [bt, K, N]``), ``N % 8 == 0``.

    Attention products between activations: register tile ``MB x NB`` (NB = 16 or 8 outputs), the
    ``B`` panel row is a contiguous vector load, ``A`` is broadcast; (batch x column panels) in parallel.
    """
    NB = 16 if N % 16 == 0 else 8
    nblk = N // NB
    mfull = M // MB
    flops_per_batch = 2 * M * K * N
    threshold = _parallel_threshold(parallel)

    @T.macro
    def panel(A, Bm, C, bn, acc, acc1):
        for mo in range(mfull):
            for mi in T.unroll(MB):
                for ni in T.vectorized(NB):
                    acc[mi, ni] = T.Cast(dtype, 0)
            for k in range(K):
                for mi in T.unroll(MB):
                    for ni in T.vectorized(NB):
                        acc[mi, ni] = acc[mi, ni] + A[bn // nblk, mo * MB + mi, k] * Bm[
                            bn // nblk, k, bn % nblk * NB + ni]
            for mi in T.unroll(MB):
                for ni in T.vectorized(NB):
                    C[bn // nblk, mo * MB + mi, bn % nblk * NB + ni] = acc[mi, ni]
        for mt in range(M - mfull * MB):
            for ni in T.vectorized(NB):
                acc1[ni] = T.Cast(dtype, 0)
            for k in range(K):
                for ni in T.vectorized(NB):
                    acc1[ni] = acc1[ni] + A[bn // nblk, mfull * MB + mt, k] * Bm[
                        bn // nblk, k, bn % nblk * NB + ni]
            for ni in T.vectorized(NB):
                C[bn // nblk, mfull * MB + mt, bn % nblk * NB + ni] = acc1[ni]

    @T.prim_func(private=True)
    def bmm(a_h: T.handle, b_h: T.handle, c_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        bt = T.int64()
        A = T.match_buffer(a_h, (bt, M, K), dtype)
        Bm = T.match_buffer(b_h, (bt, K, N), dtype)
        C = T.match_buffer(c_h, (bt, M, N), dtype)
        if bt * flops_per_batch >= threshold:
            for bn in T.parallel(bt * nblk):
                acc = T.alloc_buffer((MB, NB), dtype, scope="local")
                acc1 = T.alloc_buffer((NB,), dtype, scope="local")
                panel(A, Bm, C, bn, acc, acc1)
        else:
            acc = T.alloc_buffer((MB, NB), dtype, scope="local")
            acc1 = T.alloc_buffer((NB,), dtype, scope="local")
            for bn in range(bt * nblk):
                panel(A, Bm, C, bn, acc, acc1)

    return _scheduled(bmm)
