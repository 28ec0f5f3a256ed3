"""Time and memory of compressing a Hugging Face causal LM shape (random weights) at real size.

Stages: capture (torch.export), dependency graph, StructuredPruning(ratio=...) with calibration
(``--calib N L``: N random sequences of L tokens, one batch) and reconstruction; prints the time of each
stage, the peak resident memory (sampled every 20 ms) and writes a JSON report with ``--out``.

    python benchmarks/lm_scale.py --shape 125m --calib 64 128
    python benchmarks/lm_scale.py --shape 1.1b --calib 64 128 --out docs/lm_scale_1.1b.json

Shapes (``sparsecomp.testing.llama.SHAPES``): ``125m`` (12 layers, hidden 768, GQA 12/4, MLP 2048,
vocab 32k), ``160m`` (as 125m with MLP 3072), ``1.1b`` (TinyLlama: 22 layers, hidden 2048, GQA 32/4, MLP
5632, vocab 32k), ``mid`` (20M, the test suite's memory bound).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="125m", help="125m, 160m, 1.1b or mid")
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--calib", type=int, nargs=2, default=(64, 128), metavar=("N", "L"))
    ap.add_argument("--no-calib", action="store_true", help="data-free pruning (no calibration, no refit)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sparsecomp
    from sparsecomp.testing.llama import PeakRSS, build

    times: dict[str, float] = {}
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        model = build(args.shape)
        n_params = sum(p.numel() for p in model.parameters())
        times["build model"] = time.perf_counter() - t0
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        t = time.perf_counter()
        cap = sparsecomp.capture(model, (ids,))
        times["capture"] = time.perf_counter() - t
        t = time.perf_counter()
        dg = sparsecomp.dependency_graph(cap)
        times["dependency graph"] = time.perf_counter() - t
        n_groups = len(dg.prunable_groups())
        del dg
        calib = None
        if not args.no_calib:
            n, length = args.calib
            calib = torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(1))
        t = time.perf_counter()
        out = sparsecomp.compress(cap, None, sparsecomp.StructuredPruning(ratio=args.ratio, progress=not args.quiet),
                                  calibration=calib)
        times["StructuredPruning"] = time.perf_counter() - t
    total = sum(v for k, v in times.items() if k != "build model")
    kept = sum(p.numel() for p in out.parameters())
    row = {"shape": args.shape, "params": n_params, "params_after": kept, "groups": n_groups,
           "ratio": args.ratio, "calibration": None if args.no_calib else list(args.calib),
           "threads": torch.get_num_threads(), "seconds": {k: round(v, 1) for k, v in times.items()},
           "total_s": round(total, 1), "peak_rss_gb": round(peak.peak / 2**30, 2),
           "report": {k: v for k, v in out.sparsecomp_report[-1].items() if k in ("output_error", "time")}}
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
