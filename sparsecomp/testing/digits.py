"""A small CNN trained on scikit-learn's 8x8 digits: a real task, with labels, in seconds on a CPU.

Used by ``tests/test_digits.py`` (fidelity of pruning + reconstruction) and
``benchmarks/recover_digits.py`` (recovery by distillation), so both measure the same model: trained
deterministically (seed 0; 1400 training images, 397 test images), scikit-learn needed at call time.

Example
-------
>>> from sparsecomp.testing import digits
>>> model, x_train, x_test, y_test = digits.trained_digits()   # doctest: +SKIP
>>> digits.accuracy(model, x_test, y_test)                      # top-1 in percent, ~98.5  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two 3x3 convs (16, 32 channels), a max pool and two linears: 1x8x8 images -> 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def trained_digits() -> tuple[DigitsCNN, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model.eval(), x_train, x_test, y_test)``: the CNN after 10 epochs of Adam (lr 3e-3, batch 100) on
    1400 images of a seeded split; images scaled to [0, 1], shape ``[n, 1, 8, 8]``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        for i in range(0, len(train), 100):
            idx = train[i:i + 100]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), x[train], x[test], y[test]


def accuracy(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``module`` on ``(x, y)``, in percent."""
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean()) * 100
