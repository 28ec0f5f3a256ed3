"""Recover: distil the compressed graph from the original one (the teacher) on unlabeled calibration data.

Runs last in a ``compress([...])`` list, after any combination of ``StructuredPruning`` / ``LowRank`` /
``Sparsify``: it needs the graph as captured before the first pass (``PassContext.original``), which
``compress`` hands to it. The user's model and the teacher graph are never modified.

1. **Correspondence.** A module of the original model whose scope has a single output node (a float
   tensor) *corresponds* when the compressed graph has the same module path (``nn_module_stack``) with one
   output of the same shape: widths the earlier passes pruned do not correspond, residual streams and block
   outputs do. The *blocks* are the longest run of sibling modules (``encoder.layer.0``, ``...1``, ...)
   that all correspond and where each block reads the previous block's output (never model names).
2. **Block-wise phase** (BRECQ-like): block ``i`` alone, fed the teacher's output of block ``i - 1``,
   learns the teacher's output of block ``i``; the teacher's block outputs are computed once and cached
   per sample, and the training graph of one block is the compressed graph cut at its input (only that
   block runs, so memory is one block's activations of one batch).
3. **End-to-end phase**: the whole compressed graph, loss on the outputs (``output_loss``) plus the
   relative MSE at every block output, against the teacher run on the same (optionally augmented) batch.

What earlier passes decided is kept: shapes never change (only tensor values are trained); a weight
entry (of a >= 2-D weight, or a packed sparse ``values`` tensor) that is exactly zero stays exactly zero
(masked gradients and a re-mask after each step: unstructured, block and N:M masks are preserved);
``sparse_linear_*`` ops train their packed ``values`` through a differentiable scatter into the dense
weight, so their index arrays never change; low-rank factors are two parameters and stay two;
BatchNorm runs in its captured inference form (statistics are buffers, never updated). Embedding tables
(weights read by ``aten.embedding``) are frozen unless ``train_embeddings``: only the rows of tokens in
the calibration text would move.

A held-out split of the calibration samples (``val_fraction``) measures output fidelity before, after
each phase and every ``eval_every`` steps; the best state is kept (early stopping with ``patience``), and
if no state beats the starting point, the starting (refit) weights are returned and the report says so.
"""

from .config import Recover
from .run import run_recover

__all__ = ["Recover", "run_recover"]
