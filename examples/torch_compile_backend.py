"""Compress inside ``torch.compile``: the ``sparsecomp`` backend prunes every graph Dynamo captures.

    python examples/torch_compile_backend.py

The backend is registered by installing sparsecomp (an entry point); it is for inference (run under
``torch.no_grad()``). Here the graph is pruned and run by torch (``target="eager"``); ``"inductor"``,
``"ort"`` and ``"tvm"`` compile it further.
"""

import torch
from torch import nn


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    compiled = torch.compile(model, backend="sparsecomp", options={
        "recipe": [{"type": "StructuredPruning", "ratio": 0.5}],
        "target": "eager",
    })
    x = torch.randn(8, 64)
    with torch.no_grad():
        y = compiled(x)
        dense = model(x)
    assert y.shape == dense.shape == (8, 10)
    assert not torch.allclose(y, dense), "half the hidden neurons are gone: a different (smaller) model"
    print("compiled and pruned on the first call; output", tuple(y.shape))


if __name__ == "__main__":
    main()
