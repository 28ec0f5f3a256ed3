"""Prune a torchvision-style CNN (residual blocks with BatchNorm) and run it in ONNX Runtime.

    python examples/prune_cnn_onnx.py

StructuredPruning removes whole channels: every conv, BatchNorm and the residual adds that share a
channel lose it together, so the pruned model is a smaller ordinary network (fewer parameters, fewer
MACs) with the same interface. It then goes to ONNX Runtime through ``sparsecomp.lower``.
"""

import torch
from torch import nn

import sparsecomp
from sparsecomp.app.metrics import count_macs, count_params


class Block(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn plus the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(Block(32), Block(32))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def main() -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 32, 32)

    small = sparsecomp.compress(model, (x,), sparsecomp.StructuredPruning(ratio=0.5))
    assert count_params(small) < 0.5 * count_params(model), "half the channels go, so ~3/4 of the weights"
    assert count_macs(small, (x,)) < 0.5 * count_macs(model, (x,))
    assert small(torch.randn(5, 3, 32, 32)).shape == (5, 10), "same interface, any batch"

    fast = sparsecomp.lower(small, (x,), backend="ort", num_threads=1)   # verified against torch on x
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x5), small(x5), rtol=1e-4, atol=1e-4)
    print(f"params {count_params(model)} -> {count_params(small)}; ONNX Runtime matches torch")


if __name__ == "__main__":
    main()
