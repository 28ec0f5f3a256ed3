"""Sparsify: masks to a sparsity pattern (transform.py), and the measured cost model that decides when a sparse
kernel beats dense (cost_model.py)."""

from . import cost_model
from .transform import (SPARSE_OPS, Sparsify, block_mask, layer_mask, nm_mask, run_sparsify, scores,
                        unstructured_mask)

__all__ = ["SPARSE_OPS", "Sparsify", "block_mask", "cost_model", "layer_mask", "nm_mask", "run_sparsify", "scores",
           "unstructured_mask"]
