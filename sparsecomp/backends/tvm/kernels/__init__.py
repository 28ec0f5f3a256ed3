"""Our own TIR kernels: dense ``linear``, batched matmul, sparse ``linear``, convolutions and norms.

One module per kernel family (dense, bsr, csr, nm, conv, norm, checks); what they share (constants, the
prefetch plan, the ``T.parallel`` threshold) is in ``common.py``.

Every kernel is a TVMScript ``PrimFunc`` generated for what is known at compile time (``in``/``out``
features, block shape, row count, nnz, tile sizes); only the batch (rows of ``x``) stays symbolic. The
kernels are written at loop level (explicit register tiles, ``T.vectorized`` inner loops, unrolled row
tiles, remainder loops), so they are marked ``tirx.is_scheduled`` and no schedule rule touches them.

Layouts are chosen at compile time from the constant weights (see :mod:`.frontend` for the packing):

* dense: ``W`` packed ``[N/NB, K, NB]`` (NB = 16 outputs, two AVX2 vectors) so a column panel streams
  contiguously; register tile ``MB x NB`` over (rows of x, outputs).
* BSR ``r x c`` with ``r >= c`` (``16x1``, ``4x4``, ``8x8``...): blocks stored ``[c, r]`` (transposed
  at compile time) so the inner loop is an ``r``-wide vector FMA, in groups of 16 behind their column
  indices (:func:`bsr_stored`); register tile ``MB x r``. Single rows of ``x`` (batch 1) read four
  block rows in lockstep, blocks narrower than a vector packed two columns to a vector.
* BSR with ``c > r`` (``1x16``...): blocks ``[nnzb, r, c]``; vector over the block's columns, horizontal sum.
  At batch >= 8, 1xC blocks and blocks narrower than a vector (``4x4``) run 8 rows of the batch as
  one vector on a per-tile ``x^T`` (:func:`_bsr_batch_tiles`).
* CSR: SELL-8 (:func:`sell_layout`): rows sorted by length within windows, 8 output rows in the lanes
  of a vector; batch 1 assembles ``x`` at an entry's 8 columns from scalar loads, batches of 8 / 16
  rows run as vectors over the batch on a per-tile repacked ``x^T``; a parallel chunk is one sorting
  window, whose batch-tile results are buffered and written to ``Y`` row-contiguously.
* N:M: with AVX2 and ``m`` in 2/4/8, 8 output rows in lanes, ``vpermps`` picks each entry's column
  from an 8-column window of ``x`` (:func:`nm_lanes_kernel`; serially two groups in lockstep);
  otherwise a row kernel computes the
  column ``group*m + position`` from the uint8 positions (tiles of 8 rows of ``x`` as vectors over
  the batch, ``U`` independent accumulators per output row for the rest).
* convolutions (NCHW in and out, inputs already padded): direct kernel with weights packed
  ``[OC/NB, IC/g, KD, KH, KW, NB]``, register tile ``TW`` output-width positions x ``NB`` output
  channels; pointwise (1x1) kernel vectorised over positions (:func:`pointwise_tile`); depthwise
  kernel vectorised along output rows (strided rows computed whole, then subsampled). Activations
  (ReLU, hardswish, hardsigmoid) can be fused into the stores; BatchNorm is folded into the weights
  by the frontend.
* GroupNorm / LayerNorm: two-pass statistics into 8-lane vectors, then one vectorised affine pass.
* mean over trailing dims: vector accumulators per row (:func:`mean_kernel`).
* index check (before embedding, ``index_select``, one-tensor indexing, ``gather``): torch's bounds
  check on indices that reach Relax ``take`` / ``gather_elements`` (:func:`index_check_kernel`).

Parallelism: the outer loop (output panels / chunks of rows) runs ``T.parallel`` only when the call's
work, known at run time from the batch, is at least :data:`MIN_PARALLEL_FLOPS` (one macro decides it for
every kernel that splits this way, :func:`.common.by_work`): a parallel launch costs
~12 us even on one thread, more than a whole small layer (a 64x64 linear on 32 rows: 12.8 -> 3.4 us).
Every generator takes ``parallel=False`` for models lowered for one thread: the body of a parallel
loop is compiled as a closure and ran 1.5-3x slower than the same loop inline (3072x768 CSR at 90 %,
batch 1, cold: 453 us through the parallel path vs ~0.35 of that per nonzero serially).
"""

from .bsr import bsr_col_vector_kernel, bsr_groups, bsr_kernel, bsr_row_vector_kernel, bsr_stored
from .checks import index_check_kernel, nonzero_check_kernel
from .common import (BATCH_VEC, BSR_BATCH_TILE, BSR_GROUP, BSR_STREAMS, DEFAULT_PLAN, DENSE_MB, DENSE_MB_AVX512,
                     DENSE_NB, MIN_PARALLEL_FLOPS, OFF, PAIR_ACC_VECTORS, Prefetch, PREFETCH_BYTES, PrefetchPlan,
                     READ_STREAMS, ROW_UNROLL, ROWS_PER_CHUNK, SELL_R, SELL_SIGMA, SPARSE_FLOP_COST)
from .conv import (activation, ACTIVATIONS, conv_kernel, CONV_NB, conv_out_size, conv_tile, CONV_TW,
                   depthwise_conv_kernel, DW_WIDE_MAX_STRIDE, pointwise_conv_kernel, POINTWISE_MB, POINTWISE_PB,
                   pointwise_tile)
from .csr import csr_kernel, sell_layout
from .dense import bmm_kernel, dense_kernel
from .nm import nm_kernel, nm_lane_layout, nm_lanes_kernel, NM_LANES_M, nm_lanes_supported
from .norm import group_norm_kernel, layer_norm_kernel, mean_kernel

__all__ = [
    "ACTIVATIONS", "BATCH_VEC", "BSR_BATCH_TILE", "BSR_GROUP", "BSR_STREAMS", "CONV_NB", "CONV_TW", "DEFAULT_PLAN",
    "DENSE_MB", "DENSE_MB_AVX512", "DENSE_NB", "DW_WIDE_MAX_STRIDE", "MIN_PARALLEL_FLOPS", "NM_LANES_M", "OFF",
    "PAIR_ACC_VECTORS", "POINTWISE_MB", "POINTWISE_PB", "PREFETCH_BYTES", "Prefetch", "PrefetchPlan",
    "READ_STREAMS", "ROWS_PER_CHUNK", "ROW_UNROLL", "SELL_R", "SELL_SIGMA", "SPARSE_FLOP_COST", "activation",
    "bmm_kernel", "bsr_col_vector_kernel", "bsr_groups", "bsr_kernel", "bsr_row_vector_kernel", "bsr_stored",
    "conv_kernel", "conv_out_size", "conv_tile", "csr_kernel", "dense_kernel", "depthwise_conv_kernel",
    "group_norm_kernel", "index_check_kernel", "layer_norm_kernel", "mean_kernel", "nm_kernel", "nm_lane_layout",
    "nm_lanes_kernel", "nm_lanes_supported", "nonzero_check_kernel", "pointwise_conv_kernel", "pointwise_tile",
    "sell_layout"
]
