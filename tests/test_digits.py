"""Fidelity without retraining on a real task: a small CNN trained on scikit-learn's digits.

At 50% MAC reduction (global allocation), reconstruction keeps top-1 accuracy within one point of the dense
model, and is clearly better than the same pruning without reconstruction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp import StructuredPruning
from sparsecomp.app.metrics import count_macs

sklearn = pytest.importorskip("sklearn.datasets")


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def digits_model():
    data = sklearn.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(10):
        for i in range(0, len(train), 100):
            idx = train[i:i + 100]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model, x[train], x[test], y[test]


def _accuracy(module, x, y) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean()) * 100


def test_digits_half_macs_reconstruction(digits_model):
    model, x_train, x_test, y_test = digits_model
    dense_acc = _accuracy(model, x_test, y_test)
    assert dense_acc > 95  # the model really learned the task
    calibration = [x_train[i:i + 128] for i in range(0, 512, 128)]
    example = (x_train[:2],)
    dense_macs = count_macs(model, example)
    results = {}
    for rec in (False, True):
        cfg = StructuredPruning(mac_ratio=0.5, criterion="fluctuation", allocation="global", reconstruct=rec)
        small = sparsecomp.compress(model, example, cfg, calibration=calibration)
        reduction = 1 - count_macs(small, example) / dense_macs
        results[rec] = (_accuracy(small, x_test, y_test), reduction)
    print(f"\ndigits CNN: dense {dense_acc:.2f}%  |  50% MACs removed: without reconstruction "
          f"{results[False][0]:.2f}%, with reconstruction {results[True][0]:.2f}% "
          f"(MAC reduction {results[True][1]:.1%})")
    for acc, reduction in results.values():
        assert reduction >= 0.5
    assert results[True][0] >= dense_acc - 1.0
    assert results[True][0] > results[False][0]
    assert model.features[0].weight.shape == (16, 1, 3, 3)  # the user's model is untouched
