"""Normalisation kernels: mean over trailing dims, GroupNorm, LayerNorm."""

from __future__ import annotations

from tvm.script import tirx as T

from .common import BATCH_VEC, ROWS_PER_CHUNK, _parallel_threshold, _scheduled


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
