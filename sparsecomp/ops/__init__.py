"""Sparse storage formats and sparse ``linear`` operators.

Importing this package registers the ``torch.ops.sparsecomp.sparse_linear_*``
custom operators (see :mod:`sparsecomp.ops.sparse_linear`) that the
Sparsify pass rewrites ``aten.linear`` into, and exposes the packing
functions of :mod:`sparsecomp.ops.formats`.  Invalid weights, block shapes,
N:M patterns and operator arguments raise :class:`SparseFormatError` (a
``ValueError`` and a ``sparsecomp.SparsecompError``).
"""

from .formats import (
    BSRWeight,
    CSRWeight,
    NMWeight,
    PackedWeight,
    SparseFormatError,
    pack,
    pack_bsr,
    pack_csr,
    pack_nm,
)
from .sparse_linear import (
    SparseLinear,
    packed_linear,
    sparse_linear_bsr,
    sparse_linear_csr,
    sparse_linear_nm,
)

__all__ = [
    "BSRWeight",
    "CSRWeight",
    "NMWeight",
    "PackedWeight",
    "SparseFormatError",
    "pack",
    "pack_bsr",
    "pack_csr",
    "pack_nm",
    "SparseLinear",
    "packed_linear",
    "sparse_linear_bsr",
    "sparse_linear_csr",
    "sparse_linear_nm",
]
