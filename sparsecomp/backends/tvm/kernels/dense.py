"""Dense kernels: ``linear`` on a packed weight, batched matmul."""

from __future__ import annotations

from tvm.script import tirx as T

from .common import by_work, DENSE_MB, DENSE_NB, _parallel_threshold, _scheduled


def dense_kernel(K: int, NP: int, MB: int = DENSE_MB, NB: int = DENSE_NB, dtype: str = "float32",
                 parallel: bool = True):
    """``Y[B, NP] = X[B, K] @ Wp + bias`` with ``Wp`` packed ``[NP/NB, K, NB]``; ``NP % NB == 0``."""
    nblk = NP // NB
    flops_per_row = 2 * K * NP
    threshold = _parallel_threshold(parallel)

    @T.macro
    def panel(X, w, bias, Y, B, nb, acc, acc1, in_task):
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

    panels = by_work(threshold, {"acc": ((MB, NB), dtype), "acc1": ((NB,), dtype)}, panel, "nb")

    @T.prim_func(private=True)
    def dense(x_h: T.handle, w: T.Buffer((nblk, K, NB), dtype), bias: T.Buffer((NP,), dtype),
              y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        X = T.match_buffer(x_h, (B, K), dtype)
        Y = T.match_buffer(y_h, (B, NP), dtype)
        panels(B * flops_per_row, nblk, (X, w, bias, Y, B))

    return _scheduled(dense)


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
