"""Held-out perplexity vs measured speedup on the trained byte-level Llama (sparsecomp.testing.bytelm):
slicing alone, slicing + refit, structured pruning alone, and slicing + pruning + reconstruction.

All variants are captured from the same ``ids -> logits`` module at batch 1, seq 128 and timed side by side
in one interleaved run (torch, 1 thread, batch 1, seq 128; ratios are what counts on a shared machine).
Calibration: 32 batches of 4 x 128 bytes of the training split; perplexity: 64 windows of 128 bytes of
the held-out split.

    python benchmarks/slice_bytelm.py                    # the default curve (~15 min on a busy 2-core box)
    python benchmarks/slice_bytelm.py --slice 0.25 --prune --out bench_out/slice_bytelm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import Slice, StructuredPruning
from sparsecomp.app.metrics import count_macs, count_params, markdown_table, measure_latencies
from sparsecomp.testing import bytelm


def prune_cfg(ratio: float) -> StructuredPruning:
    return StructuredPruning(mac_ratio=ratio, criterion="fluctuation", allocation="global", reconstruct="all",
                             residual=True, round_to=8)


def variants(ns) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in ns.slice:
        out[f"slice {r:.2f}"] = [Slice(ratio=r)]
        if ns.refit:
            out[f"slice {r:.2f} + refit"] = [Slice(ratio=r, reconstruct=True)]
    if ns.prune:
        for p in ns.prune_ratios:
            out[f"prune {p:.2f}"] = [prune_cfg(p)]
        for r in ns.combo_slice:
            for p in ns.combo_prune:
                out[f"slice {r:.2f} + refit + prune {p:.2f}"] = [Slice(ratio=r, reconstruct=True), prune_cfg(p)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(bytelm.SIZES))
    ap.add_argument("--slice", type=float, nargs="*", default=[0.0, 0.1, 0.25, 0.4, 0.5])
    ap.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prune", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--prune-ratios", type=float, nargs="*", default=[0.2, 0.35, 0.5])
    ap.add_argument("--combo-slice", type=float, nargs="*", default=[0.25])
    ap.add_argument("--combo-prune", type=float, nargs="*", default=[0.2, 0.35])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads for compression (timing is 1 thread)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)

    seq = 128
    lm = bytelm.load_or_train(ns.size)
    model = bytelm.Logits(lm).eval()
    example = bytelm.calibration_batches(1, seq, batch=1, seed=99)[0]
    calib = bytelm.calibration_batches(ns.calib, seq, batch=4)
    captured = sparsecomp.capture(model, example)
    models = {"dense": captured.module}
    info: dict[str, dict] = {}
    for name, cfgs in variants(ns).items():
        t0 = time.time()
        models[name] = sparsecomp.compress(captured, example, cfgs, calibration=calib)
        info[name] = {"compress_s": time.time() - t0}
        print(f"{name}: compressed in {info[name]['compress_s']:.0f} s", flush=True)

    lat = measure_latencies(models, example, threads=1, rounds=ns.rounds, min_time=0.3)
    dense_ms = lat["dense"].median_ms
    dense_macs = count_macs(captured.module, example)
    rows, records = [], []
    for name, module in models.items():
        ppl = bytelm.perplexity(module, "heldout", seq_len=seq)
        ms = lat[name].median_ms
        macs = count_macs(module, example)
        rec = {"variant": name, "heldout_ppl": ppl, "ms": ms, "speedup": dense_ms / ms,
               "macs_ratio": macs / dense_macs, "params": count_params(module), **info.get(name, {})}
        records.append(rec)
        rows.append([name, f"{ppl:.3f}", f"{ms:.2f}", f"{dense_ms / ms:.2f}x", f"{macs / dense_macs:.2f}",
                     f"{rec['params'] / 1e6:.2f}M"])
    print(f"\nbytelm[{ns.size}] held-out perplexity vs speedup (torch, 1 thread, batch 1, seq {seq})\n")
    print(markdown_table(["variant", "held-out ppl", "ms", "speedup", "MACs", "params"], rows, text_columns=1))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
