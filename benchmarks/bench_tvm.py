"""TVM backend benchmarks: sparse kernels vs the bandwidth bound and vs scipy/torch/ORT, dense models.

Run (1 thread unless said; all candidates of a row are timed interleaved in one run, and ratios are
reported, so a noisy shared machine shifts rows less than columns)::

    .venv/bin/python benchmarks/bench_tvm.py                  # everything (several minutes)
    .venv/bin/python benchmarks/bench_tvm.py --only sparse1   # batch-1 cold sparse linear
    .venv/bin/python benchmarks/bench_tvm.py --only sparse1 --bandwidth 17.5  # bound at a known BW
    .venv/bin/python benchmarks/bench_tvm.py --only sparse1 --sparsities 0.75,0.875  # + N:M 1:4, 1:8
    .venv/bin/python benchmarks/bench_tvm.py --only batched   # batch 8 / 64 at 90 % block sparsity
    .venv/bin/python benchmarks/bench_tvm.py --only sparse1 --rounds 21  # steadier medians
    .venv/bin/python benchmarks/bench_tvm.py --only models    # zoo + MiniLM dense: torch / ORT / TVM
    .venv/bin/python benchmarks/bench_tvm.py --only demo      # MiniLM at each pruning ratio
    .venv/bin/python benchmarks/bench_tvm.py --only coldread  # plain cold reads, 4 KiB vs 2 MiB pages
    .venv/bin/python benchmarks/bench_tvm.py --only sparse1 --prefetch default  # uncalibrated kernels

Tables are printed as markdown.

*Cold weights*: every candidate cycles, in a shuffled order, through copies of its weights that add up
to 8x the L3 cache (256 MiB), so each call streams them from DRAM (with 2x, part of a copy could still
be in L3 when its turn came again). Our kernels' copies are held as ``lower`` holds a model's weights:
in a huge-page arena (``backends/tvm/weights.py``), back to back. The bandwidth bound is ``format bytes
/ DRAM read bandwidth``, with the bandwidth of the fastest single-core read we have: a TIR sum of a
256 MiB huge-page buffer as 4 interleaved sequential streams (:func:`read_kernel`; ~1.14x a single-stream
torch sum, whose 64 MiB version earlier versions of this bench used), timed in the same interleaved
rounds as each row. "Cold read" is the practical floor for the same bytes: that read over a buffer of the
format's size, cycling over cold copies exactly like the kernels, timed in the same rounds. Every
interleaved sample starts with one untimed call.

*Calls*: in the batch-1 table our kernels and the cold read are called from a compiled loop
(:class:`KernelLoop`), as the Relax VM calls them in a lowered model; a call from Python cost a 20 us
kernel 2.4-4.4 us more (docs/BENCHMARKS.md). The comparisons with scipy / torch, which can only be
called from Python, use our kernels called from Python too.

*Pinning*: the process pins itself to one core (``--no-pin``: not); every candidate is single-threaded.
Until the fifth session TVM's thread-pool set-up did this as a side effect (since fixed); an unpinned
run of the batch-1 table had about the same kernel times but a bound that moved with the host's
bandwidth (18-22.8 GB/s in one run, 18.7-20.4 pinned).

*Prefetch*: the sparse kernels are built with this machine's calibrated prefetch plan
(``backends/tvm/calibrate.py``, as ``lower`` builds them); when there is none yet, the bench runs
the calibration first (about 20 s, its own synthetic 4096x1024 weights, saved like ``sparsecomp
calibrate`` saves it). ``--prefetch default`` uses the uncalibrated default plan instead.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

import sparsecomp
from sparsecomp.backends.tvm import calibrate, kernels
from sparsecomp.backends.tvm.target import host_target, set_threads
from sparsecomp.backends.tvm.weights import WeightArena
from sparsecomp.ops.formats import pack

import tvm
import tvm_ffi
from tvm.script import tirx as T

L3_BYTES = 32 << 20
COLD_BYTES = 8 * L3_BYTES
READ_STREAMS = 4
OUT, IN = 3072, 768
# the sparse kernels' software prefetch (main() sets the host's calibrated plan)
PLAN = [kernels.DEFAULT_PLAN]


# --------------------------------------------------------------------------- helpers
def timeit_interleaved(fns: dict, rounds: int = 7, calls: int = 20) -> dict:
    """Median seconds per call of each fn, timed in interleaved rounds.

    Each sample starts with one untimed call: the candidate before (the 256 MiB stream above all)
    evicts the next one's code and small hot data from L2 / L3, and that first call's misses are a
    cost of switching workloads, not of the candidate. Weights stay cold, each call taking the next
    copy. Without it, whichever candidate ran right after the stream lost ~5 us per 30 us call (the
    same 1x16 kernel at 95 %, batch 1: 33.6 us first after the stream, 27.9 us second). A fn that
    makes several kernel calls itself (:class:`KernelLoop`) has ``kernel_calls``: its time is per
    kernel call."""
    samples = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            samples[k].append((time.perf_counter() - t0) / calls / getattr(f, "kernel_calls", 1))
    return {k: statistics.median(v) for k, v in samples.items()}


def timeit_adaptive(fns: dict, rounds: int = 9, sample_s: float = 0.02) -> dict:
    """Median seconds per call of each fn over interleaved rounds, each sample ~``sample_s`` long.

    Each fn gets its own call count per sample (from one timed call after warm-up), so a 0.1 ms model
    is not timed over a 0.5 ms window, where one preemption on a shared machine moves the median.
    """
    calls = {}
    for k, f in fns.items():
        for _ in range(3):
            f()
        t0 = time.perf_counter()
        f()
        calls[k] = int(min(200, max(3, sample_s / max(time.perf_counter() - t0, 1e-6))))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()  # untimed, as in timeit_interleaved
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                f()
            samples[k].append((time.perf_counter() - t0) / calls[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def read_kernel(nbytes: int, streams: int = READ_STREAMS):
    """``(fn, shape)``: the sum of a ``shape = (streams, L)`` float32 buffer of about ``nbytes``, read
    as ``streams`` interleaved sequential streams (one per row). The fastest way we found for one
    core to read DRAM: 4 streams over a 256 MiB buffer reach ~1.14x the bandwidth of one stream (a
    torch sum), and a 0.5-1 MiB read gains more (0.85-0.9 -> 1.0-1.1 of the 256 MiB bandwidth)."""
    per = max(16, nbytes // 4 // streams // 16 * 16)
    f32 = "float32"

    @T.prim_func(private=True)
    def read(x: T.Buffer((streams, per), f32), y: T.Buffer((8,), f32)):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((8, 8), f32)
        for a in range(8):
            for q in T.vectorized(8):
                acc[a, q] = T.float32(0)
        for i in range(per // 16):
            for s in T.unroll(streams):
                for u in T.unroll(2):
                    for q in T.vectorized(8):
                        acc[s % 4 * 2 + u, q] = acc[s % 4 * 2 + u, q] + x[s, i * 16 + u * 8 + q]
        for a in range(1, 8):
            for q in T.vectorized(8):
                acc[0, q] = acc[0, q] + acc[a, q]
        for q in T.vectorized(8):
            y[q] = acc[0, q]

    return _compile(read.with_attr("tirx.is_scheduled", True)), (streams, per)


def _read_copies(nbytes: int, n: int) -> tuple[KernelCopies, int]:
    """``(read, bytes read)``: :func:`read_kernel` for ``nbytes`` over ``n`` buffers for it in one
    huge-page arena."""
    f, shape = read_kernel(nbytes)
    copies = arena_copies([np.ones(shape, np.float32)], n)
    out = WeightArena([np.zeros(8, np.float32)]).tensors
    return KernelCopies(f, out, 0, copies), shape[0] * shape[1] * 4


def read_candidate(nbytes: int) -> KernelCopies:
    """Cold read of ``nbytes``: :func:`read_kernel` over copies in one huge-page arena, cycling like
    the kernels: the practical floor for streaming that many bytes once per call."""
    return _read_copies(nbytes, copies_for(nbytes))[0]


def stream_candidate(nbytes: int = 256 << 20):
    """``(fn, nbytes)``: one :func:`read_kernel` read of a ``nbytes`` huge-page buffer, whose bandwidth
    is the bound's. 256 MiB = 8x the L3: at 64 MiB a 4-stream read kept part of the buffer in L3
    between calls (37 vs 24 GB/s)."""
    read, nread = _read_copies(nbytes, 1)
    return (lambda: read.fn(0)), nread


def sum_overhead_candidate():
    """torch's per-call cost of a sum (dispatch, reduction set-up) on a 1-element tensor, subtracted
    from the torch cold reads of ``--only coldread``: ours pay a ~1 us call from Python into TVM."""
    one = torch.ones(1)
    return lambda: one.sum()


def copies_for(nbytes: int) -> int:
    """Copies of a weight that add up to :data:`COLD_BYTES` (8x the L3), so each call reads DRAM."""
    return max(2, -(-COLD_BYTES // max(nbytes, 1)))


class Rotating:
    """Call ``fn(i)`` over ``n`` weight copies, in a fixed shuffled order: copies sit back to back in
    one arena, and walking them in memory order let the hardware prefetcher run into the next one."""

    def __init__(self, fn, n):
        self.fn, self.n, self.i = fn, n, 0
        self.order = np.random.default_rng(0).permutation(n)

    def __call__(self):
        self.i = (self.i + 1) % self.n
        return self.fn(int(self.order[self.i]))


class KernelCopies(Rotating):
    """A compiled kernel over weight copies, ``f(*fixed[:split], *copies[i], *fixed[split:])``, called
    from Python like :class:`Rotating`. ``copies`` (from :func:`arena_copies`) and ``fixed`` (one
    :class:`WeightArena` of the other arguments, the output last) let :class:`KernelLoop` make the
    same calls from a compiled loop."""

    def __init__(self, f, fixed: list, split: int, copies: list):
        self.f, self.fixed, self.split, self.copies = f, fixed, split, copies
        head, tail = fixed[:split], fixed[split:]
        super().__init__(lambda i: f(*head, *copies[i], *tail), len(copies))

    def loop(self, calls: int = 20) -> "KernelLoop":
        return KernelLoop(self, calls)


def _arena_span(tensors: list):
    """``(uint8 tensor over the arena bytes spanned by tensors, byte offset of each)``; the tensors
    (views of one :class:`WeightArena`) keep the memory alive, and the caller keeps them."""
    import ctypes

    ptrs = [torch.from_dlpack(t).data_ptr() for t in tensors]
    base = min(ptrs)
    end = max(p + torch.from_dlpack(t).nbytes for p, t in zip(ptrs, tensors))
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * (end - base)).from_address(base))
    return tvm.runtime.from_dlpack(raw), [p - base for p in ptrs]


class KernelLoop:
    """``calls`` calls of a :class:`KernelCopies` kernel per ``__call__``, each on the next copy of a
    shuffled order, made by a compiled TIR loop (``tvm_call_packed`` of the kernel, its arguments
    built on the stack): no Python between the calls, as when the Relax VM runs a lowered model.
    From Python, each call of a ~20 us kernel paid 2.4-4.4 us more, of which an empty call over the
    same cold copies explains 1.1-1.8 us (a 472 KiB cold read: 16.6-17.7 us from Python, 14.6-15.6
    us from the loop). :func:`timeit_interleaved` divides by ``kernel_calls``: its times are per
    kernel call."""

    _names = itertools.count()

    def __init__(self, kc: KernelCopies, calls: int = 20, seed: int = 0):
        self.kc, self.kernel_calls = kc, calls
        flat = [t for c in kc.copies for t in c]
        self.arena, offs = _arena_span(flat)
        self.fixed_arena, fixed_offs = _arena_span(kc.fixed)
        n, J = len(kc.copies), len(kc.copies[0])
        self.offs = tvm.runtime.tensor(np.array(offs, np.int64).reshape(n, J), tvm.cpu())
        # one shuffled order of the copies, walked ``calls`` at a time and wrapping around: a copy comes
        # back only after all the others (as in :class:`Rotating`)
        self.cycle = math.lcm(n, calls)
        seq = np.tile(np.random.default_rng(seed).permutation(n), self.cycle // n).astype(np.int32)
        self.order = tvm.runtime.tensor(seq, tvm.cpu())
        self.start = 0
        name = f"sparsecomp.bench.kernel{next(self._names)}"
        tvm_ffi.register_global_func(name, kc.f, override=True)
        spec = lambda t: (tuple(int(d) for d in t.shape), str(t.dtype))  # noqa: E731
        slots = [spec(t) for t in kc.copies[0]]
        fixed = [(spec(t), off) for t, off in zip(kc.fixed, fixed_offs)]
        args = ([("fixed", i) for i in range(kc.split)] + [("copy", j) for j in range(J)]
                + [("fixed", i) for i in range(kc.split, len(fixed))])
        A, F, L = int(self.arena.shape[0]), int(self.fixed_arena.shape[0]), self.cycle

        def make(buf, byte_off, shape, dtype):
            return T.tvm_stack_make_array(T.address_of(buf[byte_off], dtype="handle"),
                                          T.tvm_stack_make_shape(*shape, dtype="handle"), 0, len(shape),
                                          tvm.tirx.const(0, dtype), 0, dtype="handle")

        u8, i64, i32 = "uint8", "int64", "int32"

        @T.prim_func(private=True)
        def loop(arena: T.Buffer((A,), u8), offs: T.Buffer((n, J), i64),
                 order: T.Buffer((L,), i32), start: T.int32, fixed_arena: T.Buffer((F,), u8)):
            for k in range(calls):
                T.evaluate(T.tvm_call_packed(name, *[
                    make(arena, offs[order[start + k], i], *slots[i]) if kind == "copy" else
                    make(fixed_arena, fixed[i][1], *fixed[i][0]) for kind, i in args], dtype="int32"))

        self.fn = _compile(loop.with_attr("tirx.is_scheduled", True))
        # the loop must make the calls: the copies are equal, so the output (the last fixed argument)
        # after a loop is the one a call from Python gave
        out = kc.fixed[-1]
        kc.fn(0)
        want = out.numpy().copy()
        out.copyfrom(np.full_like(want, np.nan))
        self()
        assert np.array_equal(out.numpy(), want), "KernelLoop: the loop did not call the kernel"
        self.start = 0

    def __call__(self):
        self.fn(self.arena, self.offs, self.order, self.start, self.fixed_arena)
        self.start = (self.start + self.kernel_calls) % self.cycle


def prune_blocks(w: torch.Tensor, sparsity: float, block, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r, c = block
    keep = torch.rand(w.shape[0] // r, w.shape[1] // c, generator=g) >= sparsity
    return w * keep.repeat_interleave(r, 0).repeat_interleave(c, 1)


def prune_nm(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, m)
    idx = g.abs().argsort(-1)[..., m - n:]
    return torch.zeros_like(g).scatter(-1, idx, g.gather(-1, idx)).reshape(w.shape)


def _compile(func):
    """Build one kernel (generated with ``parallel=False``, as ``lower(num_threads=1)`` does)."""
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       target=host_target())["main"]


def arena_copies(arrays: list, n: int) -> list[list]:
    """``n`` copies of ``arrays`` held as ``lower`` holds a model's weights: back to back in one
    huge-page :class:`WeightArena` (one arena per copy would round each up to 2 MiB)."""
    ts = WeightArena(list(arrays) * n).tensors
    k = len(arrays)
    return [ts[i * k:(i + 1) * k] for i in range(n)]


def _page_backed_copies(nbytes: int, n: int, huge: bool) -> list[torch.Tensor]:
    """``n`` float32 tensors of ``nbytes`` (ones) in one :class:`WeightArena`, on huge pages or not."""
    ones = np.ones(max(1, nbytes // 4), np.float32)
    return [torch.from_dlpack(t) for t in WeightArena([ones] * n, huge_pages=huge).tensors]


def tvm_sparse_candidate(fmt: str, w: torch.Tensor, block=None, nm=None,
                         batch=1) -> tuple[KernelCopies, int]:
    """(our kernel on ``w`` (already pruned) over weight copies, format bytes)."""
    if fmt == "bsr":
        p = pack(w, "bsr", block=block)
        r, c = block
        nnzb = p.values.shape[0]
        f = _compile(kernels.bsr_kernel(OUT, IN, r, c, nnzb, "int32", parallel=False, pf=PLAN[0].bsr(r, c)))
        crow = p.crow_indices.numpy().astype(np.int32)
        stored = kernels.bsr_stored(p.col_indices.numpy(), p.values.numpy(), r, c)
        nbytes = crow.nbytes + sum(a.nbytes for a in stored)  # streamed: a last group's padding too
        n = copies_for(nbytes)
        ws = arena_copies([crow, *stored], n)
        transpose = False
    elif fmt == "csr":
        p = pack(w, "csr")
        sptr, col, vals, perm = kernels.sell_layout(p.crow_indices.numpy(),
                                                    p.col_indices.numpy().astype(np.int16), p.values.numpy())
        bmi = bool(tvm.target.codegen.target_has_features("bmi", host_target()))
        f = _compile(kernels.csr_kernel(OUT, IN, len(sptr) - 1, col.shape[0], "int16", parallel=False, bmi=bmi,
                                        pf=PLAN[0].csr))
        nbytes = sptr.nbytes + col.nbytes + vals.nbytes + perm.nbytes  # streamed, padding included
        n = copies_for(nbytes)
        ws = arena_copies([sptr, col, vals, perm], n)
        transpose = True
    else:
        nn_, m = nm
        p = pack(w, "nm", n=nn_, m=m)
        vals, pos = kernels.nm_lane_layout(p.values.numpy(), p.indices.numpy())
        f = _compile(kernels.nm_lanes_kernel(OUT, IN, nn_, m, parallel=False, pf=PLAN[0].nm))
        nbytes = vals.nbytes + pos.nbytes
        n = copies_for(nbytes)
        ws = arena_copies([vals, pos], n)
        transpose = False
    x = torch.randn(batch, IN)
    xt, bias, y = WeightArena([(x.T if transpose else x).contiguous().numpy(),
                               np.zeros(w.shape[0], np.float32), np.zeros((batch, OUT), np.float32)]).tensors
    f(xt, *ws[0], bias, y)
    ref = x @ w.T
    err = float((torch.from_numpy(y.numpy()) - ref).abs().max() / ref.abs().max())
    assert err < 1e-4, f"{fmt} kernel wrong: rel err {err}"
    return KernelCopies(f, [xt, bias, y], 1, ws), nbytes


def scipy_candidate(w: torch.Tensor, batch=1):
    import scipy.sparse as sp

    m = sp.csr_matrix(w.numpy())
    nbytes = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
    n = copies_for(nbytes)
    mats = [m.copy() for _ in range(n)]
    x = np.random.randn(IN, batch).astype(np.float32)
    return Rotating(lambda i: mats[i] @ x, n)


def torch_sparse_candidates(w: torch.Tensor, batch=1, block=None):
    from sparsecomp.ops import SparseLinear

    out = {}
    fmts = [("torch csr", dict(format="csr"))]
    if block is not None:
        fmts.append((f"torch bsr{block[0]}x{block[1]}", dict(format="bsr", block=block)))
    x = torch.randn(batch, IN)
    for name, kw in fmts:
        layer = SparseLinear.from_dense(w, **kw)
        n = copies_for(layer.nbytes)
        layers = [SparseLinear.from_dense(w, **kw) for _ in range(n)]
        out[name] = Rotating(lambda i, layers=layers: layers[i](x), n)
    return out


def dense_candidates(w: torch.Tensor, batch: int, with_ort=True):
    n = copies_for(w.numel() * 4)
    ws = [w.clone() for _ in range(n)]
    x = torch.randn(batch, IN)
    out = {"torch dense": Rotating(lambda i: torch.nn.functional.linear(x, ws[i]), n)}
    dev = tvm.cpu()
    f = _compile(kernels.dense_kernel(IN, OUT, parallel=False))
    packed = w.reshape(OUT // 16, 16, IN).permute(0, 2, 1).contiguous().numpy()
    packs = [c[0] for c in arena_copies([packed], n)]
    xt = tvm.runtime.tensor(x.numpy(), dev)
    b = tvm.runtime.tensor(np.zeros(OUT, np.float32), dev)
    y = tvm.runtime.tensor(np.zeros((batch, OUT), np.float32), dev)
    out["tvm dense"] = Rotating(lambda i: f(xt, packs[i], b, y), n)
    if with_ort:
        ort = ort_matmul(ws, batch)
        if ort is not None:
            out["ORT dense"] = ort
    return out


def ort_matmul(ws, batch):
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sessions = []
    # ORT folds initializers; a separate session per weight copy keeps them cold like the others
    for wi in ws[: max(2, min(len(ws), 12))]:
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "wt"], ["y"])], "mm",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, IN])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, OUT])],
            [numpy_helper.from_array(wi.T.contiguous().numpy(), "wt")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        sessions.append(ort.InferenceSession(model.SerializeToString(), opts,
                                             providers=["CPUExecutionProvider"]))
    x = np.random.randn(batch, IN).astype(np.float32)
    return Rotating(lambda i: sessions[i].run(None, {"x": x}), len(sessions))


# --------------------------------------------------------------------------- sections
def bench_sparse_batch1(bw: float | None, sparsities=(0.7, 0.8, 0.9, 0.95), rounds: int = 7) -> None:
    """``bw`` fixes the bound's bandwidth (bytes/s); ``None``: a 256 MiB read (:func:`stream_candidate`)
    timed in each row's interleaved rounds (a shared host's bandwidth drifts within a run; the bound
    follows it)."""
    print("\n### Sparse linear 3072x768, batch 1, weights cold, 1 thread\n")
    if bw is None:
        print("Bound bandwidth: a 256 MiB single-core read (4 interleaved streams) timed in each row's "
              "rounds (column GB/s)\n")
        stream, stream_bytes = stream_candidate()
    else:
        print(f"DRAM read bandwidth used for the bound: {bw / 1e9:.1f} GB/s\n")
    print("Ours and the cold read: called from a compiled loop (`KernelLoop`), as the Relax VM calls "
          "kernels in a lowered model. The last five columns: ours called from Python, like scipy and "
          "torch.\n")
    print("| sparsity | format | ours us | GB/s | bound us | of bound | cold read us | of cold read | "
          "ours from Python us | best scipy/torch us | vs best | torch dense us | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    w = torch.randn(OUT, IN)
    dense = dense_candidates(w, 1, with_ort=False)["torch dense"]
    for s in sparsities:
        cases = [("bsr", (16, 1), None), ("bsr", (8, 8), None), ("bsr", (4, 4), None), ("bsr", (1, 16), None),
                 ("csr", None, None)]
        if s in (0.75, 0.875):
            cases.append(("nm", None, (1, 4) if s == 0.75 else (1, 8)))
        for fmt, block, nm in cases:
            wp = (prune_blocks(w, s, block) if fmt == "bsr" else
                  prune_nm(w, *nm) if fmt == "nm" else prune_blocks(w, s, (1, 1)))
            ours, nbytes = tvm_sparse_candidate(fmt, wp, block=block, nm=nm)
            fns = {"ours": ours.loop(), "cold read": read_candidate(nbytes).loop(), "ours py": ours,
                   "scipy": scipy_candidate(wp), "dense": dense}
            if bw is None:
                fns["stream"] = stream
            fns.update(torch_sparse_candidates(wp, 1, block if fmt == "bsr" else None))
            t = timeit_interleaved(fns, rounds)
            best_other = min(v for k, v in t.items()
                             if k not in ("ours", "ours py", "dense", "cold read", "stream"))
            cold, py = t["cold read"], t["ours py"]
            row_bw = bw if bw is not None else stream_bytes / t["stream"]
            bound = nbytes / row_bw
            label = f"bsr{block[0]}x{block[1]}" if fmt == "bsr" else f"nm{nm[0]}:{nm[1]}" if nm else fmt
            print(f"| {s:.0%} | {label} | {t['ours'] * 1e6:.1f} | {row_bw / 1e9:.1f} | {bound * 1e6:.1f} | "
                  f"{bound / t['ours']:.2f} | {cold * 1e6:.1f} | {cold / t['ours']:.2f} | {py * 1e6:.1f} | "
                  f"{best_other * 1e6:.1f} | {best_other / py:.2f}x | "
                  f"{t['dense'] * 1e6:.1f} | {t['dense'] / py:.2f}x |", flush=True)


def bench_batched(batches=(8, 64), sparsity=0.9, rounds: int = 7) -> None:
    print(f"\n### Sparse linear 3072x768 at {sparsity:.0%} block sparsity, batch 8 / 64, cold, 1 thread\n")
    print("| batch | format | ours us | torch dense us | ORT dense us | TVM dense us | best dense / ours |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    w = torch.randn(OUT, IN)
    for b in batches:
        dense = dense_candidates(w, b)
        for block in ((16, 1), (4, 4), (8, 8), (1, 16)):
            wp = prune_blocks(w, sparsity, block)
            ours, _ = tvm_sparse_candidate("bsr", wp, block=block, batch=b)
            t = timeit_interleaved({"ours": ours, **dense}, rounds)
            best = min(v for k, v in t.items() if k != "ours")
            print(f"| {b} | bsr{block[0]}x{block[1]} | {t['ours'] * 1e6:.1f} | "
                  f"{t['torch dense'] * 1e6:.1f} | {t.get('ORT dense', float('nan')) * 1e6:.1f} | "
                  f"{t['tvm dense'] * 1e6:.1f} | {best / t['ours']:.2f}x |", flush=True)
        wp = prune_blocks(w, sparsity, (1, 1))
        ours, _ = tvm_sparse_candidate("csr", wp, batch=b)
        t = timeit_interleaved({"ours": ours, **dense}, rounds)
        best = min(v for k, v in t.items() if k != "ours")
        print(f"| {b} | csr | {t['ours'] * 1e6:.1f} | {t['torch dense'] * 1e6:.1f} | "
              f"{t.get('ORT dense', float('nan')) * 1e6:.1f} | {t['tvm dense'] * 1e6:.1f} | "
              f"{best / t['ours']:.2f}x |", flush=True)


def ort_session(module, args, kwargs):
    """ONNX Runtime session (1 thread) for a module, or None if the export fails."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(args), path, kwargs=kwargs or None, dynamo=True,
                              verbose=False)
    except Exception as err:  # noqa: BLE001 - report and go on
        print(f"<!-- ORT export failed for {type(module).__name__}: {str(err).splitlines()[0][:120]} -->")
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {n: t.numpy() for n, t in zip(names, flat)}
    return lambda: sess.run(None, feed)


def bench_models(names=None) -> None:
    from sparsecomp.testing import zoo

    print("\n### Dense models through TVM, batch 2 (zoo) / batch 1 seq 128 (MiniLM), 1 thread\n")
    print("| model | torch ms | ORT ms | TVM ms | TVM vs best(torch, ORT) | TVM kernels |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(1)
    names = names or [n for n in zoo.names() if not zoo.get(n).heavy] + ["minilm"]
    rows = [(name, *(minilm_case() if name == "minilm" else zoo.build(name))) for name in names]
    for name, model, args, kwargs in rows:
        with torch.no_grad():
            low = sparsecomp.lower(model, args, backend="tvm", example_kwargs=kwargs, num_threads=1)
            fns = {"torch": lambda: model(*args, **kwargs), "tvm": lambda: low(*args, **kwargs)}
            ort = ort_session(model, args, kwargs)
            if ort is not None:
                fns["ort"] = ort
            t = timeit_adaptive(fns)
        best = min(t["torch"], t.get("ort", float("inf")))
        print(f"| {name} | {t['torch'] * 1e3:.2f} | {t.get('ort', float('nan')) * 1e3:.2f} | "
              f"{t['tvm'] * 1e3:.2f} | {best / t['tvm']:.2f}x | {low.kernels} |", flush=True)


def minilm_case(seq_len=128):
    from sparsecomp.app.evaluate import load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES

    encoder = load_encoder()
    return encoder.model, encoder.inputs(BUILTIN_SENTENCES[0], seq_len=seq_len), {}


def bench_demo(ratios=(0.0, 0.25, 0.5, 0.75)) -> None:
    print("\n### Demo model (MiniLM, batch 1, seq 128) at each structured-pruning ratio, 1 thread\n")
    print("| ratio | torch ms | ORT ms | sparsecomp-TVM ms | TVM vs torch | TVM vs ORT |")
    print("|---|---|---|---|---|---|")
    torch.set_num_threads(1)
    enc, args, _ = minilm_case()
    for r in ratios:
        model = (sparsecomp.capture(enc, args).module if r == 0 else
                 sparsecomp.compress(enc, args, sparsecomp.StructuredPruning(ratio=r)))
        with torch.no_grad():
            low = sparsecomp.lower(model, args, backend="tvm", num_threads=1)
            fns = {"torch": lambda: model(*args), "tvm": lambda: low(*args)}
            ort = ort_session(model, args, {})
            if ort is not None:
                fns["ort"] = ort
            t = timeit_interleaved(fns, rounds=5, calls=5)
        print(f"| {r:g} | {t['torch'] * 1e3:.2f} | {t.get('ort', float('nan')) * 1e3:.2f} | "
              f"{t['tvm'] * 1e3:.2f} | {t['torch'] / t['tvm']:.2f}x | "
              f"{t.get('ort', float('nan')) / t['tvm']:.2f}x |", flush=True)


def bench_cold_read(sizes=(512 << 10, 1 << 20, 3 << 20), rounds: int = 7) -> None:
    """How close a plain cold read of a weight-sized buffer gets to the long-stream bandwidth, net of
    torch's per-call cost, on 4 KiB pages and on 2 MiB (transparent huge) pages."""
    print("\n### Cold read of one weight-sized buffer vs a 64 MiB stream, 1 thread\n")
    print("| size KiB | stream GB/s | torch per-call us | 4 KiB pages us | net GB/s | of stream | "
          "2 MiB pages us | net GB/s | of stream |")
    print("|---|---|---|---|---|---|---|---|---|")
    stream = torch.ones(16 << 20)  # 4 KiB pages, like any torch tensor
    for nb in sizes:
        n = copies_for(nb)
        small = _page_backed_copies(nb, n, False)
        huge = _page_backed_copies(nb, n, True)
        fns = {"4k": Rotating(lambda i: small[i].sum(), n), "2m": Rotating(lambda i: huge[i].sum(), n),
               "overhead": sum_overhead_candidate(), "stream": lambda: stream.sum()}
        t = timeit_interleaved(fns, rounds)
        bw = stream.numel() * 4 / t["stream"]
        cells = []
        for k in ("4k", "2m"):
            net = nb / (t[k] - t["overhead"])
            cells.append(f"{t[k] * 1e6:.1f} | {net / 1e9:.1f} | {net / bw:.2f}")
        print(f"| {nb >> 10} | {bw / 1e9:.1f} | {t['overhead'] * 1e6:.1f} | {' | '.join(cells)} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["sparse1", "batched", "models", "demo", "coldread"], action="append")
    ap.add_argument("--models", nargs="*",
                    help="zoo names (or minilm) for --only models (default: all light + minilm)")
    ap.add_argument("--sparsities", default="0.7,0.8,0.9,0.95",
                    help="batch-1 sparsities; 0.75 and 0.875 add N:M 1:4 / 1:8 rows")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="DRAM read bandwidth in GB/s for the bound (default: a 256 MiB 4-stream read "
                         "timed in each row's interleaved rounds)")
    ap.add_argument("--rounds", type=int, default=7,
                    help="interleaved rounds per sparse row (more: steadier medians on a shared machine)")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the process to one core (default: pinned, as `taskset -c` would)")
    ap.add_argument("--prefetch", choices=["host", "default", "recalibrate"], default="host",
                    help="sparse kernels' prefetch plan: this machine's calibrated one (calibrating first "
                         "if there is none; default), the uncalibrated default, or calibrate again")
    opts = ap.parse_args(argv)
    sections = opts.only or ["sparse1", "batched", "models", "demo"]
    torch.set_num_threads(1)
    set_threads(1)
    if not opts.no_pin and hasattr(os, "sched_setaffinity"):
        # every candidate runs on one thread: pinned, the scheduler does not move it (and its cache
        # and prefetcher state) between cores mid-run
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        print(f"pinned to core {core} (--no-pin: not)")
    print(f"host target: {host_target()}  (torch {torch.__version__}, tvm {tvm.__version__})")
    if {"sparse1", "batched"} & set(sections):
        if opts.prefetch == "default":
            PLAN[0] = kernels.DEFAULT_PLAN
        elif opts.prefetch == "recalibrate" or not calibrate.plan_path().exists():
            print("calibrating the sparse kernels' prefetch on this machine (backends/tvm/calibrate.py):")
            result = calibrate.calibrate(log=lambda msg: print("  " + msg, flush=True))
            print(result.table())
            PLAN[0] = result.plan
        else:
            PLAN[0] = calibrate.plan_for()
        print(f"sparse kernels' prefetch plan ({opts.prefetch}): {PLAN[0]}")
    if "sparse1" in sections:
        bench_sparse_batch1(opts.bandwidth * 1e9 if opts.bandwidth else None,
                            tuple(float(v) for v in opts.sparsities.split(",")), opts.rounds)
    if "coldread" in sections:
        bench_cold_read(rounds=opts.rounds)
    if "batched" in sections:
        bench_batched(rounds=opts.rounds)
    if "models" in sections:
        bench_models(opts.models)
    if "demo" in sections:
        bench_demo()


if __name__ == "__main__":
    main()
