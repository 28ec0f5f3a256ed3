"""Latency of the ``sparsecomp::sparse_linear_*`` operators vs dense and reference kernels.

For each weight shape ``[out, in]`` (default ``3072x768`` and ``768x3072``, the
BERT-base FFN pair), batch size and sparsity, the script times::

    dense                  F.linear(x, W, b)              (W dense, zeros included)
    ours csr               sparsecomp::sparse_linear_csr  (unstructured mask)
    torch csr F.linear     F.linear(x, Wc, b),  Wc = W.to_sparse_csr()  (torch's own CSR)
    torch csr W@x.T        (Wc @ x.T).T + b
    scipy csr              (scipy.sparse.csr_matrix(W) @ x.T).T + b  (if scipy imports)
    ours bsr RxC           sparsecomp::sparse_linear_bsr  (block mask, one per --blocks)
    torch bsr RxC F.linear F.linear(x, Wb, b),  Wb = W.to_sparse_bsr((R, C)); square
                           blocks only (torch's MKL path rejects non-square blocks)
    torch bsr RxC W@x.T    (Wb @ x.T).T + b
    ours nm N:M            sparsecomp::sparse_linear_nm   (sparsity is fixed at 1 - N/M;
                           that column is added if --sparsity lacks it)

Every sparse result is checked against the dense one.  Each cell shows the
median latency in microseconds and, in parentheses, ``latency / dense latency``
(below 1.00 means faster than dense).  Timings use ``torch.set_num_threads``,
warm-up calls and the median over ``--repeats`` repeats of >= ~1 ms each; every
kernel is timed interleaved with the dense baseline (one repeat of each in
turn), and the ratio uses that paired dense median, so background load
drifting during the run does not skew it.  The ``dense`` row shows the median
of the paired dense medians of its column.

Example::

    python benchmarks/bench_sparse_ops.py --threads 1 --batch 1 8 --sparsity 0.5 0.7 0.9 0.95
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

try:
    import sparsecomp.ops  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparsecomp.ops import pack_bsr, pack_csr, pack_nm, packed_linear  # noqa: E402

import numpy as np

try:
    import scipy.sparse as scipy_sparse
except ImportError:  # scipy is optional
    scipy_sparse = None


def _parse_pair(text: str, sep: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split(sep))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A{sep}B, got {text!r}") from None
    return a, b


def parse_args(argv=None) -> argparse.Namespace:
    """Parse command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument(
        "--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95], help="zero fractions"
    )
    p.add_argument(
        "--shapes",
        type=lambda s: _parse_pair(s, "x"),
        nargs="+",
        default=[(3072, 768), (768, 3072)],
        help="weight shapes OUTxIN",
    )
    p.add_argument(
        "--blocks",
        type=lambda s: _parse_pair(s, "x"),
        nargs="+",
        default=[(16, 1), (1, 16), (4, 4), (8, 8)],
        help="BSR block shapes RxC",
    )
    p.add_argument(
        "--nm", type=lambda s: _parse_pair(s, ":"), nargs="*", default=[(2, 4)], help="N:M patterns"
    )
    p.add_argument("--warmup", type=int, default=10, help="warm-up calls per kernel")
    p.add_argument("--repeats", type=int, default=31, help="timed repeats (median reported)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _calibrate(fn: Callable[[], object], warmup: int) -> int:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    return max(1, min(100, math.ceil(1e-3 / max(single, 1e-9))))


def _sample(fn: Callable[[], object], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_pair(
    fn: Callable[[], object], ref: Callable[[], object], warmup: int, repeats: int
) -> tuple[float, float]:
    """Median latencies (us) of ``fn`` and ``ref``, measured interleaved.

    Each repeat times ``fn`` then ``ref`` (each for >= ~1 ms of back-to-back
    calls), so both medians see the same machine state and their ratio is
    robust to background load drifting during the run.
    """
    inner_fn, inner_ref = _calibrate(fn, warmup), _calibrate(ref, warmup)
    a, b = [], []
    for _ in range(repeats):
        a.append(_sample(fn, inner_fn))
        b.append(_sample(ref, inner_ref))
    return statistics.median(a) * 1e6, statistics.median(b) * 1e6


def unstructured(shape, sparsity, gen) -> torch.Tensor:
    """Random weight with a uniformly random ``sparsity`` fraction of exact zeros."""
    w = torch.randn(shape, generator=gen)
    k = round(sparsity * w.numel())
    drop = torch.randperm(w.numel(), generator=gen)[:k]
    w.view(-1)[drop] = 0.0
    return w


def block_sparse(shape, sparsity, block, gen) -> torch.Tensor:
    """Random weight with a ``sparsity`` fraction of its ``block``-shaped tiles zeroed."""
    (out_f, in_f), (r, c) = shape, block
    nbr, nbc = out_f // r, in_f // c
    keep = torch.ones(nbr * nbc)
    keep[torch.randperm(nbr * nbc, generator=gen)[: round(sparsity * nbr * nbc)]] = 0.0
    mask = keep.view(nbr, 1, nbc, 1).expand(nbr, r, nbc, c).reshape(out_f, in_f)
    return torch.randn(shape, generator=gen) * mask


def nm_sparse(shape, n, m, gen) -> torch.Tensor:
    """Random weight keeping the ``n`` largest-magnitude entries of every group of ``m`` inputs."""
    out_f, in_f = shape
    w = torch.randn(shape, generator=gen).view(out_f, in_f // m, m)
    top = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, top, w.gather(-1, top)).view(out_f, in_f)


def main(argv=None) -> None:
    """Run the benchmark and print the tables."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    gen = torch.Generator().manual_seed(args.seed)
    sparsities = list(args.sparsity)
    columns = sorted(set(sparsities) | {round(1.0 - n / m, 6) for n, m in args.nm})
    print(
        f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
        f"mkl={torch.backends.mkl.is_available()}, "
        f"scipy={'yes' if scipy_sparse is not None else 'no'}, "
        f"warmup={args.warmup}, repeats={args.repeats} (median)"
    )
    print(
        "cell = median latency us (latency / paired dense latency); '-' = not applicable\n"
    )

    for shape in args.shapes:
        out_f, in_f = shape
        storage: dict[str, dict[float, float]] = {"dense": {}}
        for batch in args.batch:
            x = torch.randn(batch, in_f, generator=gen)
            bias = torch.randn(out_f, generator=gen)
            x_np = x.numpy()
            bias_np = bias.numpy()
            table: dict[str, dict[float, tuple[float, float]]] = {}

            dense_samples: dict[float, list[float]] = {}

            def record(label, s, fn, ref, dense_fn, size=None):
                got = fn()
                if not isinstance(got, torch.Tensor):
                    got = torch.from_numpy(np.ascontiguousarray(got))
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3, msg=label)
                us, dense_us = time_pair(fn, dense_fn, args.warmup, args.repeats)
                table.setdefault(label, {})[s] = (us, us / dense_us)
                dense_samples.setdefault(s, []).append(dense_us)
                if size is not None:
                    storage.setdefault(label, {})[s] = size

            for s in sparsities:
                w = unstructured(shape, s, gen)
                ref = F.linear(x, w, bias)
                w_dense = w.clone()

                def dense_fn():  # dense baseline, timed interleaved with every kernel
                    return F.linear(x, w_dense, bias)

                table.setdefault("dense", {})

                csr = pack_csr(w)
                record(
                    "ours csr", s, lambda: packed_linear(x, csr, bias), ref, dense_fn, csr.nbytes
                )
                w_csr = w.to_sparse_csr()
                record("torch csr F.linear", s, lambda: F.linear(x, w_csr, bias), ref, dense_fn)
                record("torch csr W@x.T", s, lambda: (w_csr @ x.t()).t() + bias, ref, dense_fn)
                if scipy_sparse is not None:
                    sp = scipy_sparse.csr_matrix(w.numpy())
                    record("scipy csr", s, lambda: (sp @ x_np.T).T + bias_np, ref, dense_fn)

                for blk in args.blocks:
                    r, c = blk
                    if out_f % r or in_f % c:
                        continue
                    wb = block_sparse(shape, s, blk, gen)
                    ref_b = F.linear(x, wb, bias)
                    bsr = pack_bsr(wb, blk)
                    record(
                        f"ours bsr {r}x{c}",
                        s,
                        lambda: packed_linear(x, bsr, bias),
                        ref_b,
                        dense_fn,
                        bsr.nbytes,
                    )
                    if r == c:
                        w_bsr = wb.to_sparse_bsr(blk)
                        record(
                            f"torch bsr {r}x{c} F.linear",
                            s,
                            lambda: F.linear(x, w_bsr, bias),
                            ref_b,
                            dense_fn,
                        )
                        record(
                            f"torch bsr {r}x{c} W@x.T",
                            s,
                            lambda: (w_bsr @ x.t()).t() + bias,
                            ref_b,
                            dense_fn,
                        )

            for n, m in args.nm:
                if in_f % m:
                    continue
                s = round(1.0 - n / m, 6)
                wn = nm_sparse(shape, n, m, gen)
                nm = pack_nm(wn, n, m)
                w_dense = wn.clone()

                def dense_fn():
                    return F.linear(x, w_dense, bias)

                record(
                    f"ours nm {n}:{m}",
                    s,
                    lambda: packed_linear(x, nm, bias),
                    F.linear(x, wn, bias),
                    dense_fn,
                    nm.nbytes,
                )

            for s, samples in dense_samples.items():
                table["dense"][s] = (statistics.median(samples), 1.0)
                storage["dense"][s] = out_f * in_f * 4
            print(f"== W {out_f}x{in_f}, batch {batch} ==")
            _print_table(table, columns, lambda v: f"{v[0]:.0f} ({v[1]:.2f})")
            print()

        print(f"== storage of W {out_f}x{in_f} (MB, compressed buffers, fp32 values) ==")
        _print_table(storage, columns, lambda v: f"{v / 2**20:.2f}")
        print()


def _print_table(table, sparsities, fmt) -> None:
    head = ["impl \\ sparsity"] + [f"{s:g}" for s in sparsities]
    rows = [
        [label] + [fmt(cells[s]) if s in cells else "-" for s in sparsities]
        for label, cells in table.items()
    ]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        cells = [v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))]
        return "| " + " | ".join(cells) + " |"

    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
