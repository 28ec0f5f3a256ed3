"""Sparsify an MLP and run it on TVM with sparsecomp's sparse kernels.

    python examples/sparsify_tvm.py

``Sparsify`` keeps 10 % of the weights of every linear in 16x1 blocks and packs them for the
``sparsecomp::sparse_linear_bsr`` operator; ``sparsecomp.lower(..., backend="tvm")`` compiles the graph with
the TIR kernel for that format (``cost_model="always"``: here the point is the kernel, not the speed of
a layer this small).
"""

import torch
from torch import nn

import sparsecomp


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(4, 128)

    config = sparsecomp.Sparsify(sparsity=0.9, pattern="block", block=(16, 1), cost_model="always")
    sparse = sparsecomp.compress(model, (x,), config)
    layers = sparsecomp.report(sparse, show=False)
    assert "bsr" in layers, "both linears run as block-sparse operators"

    low = sparsecomp.lower(sparse, (x,), backend="tvm", num_threads=1)
    assert low.kernels.get("bsr16x1") == 2, low.kernels   # our TIR kernel for 16x1 blocks, twice
    x7 = torch.randn(7, 128)
    with torch.no_grad():
        torch.testing.assert_close(low(x7), sparse(x7), rtol=1e-4, atol=1e-4)
    print(f"TVM kernels used: {low.kernels}")


if __name__ == "__main__":
    main()
