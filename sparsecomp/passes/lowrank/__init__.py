"""Low-rank factorization: replace a dense ``linear`` or convolution by two thin ones, ``W ~= B @ A``.

Must run on a captured graph (``capture`` / ``compress``). Every ``aten.linear`` and every ungrouped,
non-transposed ``aten.conv{1,2,3}d`` / ``aten.convolution`` whose weight is a parameter is a candidate.
Seen as a matrix, the weight is ``W`` ``[m, n]``: ``[out, in]`` for a linear, ``[out, in * prod(kernel)]``
for a convolution. For a chosen rank ``r``:

* ``linear(x, W, bias)``  ->  ``linear(linear(x, A), B, bias)``, ``A`` ``[r, in]``, ``B`` ``[out, r]``;
* ``conv(x, W, bias, stride, padding, dilation)``  ->  ``conv(conv(x, A, None, stride, padding, dilation),
  B, bias)``: a ``k x k`` conv to ``r`` channels (``A`` ``[r, in, *k]``, keeping stride, padding and
  dilation) followed by a 1x1 conv (``B`` ``[out, r, 1, ...]``, with the bias). A 1x1 conv is the same
  rewrite with ``k = 1``.

The layer shrinks from ``m*n`` to ``r*(m+n)`` weights. Grouped and transposed convolutions stay dense (with
the reason in the report).

Three factorizations (``method``):

* ``"svd"``: truncated SVD of ``W`` (optimal in the Frobenius norm of the weight).
* ``"activation"``: SVD-LLM whitening. With ``G = X^T X`` the Gram matrix of the layer's inputs over the
  calibration batches (for a convolution: of the unfolded input patches, im2col, in 1d, 2d and 3d) and
  ``G + eps*I = L L^T`` (Cholesky), the truncated SVD of ``W L`` gives ``W ~= U_r S_r V_r^T L^{-1}``,
  which minimises the output error ``||X W^T - X (BA)^T||_F`` (``||X D^T||_F = ||D L||_F``). The relative
  output error at rank ``r`` is then ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` of the whitened singular
  values.
* ``"asvd"``: ASVD-style scaling. ``S = diag(mean|X_j|^0.5)`` per input column (patch column); the truncated
  SVD of ``W S`` gives ``A = V_r^T S^{-1}``. Cheaper than whitening (no ``n x n`` factorisation) and
  usually between the two.

Rank per layer (``allocation="uniform"``): from ``rank_ratio``, ``energy`` or ``param_ratio`` of each layer
alone. With ``allocation="global"``, ``param_ratio`` is one budget over all candidate layers, in parameters
or MACs (``target``); ranks are allocated to minimise the sum of the layers' relative output errors (see
``allocate_global``).

Cost model: a layer stays dense unless the factored pair is predicted to be faster than the dense op on a
CPU (``factored_is_faster``; constants measured by ``benchmarks/bench_lowrank_overhead.py``).

The pass reports per layer the rank, parameter counts and the relative output error on the calibration
data (``||X D^T||_F^2 = tr(D G D^T)``), or why the layer was left dense.
"""

from .config import LowRank
from .transform import run_lowrank

__all__ = ["LowRank", "run_lowrank"]
