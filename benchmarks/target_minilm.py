"""Compress all-MiniLM-L6-v2 to a measured speedup target on torch and ONNX Runtime (issue 24).

For every (backend, target) pair, :func:`sparsecomp.compress_to_target` searches the calibrated
structured pruning (FLAP fluctuation criterion, sensitivity-scaled global allocation over heads and MLP
neurons, least-squares reconstruction with residual targets; hidden size kept) for the most faithful model
whose speedup over the dense model, measured end to end on that backend (1 thread, batch 1, seq 128), is
at least the target. Fidelity: mean cosine of the sentence embeddings to the dense model's on the 48
``HELDOUT_SENTENCES`` (disjoint from the calibration corpus). Compressed models are shared between the
searches (same config -> same model), so the later searches pay only for the ratios not tried before.

Usage::

    python benchmarks/target_minilm.py                                  # torch and ort, targets 1.5 and 2
    python benchmarks/target_minilm.py --backends ort --targets 2 --calibration 384 --out bench_out/target
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import StructuredPruning, Target, TargetUnreachableError, compress_to_target
from sparsecomp.app.evaluate import cosines, embed, load_encoder
from sparsecomp.app.models import HELDOUT_SENTENCES

#: the single-method pruning curve on the same model and protocol (docs/BENCHMARKS.md, "Fidelity of
#: calibrated structured pruning on MiniLM": full 1204-sentence corpus, torch, measured speedup, cosine)
PRUNING_CURVE = ((1.30, 0.9761), (1.55, 0.9508), (2.12, 0.9062))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "ort"], choices=["torch", "ort", "tvm"])
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--calibration", type=int, default=384, help="first N corpus sentences (0: all 1204)")
    ap.add_argument("--max-tries", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per comparison")
    ap.add_argument("--out", default="bench_out/target_minilm", help="directory for JSON, tables and plots")
    ns = ap.parse_args(argv)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    encoder = load_encoder()
    enc = encoder.model
    captured = encoder.capture(seq_len=128)
    calibration = encoder.calibration(ns.calibration)
    n_sentences = sum(int(ids.shape[0]) for ids, _ in calibration)
    ev_ids, ev_mask = encoder.inputs(HELDOUT_SENTENCES, seq_len=128)
    reference = embed(enc, ev_ids, ev_mask)

    def cosine(module: torch.nn.Module) -> float:
        return float(cosines(embed(module, ev_ids, ev_mask), reference).mean())

    template = StructuredPruning(mac_ratio=0.1, criterion="fluctuation", allocation="sensitivity",
                                 reconstruct="all", residual=True)
    shared: dict = {}
    rows = []
    for backend in ns.backends:
        for speedup in ns.targets:
            target = Target(speedup=speedup, backend=backend, batch=1, threads=1, max_tries=ns.max_tries,
                            rounds=ns.rounds)
            t0 = time.perf_counter()
            print(f"=== {backend}, target {speedup:g}x ===", file=sys.stderr, flush=True)
            try:
                res = compress_to_target(captured, captured.example_args, target, calibration=calibration,
                                         template=template, fidelity=cosine, candidates=shared)
            except TargetUnreachableError as err:
                rows.append({"backend": backend, "target": speedup, "met": False, "error": str(err),
                             "points": err.points, "seconds": time.perf_counter() - t0})
                print(f"unreachable: {err}", file=sys.stderr, flush=True)
                continue
            name = f"{backend}_{speedup:g}x"
            res.plot(out / f"{name}.png")
            res.save_report(out / f"{name}.json")
            (out / f"{name}.md").write_text(res.table() + "\n\n" + res.layer_table() + "\n")
            c = res.chosen
            rows.append({"backend": backend, "target": speedup, "met": True, "mac_ratio": c.mac_ratio,
                         "round_to": c.round_to, "speedup": c.speedup, "remeasured_speedup": c.remeasured_speedup,
                         "cosine": c.fidelity, "output_error": c.output_error, "dense_ms": c.dense_ms,
                         "measured_ms": c.measured_ms, "predicted_ms": c.predicted_ms,
                         "prediction_errors": [p.prediction_error for p in res.points],
                         "tries": len(res.points), "seconds": time.perf_counter() - t0,
                         "round_to_measurement": (res.report["round_to_measurement"] or {}).get("summary")})
            print(res.table(), flush=True)
    total = time.perf_counter() - t_start
    print(f"\nwhole benchmark: {total:.0f} s; calibration {n_sentences} sentences; "
          f"{len(shared)} distinct compressions", flush=True)
    print("| backend | target | met | mac_ratio | round_to | measured speedup (re-measured) | held-out cosine | "
          "prediction errors | tries | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["met"]:
            print(f"| {r['backend']} | {r['target']:g}x | no | - | - | - | - | - | {len(r['points'])} | {r['seconds']:.0f} |")
            continue
        errs = ", ".join(f"{100 * e:+.0f} %" for e in r["prediction_errors"])
        print(f"| {r['backend']} | {r['target']:g}x | yes | {r['mac_ratio']:.3f} | {r['round_to']} | "
              f"{r['speedup']:.2f}x ({r['remeasured_speedup']:.2f}x) | {r['cosine']:.4f} | {errs} | {r['tries']} | "
              f"{r['seconds']:.0f} |")
    (out / "summary.json").write_text(json.dumps({"rows": rows, "seconds": total, "calibration": n_sentences,
                                                   "pruning_curve": PRUNING_CURVE}, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
