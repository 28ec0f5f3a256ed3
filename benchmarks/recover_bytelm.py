"""Recover on the small byte-level Llama (``sparsecomp.testing.bytelm``): held-out perplexity dense / after the
refit / after recovery.

The LM is compressed with calibrated structured pruning (``--ratio`` of the MACs, fluctuation, sensitivity
allocation, refit of every linear) on windows of its training split, then ``Recover`` distils it from the
dense LM on the same windows (KL on the logits, no labels used). Perplexity: per byte, on held-out windows.

Usage::

    python benchmarks/recover_bytelm.py --ratio 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import Recover, StructuredPruning
from sparsecomp.passes.base import PassContext, run_pass
from sparsecomp.testing import bytelm


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--windows", type=int, default=128, help="calibration windows of --seq bytes")
    ap.add_argument("--epochs", type=float, default=6)
    ap.add_argument("--block-epochs", type=float, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--budget", type=float, default=None)
    ns = ap.parse_args(argv)
    lm = bytelm.Logits(bytelm.load_or_train(ns.size)).eval()
    calibration = bytelm.calibration_batches(ns.windows, ns.seq, batch=8)
    example = (calibration[0][0][:2],)
    cap = sparsecomp.capture(lm, example)
    ppl = lambda m: bytelm.perplexity(m, "heldout", seq_len=ns.seq, max_windows=64)  # noqa: E731
    print(f"dense: held-out perplexity {ppl(cap.module):.3f}", flush=True)
    prune = StructuredPruning(mac_ratio=ns.ratio, criterion="fluctuation", allocation="sensitivity", reconstruct="all",
                              residual=True)
    t0 = time.perf_counter()
    refit = run_pass(cap, prune, calibration).captured
    print(f"refit ({ns.ratio} of MACs, {time.perf_counter() - t0:.0f} s): perplexity {ppl(refit.module):.3f}", flush=True)
    cfg = Recover(block_epochs=ns.block_epochs, epochs=ns.epochs, lr=ns.lr, output_loss="kl", batch_size=8,
                  budget_s=ns.budget, token_mask=None)
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_pass(refit, cfg, calibration, PassContext(original=cap))
    print(f"recovered ({time.perf_counter() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU): perplexity "
          f"{ppl(res.captured.module):.3f}; " + "; ".join(f"{p['phase']}: {p.get('val_loss', p.get('skipped'))}"
                                                         for p in res.report), flush=True)


if __name__ == "__main__":
    main()
