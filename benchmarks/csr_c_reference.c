/* Hand-written C reference for the batch-1 CSR (SELL-8) kernel: how close can the same loop get to the
 * bandwidth bound on this CPU, without TVM?  It answers whether the CSR rows of the sparse1 table that
 * miss 0.85 of the bound are a TVM code-generation problem or a limit of the loop on the core.
 *
 *   gcc -O3 -march=native benchmarks/csr_c_reference.c -o /tmp/csr_c_reference
 *   /tmp/csr_c_reference 0.1      # density (0.1 = 90 % sparsity); 3072x768, 1 thread
 *
 * The layout is the one `kernels.sell_layout` builds (8 output rows per slice in the 8 lanes of a
 * vector; int16 column indices, four to an int64 word; float32 values; `perm`, the output row of
 * each lane, rows sorted within windows of 128), with every slice the same length (no padding: the
 * kernel's best case).  The loop is the one `kernels.csr_kernel` generates at batch 1: per entry,
 * 2 index words, 8 scalar loads of x put into one vector, one FMA, 4 rotating accumulators,
 * software prefetch 2 KiB ahead (`prefetcht0`, the AVX-512 Xeon's calibrated plan); each slice's
 * 8 sums are stored in slice order and reach their output rows through `perm` in one pass at the
 * end.  Cold = a shuffled walk over copies that add up to 256 MiB in a huge-page mapping (as in
 * bench_tvm.py); the bound's bandwidth = a 4-stream read of a 256 MiB buffer, timed in each round.
 * Columns: `pf` (the kernel, cold), `each` (each slice's 8 sums scattered through `perm` as the
 * slice ends, the kernel before: stores waiting on perm's cold loads), `nopf` (`pf` without
 * software prefetch), `read` (a plain 4-stream read of the same bytes, cold), `hot` (the kernel on
 * one copy, which then sits in cache), `noidx_hot` (the loop with the x loads at fixed offsets: no
 * index work at all, a floor for the x assembly alone).  All as "of bound" = bound time / time.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define R 8
#define PD 64 /* entries ahead = 2 KiB of values */

static const int N = 3072, K = 768;
static int S, E;
static int *sptr;
static float *x, *y, *ys, *bias;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* the 8 values of x at an entry's columns (two int64 words of four int16 columns) */
static inline __m256 xvec(const uint64_t *w) {
    uint64_t a = w[0], b = w[1];
    __m128 lo = _mm_load_ss(x + (a & 0xffff));
    lo = _mm_insert_ps(lo, _mm_load_ss(x + ((a >> 16) & 0xffff)), 0x10);
    lo = _mm_insert_ps(lo, _mm_load_ss(x + ((a >> 32) & 0xffff)), 0x20);
    lo = _mm_insert_ps(lo, _mm_load_ss(x + (a >> 48)), 0x30);
    __m128 hi = _mm_load_ss(x + (b & 0xffff));
    hi = _mm_insert_ps(hi, _mm_load_ss(x + ((b >> 16) & 0xffff)), 0x10);
    hi = _mm_insert_ps(hi, _mm_load_ss(x + ((b >> 32) & 0xffff)), 0x20);
    hi = _mm_insert_ps(hi, _mm_load_ss(x + (b >> 48)), 0x30);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

/* no index work: 8 loads of x at offsets that depend only on the entry's address */
static inline __m256 xvec_noidx(const uint64_t *w) {
    const float *p = x + (((uintptr_t)w >> 4) & 511);
    __m128 lo = _mm_load_ss(p);
    lo = _mm_insert_ps(lo, _mm_load_ss(p + 17), 0x10);
    lo = _mm_insert_ps(lo, _mm_load_ss(p + 33), 0x20);
    lo = _mm_insert_ps(lo, _mm_load_ss(p + 49), 0x30);
    __m128 hi = _mm_load_ss(p + 65);
    hi = _mm_insert_ps(hi, _mm_load_ss(p + 81), 0x10);
    hi = _mm_insert_ps(hi, _mm_load_ss(p + 97), 0x20);
    hi = _mm_insert_ps(hi, _mm_load_ss(p + 113), 0x30);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

#define KERNEL(NAME, XVEC, PF, EACH)                                                                 \
    static void NAME(const uint16_t *col, const float *val, const int *perm) {                      \
        for (int s = 0; s < S; s++) {                                                                \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                              \
            for (int e = sptr[s]; e < sptr[s + 1]; e += 4) {                                         \
                if (PF) {                                                                            \
                    _mm_prefetch((const char *)(val + (size_t)(e + PD) * R), _MM_HINT_T0);           \
                    _mm_prefetch((const char *)(val + (size_t)(e + PD + 2) * R), _MM_HINT_T0);       \
                    _mm_prefetch((const char *)(col + (size_t)(e + PD) * R), _MM_HINT_T0);           \
                }                                                                                    \
                const uint64_t *w = (const uint64_t *)(col + (size_t)e * R);                         \
                const float *v = val + (size_t)e * R;                                                \
                a0 = _mm256_fmadd_ps(_mm256_load_ps(v), XVEC(w), a0);                                \
                a1 = _mm256_fmadd_ps(_mm256_load_ps(v + R), XVEC(w + 2), a1);                        \
                a2 = _mm256_fmadd_ps(_mm256_load_ps(v + 2 * R), XVEC(w + 4), a2);                    \
                a3 = _mm256_fmadd_ps(_mm256_load_ps(v + 3 * R), XVEC(w + 6), a3);                    \
            }                                                                                        \
            _mm256_store_ps(ys + s * R, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));\
            if (EACH)                                                                                \
                for (int i = s * R; i < s * R + R; i++) y[perm[i]] = ys[i] + bias[perm[i]];          \
        }                                                                                            \
        if (!EACH)                                                                                   \
            for (int i = 0; i < N; i++) y[perm[i]] = ys[i] + bias[perm[i]];                          \
    }
KERNEL(kernel_pf, xvec, 1, 0)
KERNEL(kernel_each, xvec, 1, 1)
KERNEL(kernel_nopf, xvec, 0, 0)
KERNEL(kernel_noidx, xvec_noidx, 1, 0)

static float read4(const float *p, size_t n) { /* 4 interleaved sequential streams */
    size_t q = n / 4 / 8 * 8;
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i < q; i += 8) {
        a = _mm256_add_ps(a, _mm256_load_ps(p + i));
        b = _mm256_add_ps(b, _mm256_load_ps(p + q + i));
        c = _mm256_add_ps(c, _mm256_load_ps(p + 2 * q + i));
        d = _mm256_add_ps(d, _mm256_load_ps(p + 3 * q + i));
    }
    float t[8];
    _mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return t[0];
}

static int cmp(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

static void *huge_map(size_t bytes) {
    void *p = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
}

int main(int argc, char **argv) {
    double density = argc > 1 ? atof(argv[1]) : 0.1;
    if (!(density > 0 && density <= 1)) {
        fprintf(stderr, "density must be in (0, 1], got %s\n", argv[1]);
        return 2;
    }
    srand(1);
    S = N / R;
    sptr = malloc((S + 1) * sizeof *sptr);
    int per = ((int)(K * density + 0.5) + 3) / 4 * 4;
    sptr[0] = 0;
    for (int s = 0; s < S; s++) sptr[s + 1] = sptr[s] + per;
    E = sptr[S];
    size_t slots = (size_t)(E + PD + 8) * R; /* prefetches past the end stay inside the copy */
    size_t cbytes = (slots * 2 + 4095) / 4096 * 4096, vbytes = (slots * 4 + 4095) / 4096 * 4096;
    size_t pbytes = (N * sizeof(int) + 4095) / 4096 * 4096;
    size_t one = cbytes + vbytes + pbytes;
    int copies = (int)((256u << 20) / one) + 1;
    char *arena = huge_map(one * copies);
    x = aligned_alloc(64, K * sizeof *x);
    y = aligned_alloc(64, N * sizeof *y);
    ys = aligned_alloc(64, N * sizeof *ys);
    bias = aligned_alloc(64, N * sizeof *bias);
    for (int i = 0; i < N; i++) bias[i] = 0.f;
    for (int k = 0; k < K; k++) x[k] = (float)k * 1e-3f;
    for (int c = 0; c < copies; c++) {
        uint16_t *col = (uint16_t *)(arena + one * c);
        float *val = (float *)(arena + one * c + cbytes);
        for (size_t i = 0; i < slots; i++) {
            col[i] = (uint16_t)(rand() % K);
            val[i] = (float)(rand() % 100) / 100.f;
        }
        int *perm = (int *)(arena + one * c + cbytes + vbytes); /* shuffled within 128-row windows */
        for (int i = 0; i < N; i++) perm[i] = i;
        for (int w = 0; w < N; w += 128)
            for (int i = 127; i > 0; i--) {
                int j = rand() % (i + 1), t = perm[w + i];
                perm[w + i] = perm[w + j];
                perm[w + j] = t;
            }
    }
    int *order = malloc(copies * sizeof *order);
    for (int i = 0; i < copies; i++) order[i] = i;
    for (int i = copies - 1; i > 0; i--) {
        int j = rand() % (i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    size_t big_bytes = 256u << 20;
    float *big = huge_map(big_bytes);
    memset(big, 0, big_bytes);
    double fmt_bytes = (double)E * R * (4 + 2) + N * sizeof(int);
    volatile float sink = 0;
    int next = 0;
    printf("3072x768 at %.1f %% sparsity, %d entries of 8, %.0f KiB, %d cold copies\n",
           100 * (1 - density), E, fmt_bytes / 1024, copies);
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        sink += read4(big, big_bytes / 4);
        double bw = big_bytes / (now() - t0), bound = fmt_bytes / bw;
        double med[4];
        for (int v = 0; v < 4; v++) {
            double ts[15];
            for (int r = 0; r < 15; r++) {
                double t1 = now();
                for (int k = 0; k < 20; k++) {
                    int c = order[next++ % copies];
                    const uint16_t *col = (const uint16_t *)(arena + one * c);
                    const float *val = (const float *)(arena + one * c + cbytes);
                    const int *perm = (const int *)(arena + one * c + cbytes + vbytes);
                    if (v == 0) kernel_pf(col, val, perm);
                    else if (v == 1) kernel_each(col, val, perm);
                    else if (v == 2) kernel_nopf(col, val, perm);
                    else sink += read4((const float *)col, (size_t)(fmt_bytes / 4));
                }
                ts[r] = (now() - t1) / 20;
            }
            qsort(ts, 15, sizeof ts[0], cmp);
            med[v] = ts[7];
        }
        double hot = 1e9, noidx = 1e9;
        for (int r = 0; r < 30; r++) {
            double t1 = now();
            const int *perm = (const int *)(arena + cbytes + vbytes);
            kernel_pf((const uint16_t *)arena, (const float *)(arena + cbytes), perm);
            double t2 = now();
            kernel_noidx((const uint16_t *)arena, (const float *)(arena + cbytes), perm);
            double t3 = now();
            if (t2 - t1 < hot) hot = t2 - t1;
            if (t3 - t2 < noidx) noidx = t3 - t2;
        }
        printf("bw %.1f GB/s bound %.1f us | pf %.1f us (%.2f) | each %.1f (%.2f) | nopf %.1f (%.2f) | "
               "read %.1f (%.2f) | hot %.1f (%.2f) | noidx_hot %.1f (%.2f)\n",
               bw / 1e9, bound * 1e6, med[0] * 1e6, bound / med[0], med[1] * 1e6, bound / med[1],
               med[2] * 1e6, bound / med[2], med[3] * 1e6, bound / med[3], hot * 1e6, bound / hot,
               noidx * 1e6, bound / noidx);
    }
    return sink == 12345.f; /* keep the sums */
}
