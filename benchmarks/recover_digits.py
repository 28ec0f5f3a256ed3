"""Recover on the digits CNN: top-1 accuracy dense / after the refit / after recovery.

The CNN and its training are ``sparsecomp.testing.digits`` (tests/test_digits.py uses the same: scikit-learn's
8x8 digits, seed 0, 1400 training images); compression removes ``--ratio`` of the MACs (global allocation, fluctuation) with or without the refit,
then ``Recover`` distils it from the dense CNN on the training images *without their labels* (KL on the
logits). Accuracy is measured on the 397 test images.

Usage::

    python benchmarks/recover_digits.py --ratio 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import Recover, StructuredPruning
from sparsecomp.testing.digits import accuracy, trained_digits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=float, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ns = ap.parse_args(argv)
    model, x_train, x_test, y_test = trained_digits()
    calibration = [x_train[i:i + 100] for i in range(0, len(x_train), 100)]
    example = (x_train[:2],)
    rec = Recover(epochs=ns.epochs, lr=ns.lr, output_loss="kl", batch_size=32, eval_every=20, patience=8)
    print(f"dense: {accuracy(model, x_test, y_test):.2f}%")
    for refit in (False, True):
        prune = StructuredPruning(mac_ratio=ns.ratio, criterion="fluctuation", allocation="global", reconstruct=refit)
        small = sparsecomp.compress(model, example, prune, calibration=calibration)
        t0, c0 = time.perf_counter(), time.process_time()
        recovered = sparsecomp.compress(model, example, [prune, rec], calibration=calibration)
        rep = recovered.sparsecomp_report[-1]["layers"]
        print(f"ratio {ns.ratio} {'refit' if refit else 'no refit'}: {accuracy(small, x_test, y_test):.2f}% -> "
              f"recovered {accuracy(recovered, x_test, y_test):.2f}% (compress + recover {time.perf_counter() - t0:.0f} s "
              f"wall, {time.process_time() - c0:.0f} s CPU; val KL {rep[0]['val_loss']:.4f} -> {rep[-1]['val_loss']:.4f})")


if __name__ == "__main__":
    main()
