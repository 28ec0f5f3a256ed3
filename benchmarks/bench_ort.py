"""ONNX Runtime latency of compressed models, and how sparse linears are lowered to ONNX.

Part 1 (``--part models``): all-MiniLM-L6-v2 (bundled, offline) exported with
``sparsecomp.lower(..., backend="ort")`` dense, after ``StructuredPruning(ratio=r)`` for each ``--ratios``
and after ``LowRank(rank_ratio=--rank-ratio)``; every variant runs in ONNX Runtime with ``--threads``
intra-op threads, timed in interleaved rounds (``sparsecomp.app.metrics.measure_latencies``), so the ratios
to ORT dense are comparable within the run. Each variant's output is checked against torch.

Part 2 (``--part layers``): for one ``--shape`` linear (default 3072x768, the MiniLM/BERT FFN size) with
unstructured sparsity, 16x1 blocks (``--sparsity`` levels) and 2:4, at each ``--batch``, the form
``export_onnx`` picks (``sparsecomp.backends.onnx.choose_sparse_linear``), the timings of every candidate
and why.

Usage::

    python benchmarks/bench_ort.py                       # both parts, ~3 min on 2 busy cores
    python benchmarks/bench_ort.py --part layers --batch 1 8 --sparsity 0.5 0.7 0.9 0.95
    python benchmarks/bench_ort.py --part models --ratios 0.5 --out bench_out/ort.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp.backends.onnx import choose_sparse_linear, format_timings  # noqa: E402
from sparsecomp.app.metrics import count_params, markdown_table, measure_latencies  # noqa: E402


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    return ((ref - got).abs().max() / ref.abs().max()).item()


def bench_models(args) -> tuple[str, list[dict]]:
    from sparsecomp.app.evaluate import load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES

    encoder = load_encoder()
    model = encoder.model
    sentences = [BUILTIN_SENTENCES[i % len(BUILTIN_SENTENCES)] for i in range(args.model_batch)]
    inputs = encoder.inputs(sentences, seq_len=args.seq)
    calib = encoder.inputs(BUILTIN_SENTENCES[:8], seq_len=args.seq)

    variants = {"dense": model}
    for r in args.ratios:
        variants[f"StructuredPruning {r}"] = sparsecomp.compress(
            model, calib, sparsecomp.StructuredPruning(ratio=r))
    variants[f"LowRank rank_ratio={args.rank_ratio}"] = sparsecomp.compress(
        model, calib, sparsecomp.LowRank(rank_ratio=args.rank_ratio))
    if args.sparsify and hasattr(sparsecomp, "Sparsify"):  # sparse linears, lowered by export_onnx
        variants["Sparsify 16x1 blocks 0.9"] = sparsecomp.compress(
            model, calib, sparsecomp.Sparsify(sparsity=0.9, pattern="block", block=(16, 1), cost_model="always"))

    lowered, errors = {}, {}
    for name, m in variants.items():
        lowered[name] = sparsecomp.lower(m, inputs, backend="ort", num_threads=args.threads)
        with torch.no_grad():
            errors[name] = _rel_err(m(*inputs), lowered[name](*inputs))
    stats = measure_latencies(lowered, inputs, threads=args.threads, rounds=args.rounds, min_time=args.min_time)
    dense = stats["dense"].median_ms
    rows, body = [], []
    for name, s in stats.items():
        row = {"variant": name, "params": count_params(variants[name]), "ort_ms": round(s.median_ms, 3),
               "p10_ms": round(s.p10_ms, 3), "p90_ms": round(s.p90_ms, 3),
               "speedup_vs_ort_dense": round(dense / s.median_ms, 3), "max_rel_err_vs_torch": errors[name]}
        rows.append(row)
        body.append([name, f"{row['params'] / 1e6:.2f}M", f"{s.median_ms:.2f} ({s.p10_ms:.2f}-{s.p90_ms:.2f})",
                     f"{row['speedup_vs_ort_dense']:.2f}x", f"{errors[name]:.1e}"])
    title = (f"MiniLM in ONNX Runtime, batch {args.model_batch} x {args.seq} tokens, {args.threads} thread(s), "
             f"{args.rounds} interleaved rounds")
    table = markdown_table(["variant", "params", "ORT ms (p10-p90)", "speedup vs ORT dense",
                            "max rel err vs torch"], body, text_columns=1)
    return f"{title}\n\n{table}", rows


def _patterns(out_f: int, in_f: int, sparsities):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=gen)
    for s in sparsities:
        yield "unstructured", "csr", (1, 1), s, w * (torch.rand(out_f, in_f, generator=gen) >= s)
    for s in sparsities:
        keep = torch.rand(out_f // 16, 1, in_f, generator=gen) >= s
        yield "block 16x1", "bsr", (16, 1), s, (w.view(out_f // 16, 16, in_f) * keep).view(out_f, in_f)
    g = w.view(out_f, in_f // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    yield "2:4", "nm", (1, 1), 0.5, (g * keep).view(out_f, in_f)


def bench_layers(args) -> tuple[str, list[dict]]:
    out_f, in_f = args.shape
    rows, body = [], []
    for pattern, fmt, block, s, w in _patterns(out_f, in_f, args.sparsity):
        for b in args.batch:
            c = choose_sparse_linear(w, torch.zeros(out_f), format=fmt, block=block, rows=b,
                                     num_threads=args.threads, budget_ms=args.layer_budget_ms,
                                     layer=f"{out_f}x{in_f}")
            rows.append({"pattern": pattern, "sparsity": s, "batch": b, **c.to_dict()})
            body.append([pattern, f"{s:.0%}", str(b), c.representation, c.storage,
                         format_timings(c), c.reason])
    title = (f"Sparse {out_f}x{in_f} linear in ONNX Runtime: the form export_onnx chooses "
             f"({args.threads} thread(s), median us per call)")
    table = markdown_table(["pattern", "sparsity", "batch", "chosen", "storage", "timings (us)", "why"], body,
                           text_columns=7)
    return f"{title}\n\n{table}", rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["models", "layers", "all"], default="all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--rank-ratio", type=float, default=0.5)
    p.add_argument("--model-batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--no-sparsify", dest="sparsify", action="store_false",
                   help="skip the MiniLM variant with 90%%-sparse 16x1-block linears (Sparsify pass)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--shape", type=int, nargs=2, default=[3072, 768], metavar=("OUT", "IN"))
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--layer-budget-ms", type=float, default=30.0, help="timing budget per candidate form")
    p.add_argument("--out", type=str, default=None, help="write results as JSON here")
    args = p.parse_args(argv)

    result = {"settings": vars(args), "torch": torch.__version__, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    try:
        import onnxruntime

        result["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        raise SystemExit("bench_ort.py needs onnxruntime: pip install 'sparsecomp[onnx]'")
    if args.part in ("models", "all"):
        text, result["models"] = bench_models(args)
        print(text, end="\n\n", flush=True)
    if args.part in ("layers", "all"):
        text, result["layers"] = bench_layers(args)
        print(text, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
