"""Compact storage formats for sparse ``nn.Linear`` weights.

A dense weight ``W`` of shape ``[out_features, in_features]`` whose zeros have
already been applied (by a pruning pass) is packed into one of three formats:

* :class:`CSRWeight` -- compressed sparse rows (unstructured sparsity);
* :class:`BSRWeight` -- block compressed sparse rows with an ``(r, c)`` block
  shape (e.g. ``16x1``, ``1x16``, ``4x4``, ``8x8``);
* :class:`NMWeight`  -- ``N:M`` semi-structured sparsity along the input
  dimension (e.g. ``2:4``): ``N`` values plus small position indices for every
  group of ``M`` consecutive inputs.

Each format is a frozen dataclass of tensors plus metadata with
``to_dense()`` (exact inverse of packing) and ``nbytes`` (bytes of the
compressed storage).  Packing is pure vectorised torch code.  The constructors
validate the structure once (index ranges, monotone row pointers, sorted and
distinct columns), so the operators in :mod:`sparsecomp.ops.sparse_linear` can
hand the tensors to torch's unchecked sparse kernels safely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

from ..errors import SparsecompError

__all__ = [
    "SparseFormatError",
    "CSRWeight",
    "BSRWeight",
    "NMWeight",
    "PackedWeight",
    "pack_csr",
    "pack_bsr",
    "pack_nm",
    "pack",
]

class SparseFormatError(SparsecompError, ValueError):
    """A sparse weight, block shape, N:M pattern or sparse-op argument is invalid.

    Subclasses ``ValueError``; the message names the offending shape or value.
    """


_INDEX_DTYPES = (torch.int32, torch.int64)
_NM_INDEX_DTYPES = (torch.uint8, torch.int8)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _tensor_nbytes(*tensors: Tensor) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise SparseFormatError(
            f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}"
        )
    if weight.layout != torch.strided:
        raise SparseFormatError(
            f"weight must be a dense (strided) tensor, got layout {weight.layout}"
        )
    if not weight.is_floating_point():
        raise SparseFormatError(f"weight must be floating point, got dtype {weight.dtype}")


def _pick_index_dtype(index_dtype: torch.dtype | None, *extents: int) -> torch.dtype:
    if index_dtype is None:
        return torch.int32 if max(extents, default=0) <= _INT32_MAX else torch.int64
    if index_dtype not in _INDEX_DTYPES:
        raise SparseFormatError(
            f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}"
        )
    if index_dtype == torch.int32 and max(extents, default=0) > _INT32_MAX:
        raise SparseFormatError(
            "index_dtype=torch.int32 cannot address this many entries; use torch.int64"
        )
    return index_dtype


def _check_compressed(
    name: str,
    crow: Tensor,
    col: Tensor,
    nrows: int,
    ncols: int,
    nnz: int,
) -> None:
    """Validate row pointers / column indices of a CSR or BSR structure."""
    for label, t in (("crow_indices", crow), ("col_indices", col)):
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise SparseFormatError(f"{name}: {label} must be a 1-D tensor")
        if t.dtype not in _INDEX_DTYPES:
            raise SparseFormatError(f"{name}: {label} must be int32 or int64, got {t.dtype}")
    if crow.dtype != col.dtype:
        raise SparseFormatError(
            f"{name}: crow_indices ({crow.dtype}) and col_indices ({col.dtype}) must share a dtype"
        )
    if crow.numel() != nrows + 1:
        raise SparseFormatError(
            f"{name}: crow_indices has {crow.numel()} entries, expected {nrows + 1} (rows + 1)"
        )
    if col.numel() != nnz:
        raise SparseFormatError(f"{name}: col_indices has {col.numel()} entries, expected {nnz}")
    if int(crow[0]) != 0 or int(crow[-1]) != nnz:
        raise SparseFormatError(
            f"{name}: crow_indices must start at 0 and end at nnz={nnz}, "
            f"got {int(crow[0])}..{int(crow[-1])}"
        )
    if nrows > 0 and bool((crow[1:] < crow[:-1]).any()):
        raise SparseFormatError(f"{name}: crow_indices must be non-decreasing")
    if nnz == 0:
        return
    if int(col.min()) < 0 or int(col.max()) >= ncols:
        raise SparseFormatError(f"{name}: col_indices must lie in [0, {ncols})")
    # Columns strictly increasing inside each row: every step that is not a
    # row start must increase.
    steps = col[1:] > col[:-1]
    row_start = torch.zeros(nnz, dtype=torch.bool, device=col.device)
    row_start[crow[:-1][crow[:-1] < nnz].long()] = True
    if not bool((steps | row_start[1:]).all()):
        raise SparseFormatError(
            f"{name}: col_indices must be strictly increasing within each row"
        )


# --------------------------------------------------------------------------- #
# CSR
# --------------------------------------------------------------------------- #
class _PackedWeight:
    """Shared accessors of the packed formats; subclasses name their tensors in ``_storage``."""

    values: Tensor
    shape: tuple[int, int]

    def _storage(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    @property
    def nnz(self) -> int:
        """Number of stored values (for N:M, explicit zero padding slots included)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Fraction of stored entries, ``nnz / (out * in)``."""
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed storage (indices + values)."""
        return _tensor_nbytes(*self._storage())


@dataclass(frozen=True, eq=False)
class CSRWeight(_PackedWeight):
    """Weight in compressed-sparse-row format.

    Attributes
    ----------
    crow_indices : Tensor
        ``[out_features + 1]`` row pointers (int32 or int64).
    col_indices : Tensor
        ``[nnz]`` column indices, same dtype as ``crow_indices``, sorted within rows.
    values : Tensor
        ``[nnz]`` nonzero values.
    shape : tuple of int
        ``(out_features, in_features)`` of the dense weight.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    shape: tuple[int, int]

    format = "csr"

    def __post_init__(self) -> None:
        out_f, in_f = _check_shape(self.shape)
        object.__setattr__(self, "shape", (out_f, in_f))
        if not isinstance(self.values, Tensor) or self.values.dim() != 1:
            raise SparseFormatError("CSRWeight: values must be a 1-D tensor")
        _check_compressed(
            "CSRWeight", self.crow_indices, self.col_indices, out_f, in_f, self.values.numel()
        )

    def _storage(self) -> tuple[Tensor, ...]:
        return self.crow_indices, self.col_indices, self.values

    def to_dense(self) -> Tensor:
        """Return the dense ``[out, in]`` weight (exact inverse of :func:`pack_csr`)."""
        out_f, in_f = self.shape
        crow = self.crow_indices.long()
        rows = torch.repeat_interleave(
            torch.arange(out_f, device=crow.device), crow.diff(), output_size=self.nnz
        )
        dense = self.values.new_zeros(out_f, in_f)
        dense[rows, self.col_indices.long()] = self.values
        return dense


def _check_shape(shape) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise SparseFormatError(
            f"shape must be (out_features, in_features), got {shape!r}"
        ) from None
    if out_f < 0 or in_f < 0:
        raise SparseFormatError(f"shape must be non-negative, got {shape!r}")
    return out_f, in_f


def pack_csr(weight: Tensor, index_dtype: torch.dtype | None = None) -> CSRWeight:
    """Pack a dense weight into :class:`CSRWeight`.

    Parameters
    ----------
    weight : Tensor
        Dense ``[out_features, in_features]`` floating-point weight; exact zeros
        are dropped.
    index_dtype : torch.dtype, optional
        ``torch.int32`` (default when it fits; fastest with MKL) or ``torch.int64``.

    Returns
    -------
    CSRWeight
    """
    _check_weight(weight)
    weight = weight.detach()
    out_f, in_f = weight.shape
    nz = weight != 0
    idx_dtype = _pick_index_dtype(index_dtype, weight.numel())
    rows, cols = nz.nonzero(as_tuple=True)  # row-major order: sorted rows, sorted cols
    counts = nz.sum(dim=1)
    crow = torch.zeros(out_f + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(counts, dim=0, out=crow[1:])
    return CSRWeight(
        crow_indices=crow.to(idx_dtype),
        col_indices=cols.to(idx_dtype),
        values=weight[rows, cols].contiguous(),
        shape=(out_f, in_f),
    )


# --------------------------------------------------------------------------- #
# BSR
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class BSRWeight(_PackedWeight):
    """Weight in block-compressed-sparse-row format with ``(r, c)`` blocks.

    Attributes
    ----------
    crow_indices : Tensor
        ``[out_features / r + 1]`` block-row pointers (int32 or int64).
    col_indices : Tensor
        ``[nnzb]`` block-column indices, sorted within each block row.
    values : Tensor
        ``[nnzb, r, c]`` dense blocks.
    shape : tuple of int
        ``(out_features, in_features)`` of the dense weight.
    blocksize : tuple of int
        ``(r, c)``.
    """

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    shape: tuple[int, int]
    blocksize: tuple[int, int]

    format = "bsr"

    def __post_init__(self) -> None:
        out_f, in_f = _check_shape(self.shape)
        object.__setattr__(self, "shape", (out_f, in_f))
        r, c = _check_block(self.blocksize, (out_f, in_f))
        object.__setattr__(self, "blocksize", (r, c))
        if not isinstance(self.values, Tensor) or self.values.dim() != 3:
            raise SparseFormatError("BSRWeight: values must be a 3-D tensor [nnzb, r, c]")
        if tuple(self.values.shape[1:]) != (r, c):
            raise SparseFormatError(
                f"BSRWeight: values blocks have shape {tuple(self.values.shape[1:])}, "
                f"expected blocksize {(r, c)}"
            )
        _check_compressed(
            "BSRWeight",
            self.crow_indices,
            self.col_indices,
            out_f // r,
            in_f // c,
            self.values.shape[0],
        )

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return self.values.shape[0]

    def _storage(self) -> tuple[Tensor, ...]:
        return self.crow_indices, self.col_indices, self.values

    def to_dense(self) -> Tensor:
        """Return the dense ``[out, in]`` weight (exact inverse of :func:`pack_bsr`)."""
        out_f, in_f = self.shape
        r, c = self.blocksize
        nbr, nbc = out_f // r, in_f // c
        crow = self.crow_indices.long()
        brow = torch.repeat_interleave(
            torch.arange(nbr, device=crow.device), crow.diff(), output_size=self.nnzb
        )
        blocks = self.values.new_zeros(nbr, nbc, r, c)
        blocks[brow, self.col_indices.long()] = self.values
        return blocks.permute(0, 2, 1, 3).reshape(out_f, in_f)


def _check_block(block, shape: tuple[int, int]) -> tuple[int, int]:
    try:
        r, c = (int(b) for b in block)
    except (TypeError, ValueError):
        raise SparseFormatError(f"block must be a pair (r, c), got {block!r}") from None
    if r < 1 or c < 1:
        raise SparseFormatError(f"block shape must be positive, got {(r, c)}")
    out_f, in_f = shape
    problems = []
    if out_f % r:
        problems.append(f"out_features={out_f} is not a multiple of block_r={r}")
    if in_f % c:
        problems.append(f"in_features={in_f} is not a multiple of block_c={c}")
    if problems:
        raise SparseFormatError(
            f"block shape {(r, c)} does not divide weight shape {(out_f, in_f)}: "
            + "; ".join(problems)
        )
    return r, c


def pack_bsr(
    weight: Tensor,
    block: tuple[int, int] = (4, 4),
    index_dtype: torch.dtype | None = None,
) -> BSRWeight:
    """Pack a dense weight into :class:`BSRWeight`.

    Blocks that are entirely zero are dropped; every other block is stored
    densely (zeros inside a kept block are stored too).

    Parameters
    ----------
    weight : Tensor
        Dense ``[out_features, in_features]`` floating-point weight.
    block : tuple of int
        Block shape ``(r, c)``; ``r`` must divide ``out_features`` and ``c``
        must divide ``in_features``.
    index_dtype : torch.dtype, optional
        ``torch.int32`` (default when it fits) or ``torch.int64``.

    Returns
    -------
    BSRWeight

    Raises
    ------
    SparseFormatError
        If the block shape does not divide the weight shape.
    """
    _check_weight(weight)
    weight = weight.detach()
    out_f, in_f = weight.shape
    r, c = _check_block(block, (out_f, in_f))
    nbr, nbc = out_f // r, in_f // c
    blocks = weight.reshape(nbr, r, nbc, c).permute(0, 2, 1, 3)  # [nbr, nbc, r, c]
    keep = (blocks != 0).flatten(2).any(dim=2)  # [nbr, nbc]
    idx_dtype = _pick_index_dtype(index_dtype, weight.numel())
    brow, bcol = keep.nonzero(as_tuple=True)
    crow = torch.zeros(nbr + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(keep.sum(dim=1), dim=0, out=crow[1:])
    return BSRWeight(
        crow_indices=crow.to(idx_dtype),
        col_indices=bcol.to(idx_dtype),
        values=blocks[brow, bcol].contiguous(),
        shape=(out_f, in_f),
        blocksize=(r, c),
    )


# --------------------------------------------------------------------------- #
# N:M
# --------------------------------------------------------------------------- #
@dataclass(frozen=True, eq=False)
class NMWeight(_PackedWeight):
    """Weight in packed ``N:M`` format along the input dimension.

    Every group of ``m`` consecutive inputs of every output row stores exactly
    ``n`` slots (padding slots hold an explicit ``0.0``).

    Attributes
    ----------
    values : Tensor
        ``[out_features, in_features * n / m]`` kept values, group-major.
    indices : Tensor
        ``[out_features, in_features * n / m]`` uint8/int8 position of each value
        inside its group of ``m`` (strictly increasing within a group).
    n, m : int
        Sparsity pattern ``n:m``.
    shape : tuple of int
        ``(out_features, in_features)`` of the dense weight.
    """

    values: Tensor
    indices: Tensor
    n: int
    m: int
    shape: tuple[int, int]

    format = "nm"

    def __post_init__(self) -> None:
        out_f, in_f = _check_shape(self.shape)
        object.__setattr__(self, "shape", (out_f, in_f))
        idx_dtype = self.indices.dtype if isinstance(self.indices, Tensor) else None
        n, m = _check_nm(self.n, self.m, in_f, idx_dtype)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        k = in_f // m * n
        for label, t in (("values", self.values), ("indices", self.indices)):
            if not isinstance(t, Tensor) or tuple(t.shape) != (out_f, k):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise SparseFormatError(
                    f"NMWeight: {label} must have shape {(out_f, k)}, got {got}"
                )
        if self.indices.dtype not in _NM_INDEX_DTYPES:
            raise SparseFormatError(
                f"NMWeight: indices must be uint8 or int8, got {self.indices.dtype}"
            )
        if self.indices.numel():
            pos = self.indices.long()
            if int(pos.min()) < 0 or int(pos.max()) >= m:
                raise SparseFormatError(f"NMWeight: indices must lie in [0, {m})")
            if n > 1 and not bool((pos.view(out_f, -1, n).diff(dim=-1) > 0).all()):
                raise SparseFormatError(
                    "NMWeight: indices must be strictly increasing within each group"
                )

    def _storage(self) -> tuple[Tensor, ...]:
        return self.values, self.indices

    def to_dense(self) -> Tensor:
        """Return the dense ``[out, in]`` weight (exact inverse of :func:`pack_nm`)."""
        out_f, in_f = self.shape
        groups = in_f // self.m
        dense = self.values.new_zeros(out_f, groups, self.m)
        dense.scatter_(
            2,
            self.indices.long().view(out_f, groups, self.n),
            self.values.view(out_f, groups, self.n),
        )
        return dense.view(out_f, in_f)


def _check_nm(n, m, in_features: int, index_dtype: torch.dtype | None) -> tuple[int, int]:
    n, m = int(n), int(m)
    if m < 1 or not 1 <= n <= m:
        raise SparseFormatError(f"N:M pattern needs 1 <= n <= m, got n={n}, m={m}")
    limit = 128 if index_dtype == torch.int8 else 256
    if m > limit:
        raise SparseFormatError(
            f"m={m} does not fit {index_dtype or torch.uint8} position indices (need m <= {limit})"
        )
    if in_features % m:
        raise SparseFormatError(
            f"in_features={in_features} is not divisible by m={m} "
            f"(N:M groups run along the input dimension)"
        )
    return n, m


def pack_nm(
    weight: Tensor,
    n: int = 2,
    m: int = 4,
    index_dtype: torch.dtype = torch.uint8,
) -> NMWeight:
    """Pack a dense weight satisfying ``n:m`` sparsity into :class:`NMWeight`.

    Parameters
    ----------
    weight : Tensor
        Dense ``[out_features, in_features]`` weight with at most ``n`` nonzeros
        in every group of ``m`` consecutive inputs.
    n, m : int
        Sparsity pattern, e.g. ``2:4``.
    index_dtype : torch.dtype
        ``torch.uint8`` (default) or ``torch.int8`` for the position indices.

    Returns
    -------
    NMWeight

    Raises
    ------
    SparseFormatError
        If ``in_features % m != 0`` or some group has more than ``n`` nonzeros.
    """
    _check_weight(weight)
    weight = weight.detach()
    if index_dtype not in _NM_INDEX_DTYPES:
        raise SparseFormatError(f"index_dtype must be torch.uint8 or torch.int8, got {index_dtype}")
    out_f, in_f = weight.shape
    n, m = _check_nm(n, m, in_f, index_dtype)
    groups = in_f // m
    wg = weight.reshape(out_f, groups, m)
    nz = wg != 0
    counts = nz.sum(dim=2)
    bad = counts > n
    if bool(bad.any()):
        row, grp = (int(v) for v in bad.nonzero()[0])
        raise SparseFormatError(
            f"weight does not satisfy {n}:{m} sparsity along the input dim: "
            f"{int(bad.sum())} of {bad.numel()} groups of {m} have more than {n} nonzeros "
            f"(first: row {row}, columns {grp * m}:{grp * m + m} has {int(counts[row, grp])})"
        )
    # Nonzeros first (by position), then zero positions as padding; keep the
    # first n and sort them so positions are increasing inside each group.
    pos = torch.arange(m, device=weight.device)
    key = torch.where(nz, pos, pos + m)
    chosen = key.sort(dim=2).values[..., :n] % m
    chosen = chosen.sort(dim=2).values  # [out, groups, n]
    values = wg.gather(2, chosen)
    k = groups * n
    return NMWeight(
        values=values.reshape(out_f, k).contiguous(),
        indices=chosen.to(index_dtype).reshape(out_f, k).contiguous(),
        n=n,
        m=m,
        shape=(out_f, in_f),
    )


PackedWeight = Union[CSRWeight, BSRWeight, NMWeight]


def pack(
    weight: Tensor,
    format: str = "csr",
    *,
    block: tuple[int, int] = (4, 4),
    n: int = 2,
    m: int = 4,
    index_dtype: torch.dtype | None = None,
) -> PackedWeight:
    """Pack ``weight`` into the named format (``"csr"``, ``"bsr"`` or ``"nm"``).

    Parameters
    ----------
    weight : Tensor
        Dense ``[out_features, in_features]`` weight.
    format : {"csr", "bsr", "nm"}
        Target format.
    block : tuple of int
        Block shape for ``"bsr"``.
    n, m : int
        Pattern for ``"nm"``.
    index_dtype : torch.dtype, optional
        Index dtype override (see the individual packers).

    Returns
    -------
    CSRWeight or BSRWeight or NMWeight
    """
    if format == "csr":
        return pack_csr(weight, index_dtype=index_dtype)
    if format == "bsr":
        return pack_bsr(weight, block=block, index_dtype=index_dtype)
    if format == "nm":
        return pack_nm(weight, n=n, m=m, index_dtype=index_dtype or torch.uint8)
    raise SparseFormatError(f"unknown sparse format {format!r}; expected 'csr', 'bsr' or 'nm'")
