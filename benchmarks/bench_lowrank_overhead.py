"""Measure the cost model constants of ``LowRank``: one dense op vs the factored pair, on this CPU.

``LowRank`` leaves a layer dense unless the factored pair is predicted to be faster (see
``sparsecomp/passes/lowrank/factor.py``, ``factored_is_faster``). Its model of the time of one op is
``t = a * MACs + b`` at one thread, for both the dense op and each of the two factored ops, with a
separate slope for the thin factored matmuls/convs (``a_f = kappa * a``: thin GEMMs run below peak).
So factoring pays when::

    kappa * MACs_factored + overhead < MACs_dense,        overhead = b / a  (MAC-equivalents)

This script times dense ops and factored pairs over a grid of shapes, interleaved (each round times every
candidate once, medians over rounds), fits ``t = a*MACs_dense + a_f*MACs_factored + b*n_ops`` by least
squares, separately for ``linear`` and for ``conv2d``, and prints ``kappa = a_f / a`` and ``b / a``.
Those are the constants ``_COST`` in ``passes/lowrank/factor.py``; re-run it on the deployment CPU to re-derive them::

    python benchmarks/bench_lowrank_overhead.py            # ~1-2 minutes, 1 thread
    python benchmarks/bench_lowrank_overhead.py --quick    # smaller grid
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def _time(fn, min_time: float) -> float:
    """Seconds per call: best of 3 runs of enough iterations to last ``min_time``."""
    fn()
    n, t = 1, 0.0
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t = time.perf_counter() - t0
        if t >= min_time:
            break
        n *= 2
    best = t / n
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def linear_cases(quick: bool):
    rows = (1, 16, 128) if quick else (1, 8, 32, 128, 256)
    shapes = ((64, 64), (384, 384), (1536, 384)) if quick else ((64, 64), (128, 256), (384, 384), (1536, 384), (384, 1536))
    for t in rows:
        for m, n in shapes:
            x = torch.randn(t, n)
            w = torch.randn(m, n)
            bias = torch.randn(m)
            yield f"linear T={t} {m}x{n} dense", (lambda x=x, w=w, bias=bias: F.linear(x, w, bias)), t * m * n, 0, 1
            for frac in (0.05, 0.15, 0.35):
                r = max(2, int(frac * min(m, n)))
                a = torch.randn(r, n)
                b = torch.randn(m, r)
                yield (f"linear T={t} {m}x{n} r={r}",
                       (lambda x=x, a=a, b=b, bias=bias: F.linear(F.linear(x, a), b, bias)),
                       0, t * r * (m + n), 2)


def conv_cases(quick: bool):
    sizes = ((8, 64), (28, 64)) if quick else ((8, 64), (14, 128), (28, 64), (56, 32))
    for hw, c in sizes:
        for k in (1, 3):
            x = torch.randn(1, c, hw, hw)
            w = torch.randn(c, c, k, k)
            bias = torch.randn(c)
            pad = k // 2
            L = hw * hw
            yield f"conv {c}ch {hw}x{hw} k{k} dense", (lambda x=x, w=w, bias=bias, pad=pad: F.conv2d(x, w, bias, 1, pad)), L * c * c * k * k, 0, 1
            for frac in (0.1, 0.3):
                r = max(2, int(frac * c))
                a = torch.randn(r, c, k, k)
                b = torch.randn(c, r, 1, 1)
                yield (f"conv {c}ch {hw}x{hw} k{k} r={r}",
                       (lambda x=x, a=a, b=b, bias=bias, pad=pad: F.conv2d(F.conv2d(x, a, None, 1, pad), b, bias)),
                       0, L * r * (c * k * k + c), 2)


def fit(cases, rounds: int, min_time: float) -> dict[str, float]:
    cases = list(cases)
    samples: dict[str, list[float]] = {name: [] for name, *_ in cases}
    with torch.no_grad():
        for _ in range(rounds):  # interleaved: every candidate once per round
            for name, fn, *_ in cases:
                samples[name].append(_time(fn, min_time))
    X = torch.tensor([[float(md), float(mf), float(ops)] for _, _, md, mf, ops in cases], dtype=torch.float64)
    y = torch.tensor([statistics.median(samples[name]) for name, *_ in cases], dtype=torch.float64)
    # relative least squares: weight each case by 1/t so small and large ops count alike
    wts = 1.0 / y
    coef = torch.linalg.lstsq(X * wts[:, None], (y * wts)[:, None]).solution.flatten()
    a, a_f, b = (float(v) for v in coef)
    pred = X @ coef
    rel = ((pred - y).abs() / y)
    return {"a_ns_per_mac": a * 1e9, "kappa": a_f / a, "overhead_macs": b / a, "overhead_us": b * 1e6,
            "median_rel_fit_error": float(rel.median()), "cases": len(cases)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=1)
    ns = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(ns.threads)
    print(f"torch {torch.__version__}, {ns.threads} thread(s)")
    print("| op | a (ns/MAC) | kappa = a_f/a | overhead b/a (MACs) | b (us) | median rel. fit error | cases |")
    print("|---|---|---|---|---|---|---|")
    for label, cases in (("linear", linear_cases(ns.quick)), ("conv2d", conv_cases(ns.quick))):
        r = fit(cases, ns.rounds, ns.min_time)
        print(f"| {label} | {r['a_ns_per_mac']:.4f} | {r['kappa']:.2f} | {r['overhead_macs']:.3g} | "
              f"{r['overhead_us']:.2f} | {r['median_rel_fit_error']:.2f} | {r['cases']} |")


if __name__ == "__main__":
    main()
