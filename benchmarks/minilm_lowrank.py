"""Low-rank all-MiniLM-L6-v2: embedding fidelity, size and latency per method x budget x allocation.

For every ``LowRank(param_ratio=b, method=m, allocation=a)`` this script compresses the real MiniLM
(bundled, offline) calibrated on ``BUILTIN_SENTENCES`` and reports, on ``HELDOUT_SENTENCES``:

* mean (and min) cosine similarity of the sentence embeddings to the dense model's;
* relative error ``||E - E_dense||_F / ||E_dense||_F`` of the embedding matrix;
* parameters of the whole model, and how many of the 36 encoder linears were factored;
* single-thread latency at batch 1, seq 128, as a ratio to the dense captured graph, measured in
  interleaved rounds with the dense baseline of the same budget (``sparsecomp.app.metrics.measure_latencies``).

The model is captured once with dynamic batch and sequence dims, so calibration and evaluation run on
short padded batches (seq 32: the sentences are short; long padding would flood the calibration Gram
matrices with pad-token activations) while latency is measured at seq 128.

Usage::

    python benchmarks/minilm_lowrank.py                                   # 3 methods x 3 budgets x 2
    python benchmarks/minilm_lowrank.py --budgets 0.5 --methods svd activation --allocations uniform
    python benchmarks/minilm_lowrank.py --no-cost-model                   # factor even where not faster
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp.app.metrics import count_params, markdown_table, measure_latencies


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "activation"])
    p.add_argument("--allocations", nargs="+", default=["uniform", "global"])
    p.add_argument("--no-cost-model", action="store_true", help="LowRank(cost_model='always')")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for the latency")
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    p.add_argument("--calib-seq", type=int, default=32)
    p.add_argument("--latency-seq", type=int, default=128)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    from torch.export import Dim

    from sparsecomp.app.evaluate import cosines, load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES, HELDOUT_SENTENCES, sentence_embeddings

    torch.set_num_threads(ns.threads)  # the factorizations too: on a shared host more threads only thrash
    encoder = load_encoder()
    model = encoder.model
    calib = encoder.inputs(BUILTIN_SENTENCES, seq_len=ns.calib_seq)
    evaluation = encoder.inputs(HELDOUT_SENTENCES, seq_len=ns.calib_seq)
    latency_in = encoder.inputs(BUILTIN_SENTENCES[0], seq_len=ns.latency_seq)
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=512)
    captured = sparsecomp.capture(model, calib, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    with torch.no_grad():
        ref = sentence_embeddings(captured.module(*evaluation), evaluation[1])
    dense_params = count_params(captured.module)

    rows = []
    for budget in ns.budgets:
        models = {"dense": captured.module}
        stats = {}
        for alloc in ns.allocations:
            for method in ns.methods:
                cfg = sparsecomp.LowRank(param_ratio=budget, method=method, allocation=alloc,
                                         cost_model=not ns.no_cost_model)
                t0 = time.perf_counter()
                out = sparsecomp.compress(captured, None, cfg, calibration=[calib])
                seconds = time.perf_counter() - t0
                with torch.no_grad():
                    emb = sentence_embeddings(out(*evaluation), evaluation[1])
                cos = cosines(emb, ref)
                layers = out.sparsecomp_report[0]["layers"]
                key = f"{method}/{alloc}"
                models[key] = out
                stats[key] = dict(
                    method=method, alloc=alloc, cos=float(cos.mean()), cos_min=float(cos.min()),
                    rel=float((emb - ref).norm() / ref.norm()), params=count_params(out),
                    factored=sum(1 for r in layers if "skipped" not in r), layers=len(layers), seconds=seconds,
                )
                _log(f"budget {budget} {key}: cos {stats[key]['cos']:.4f}, {stats[key]['factored']} factored, "
                     f"{seconds:.0f}s")
        lat = measure_latencies(models, latency_in, threads=ns.threads, rounds=ns.rounds, repeats=10,
                                min_time=0.3)
        for key, s in stats.items():
            rows.append([s["method"], s["alloc"], f"{budget:g}", f"{s['cos']:.4f}", f"{s['cos_min']:.4f}",
                         f"{s['rel']:.4f}", f"{s['params'] / 1e6:.2f}M ({s['params'] / dense_params:.2f})",
                         f"{s['factored']}/{s['layers']}",
                         f"{lat[key].median_ms / lat['dense'].median_ms:.2f}", f"{s['seconds']:.0f}"])

    print(f"all-MiniLM-L6-v2, torch {torch.__version__}, {platform.machine()}, {ns.threads} thread(s); "
          f"calibration {len(BUILTIN_SENTENCES)} sentences (seq {ns.calib_seq}), evaluation "
          f"{len(HELDOUT_SENTENCES)} held-out sentences; latency batch 1 seq {ns.latency_seq}; "
          f"cost model {'off' if ns.no_cost_model else 'on'}; dense {dense_params / 1e6:.2f}M params\n")
    print(markdown_table(
        ["method", "allocation", "param_ratio", "mean cos", "min cos", "rel. error", "params (of dense)",
         "factored", "latency / dense", "compress s"],
        rows, text_columns=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
