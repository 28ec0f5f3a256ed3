"""Fidelity without retraining on a real task: a small CNN trained on scikit-learn's digits.

At 50% MAC reduction (global allocation), reconstruction keeps top-1 accuracy within one point of the dense
model, and is clearly better than the same pruning without reconstruction.
"""

from __future__ import annotations

import pytest

import sparsecomp
from sparsecomp import StructuredPruning
from sparsecomp.app.metrics import count_macs
from sparsecomp.testing.digits import accuracy, trained_digits

pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits_model():
    return trained_digits()


def test_digits_half_macs_reconstruction(digits_model):
    model, x_train, x_test, y_test = digits_model
    dense_acc = accuracy(model, x_test, y_test)
    assert dense_acc > 95  # the model really learned the task
    calibration = [x_train[i:i + 128] for i in range(0, 512, 128)]
    example = (x_train[:2],)
    dense_macs = count_macs(model, example)
    results = {}
    for rec in (False, True):
        cfg = StructuredPruning(mac_ratio=0.5, criterion="fluctuation", allocation="global", reconstruct=rec)
        small = sparsecomp.compress(model, example, cfg, calibration=calibration)
        reduction = 1 - count_macs(small, example) / dense_macs
        results[rec] = (accuracy(small, x_test, y_test), reduction)
    print(f"\ndigits CNN: dense {dense_acc:.2f}%  |  50% MACs removed: without reconstruction "
          f"{results[False][0]:.2f}%, with reconstruction {results[True][0]:.2f}% "
          f"(MAC reduction {results[True][1]:.1%})")
    for acc, reduction in results.values():
        assert reduction >= 0.5
    assert results[True][0] >= dense_acc - 1.0
    assert results[True][0] > results[False][0]
    assert model.features[0].weight.shape == (16, 1, 3, 3)  # the user's model is untouched
