"""Sparse ``linear`` operators: ``y = x @ W.T + b`` computed on the nonzeros only.

Three custom operators are registered in the ``sparsecomp`` namespace with
:func:`torch.library.custom_op` (no side effects, ``mutates_args=()``) and a
``register_fake`` kernel, so graphs that call them can be traced by
``torch.export`` / FakeTensor with symbolic leading (batch) dimensions::

    sparsecomp::sparse_linear_csr(Tensor x, Tensor crow_indices, Tensor col_indices,
        Tensor values, Tensor? bias, int out_features, int in_features) -> Tensor
    sparsecomp::sparse_linear_bsr(Tensor x, Tensor crow_indices, Tensor col_indices,
        Tensor values, Tensor? bias, int out_features, int in_features,
        int block_r, int block_c) -> Tensor
    sparsecomp::sparse_linear_nm(Tensor x, Tensor values, Tensor indices,
        Tensor? bias, int n, int m, int in_features) -> Tensor

``x`` is ``[..., in_features]`` (any number of leading dims) and the result is
``[..., out_features]``, contiguous, with ``x``'s dtype.  The tensors are the
fields of :class:`~sparsecomp.ops.formats.CSRWeight`,
:class:`~sparsecomp.ops.formats.BSRWeight` and
:class:`~sparsecomp.ops.formats.NMWeight`.

CPU kernels (chosen by measurement, see ``benchmarks/bench_sparse_ops.py``;
everything runs on the stored nonzeros only, nothing is densified):

* **CSR** -- a zero-copy ``torch.sparse_csr_tensor`` over the buffers (int32
  indices: MKL's LP64 interface; int64 ones are narrowed per call) times the
  input.  A single row uses the sparse matrix-vector kernel (2-3x faster than
  a one-column matrix product); larger batches use the matrix-matrix kernel
  on ``x.T``.
* **BSR** -- MKL's BSR kernel only takes square blocks, so:

  - ``r == c``: ``torch.sparse_bsr_tensor @ x.T`` on the buffers as-is;
  - ``r x 1`` (e.g. ``16x1``): ``Y = P_x @ V`` where ``P_x`` is a CSR matrix
    holding the gathered inputs ``x[b, col[blk]]`` (``B * nnzb`` entries) and
    the stored ``[nnzb, r]`` blocks are the dense right-hand side: no copy of
    the weights, r-wide vectorised rows (1.5-2x faster than plain CSR at
    batch 1);
  - ``1 x c`` (e.g. ``1x16``): CSR with the column runs expanded
    (``col*c + 0..c-1``, one int32 pass), values used in place;
  - other shapes: split into ``g x g`` square sub-blocks, ``g = gcd(r, c)``,
    block rows reordered sub-row-major (one copy of the values), output rows
    permuted back.
* **N:M** -- the packed layout *is* a CSR matrix with exactly ``K = in*n/m``
  entries per row: column indices are ``group*m + position`` (one int32 pass
  over the uint8 positions), row pointers are ``arange(out+1) * K``, values are
  used in place; then the CSR kernel.  Gather formulations (``x[..., cols]``
  then a multiply-sum, or ``index_add``/``segment_reduce`` segment sums) were
  1.5-50x slower on CPU.

MKL has no ``float16`` / ``bfloat16`` kernels, so those dtypes are computed in
``float32`` and cast back.  The operators check shapes and dtypes (O(1)); the
index *contents* are trusted, they are validated once when a format object is
constructed.  The operators are inference kernels: no autograd formula is
registered.
"""

import math
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import register_flop_formula

from ..graph.macs import register_macs
from .formats import BSRWeight, CSRWeight, NMWeight, PackedWeight, SparseFormatError, pack

__all__ = [
    "sparse_linear_csr",
    "sparse_linear_bsr",
    "sparse_linear_nm",
    "packed_linear",
    "SparseLinear",
]

_NATIVE_DTYPES = (torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)
_INT32_MAX = 2**31 - 1

# torch warns once per process that sparse compressed tensors are "beta" the
# first time one is built. The kernels below only build them internally, so
# consume that one-time warning here instead of surfacing it at the first call.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(
        torch.zeros(2, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0),
        (1, 1),
        check_invariants=False,
    )


# --------------------------------------------------------------------------- #
# argument checks shared by the real and fake kernels
# --------------------------------------------------------------------------- #
def _check_size(size, expected, message) -> None:
    """Raise ``SparseFormatError(message())`` unless ``size == expected`` (guard for SymInts)."""
    if isinstance(size, torch.SymInt) or isinstance(expected, torch.SymInt):
        torch._check(size == expected, message)
    elif size != expected:
        raise SparseFormatError(message())


def _check_linear_args(
    op: str,
    x: Tensor,
    values: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    in_features: int,
) -> None:
    if x.dim() < 1:
        raise SparseFormatError(
            f"{op}: x must have at least 1 dim [..., in_features], got a scalar"
        )
    if not x.is_floating_point():
        raise SparseFormatError(f"{op}: x must be floating point, got {x.dtype}")
    if values.dtype != x.dtype:
        raise SparseFormatError(
            f"{op}: x dtype {x.dtype} does not match weight values dtype {values.dtype}"
        )
    if out_features < 0 or in_features < 0:
        raise SparseFormatError(f"{op}: out_features/in_features must be >= 0")
    _check_size(
        x.shape[-1],
        in_features,
        lambda: f"{op}: x has {x.shape[-1]} input features, the weight expects "
        f"in_features={in_features}",
    )
    if bias is not None:
        if bias.dim() != 1:
            raise SparseFormatError(f"{op}: bias must be 1-D [out_features], got {bias.dim()}-D")
        _check_size(
            bias.shape[0],
            out_features,
            lambda: f"{op}: bias has {bias.shape[0]} entries, expected out_features={out_features}",
        )
        if bias.dtype != x.dtype:
            raise SparseFormatError(
                f"{op}: bias dtype {bias.dtype} does not match x dtype {x.dtype}"
            )


def _check_compressed_args(
    op: str, crow: Tensor, col: Tensor, values: Tensor, nrows: int, value_dims: int
) -> None:
    if crow.dim() != 1 or col.dim() != 1:
        raise SparseFormatError(f"{op}: crow_indices and col_indices must be 1-D")
    if crow.dtype not in _INDEX_DTYPES or col.dtype not in _INDEX_DTYPES:
        raise SparseFormatError(f"{op}: crow_indices/col_indices must be int32 or int64")
    if values.dim() != value_dims:
        raise SparseFormatError(f"{op}: values must be {value_dims}-D, got {values.dim()}-D")
    _check_size(
        crow.shape[0],
        nrows + 1,
        lambda: f"{op}: crow_indices has {crow.shape[0]} entries, expected {nrows + 1}",
    )
    _check_size(
        col.shape[0],
        values.shape[0],
        lambda: f"{op}: col_indices has {col.shape[0]} entries but values has {values.shape[0]}",
    )


def _check_block_args(op: str, values: Tensor, out_features: int, in_features: int, r: int, c: int):
    if r < 1 or c < 1 or out_features % r or in_features % c:
        raise SparseFormatError(
            f"{op}: block shape {(r, c)} does not divide weight shape {(out_features, in_features)}"
        )
    if values.dim() == 3 and (values.shape[1] != r or values.shape[2] != c):
        raise SparseFormatError(
            f"{op}: values blocks are {tuple(values.shape[1:])}, expected block shape {(r, c)}"
        )


def _check_nm_args(op: str, values: Tensor, indices: Tensor, n: int, m: int, in_features: int):
    if m < 1 or not 1 <= n <= m:
        raise SparseFormatError(f"{op}: N:M pattern needs 1 <= n <= m, got n={n}, m={m}")
    if in_features % m:
        raise SparseFormatError(f"{op}: in_features={in_features} is not divisible by m={m}")
    if values.dim() != 2 or indices.shape != values.shape:
        raise SparseFormatError(
            f"{op}: values and indices must both be [out_features, in_features*n/m], "
            f"got {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if indices.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        raise SparseFormatError(f"{op}: indices must be an integer tensor, got {indices.dtype}")
    _check_size(
        values.shape[1],
        in_features // m * n,
        lambda: f"{op}: values has {values.shape[1]} columns, expected in_features*n/m = "
        f"{in_features // m * n}",
    )


# --------------------------------------------------------------------------- #
# CPU kernels
# --------------------------------------------------------------------------- #
def _index_pair(crow: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """Return int32 indices when they fit (MKL's LP64 interface), else int64."""
    if crow.dtype == torch.int32 and col.dtype == torch.int32:
        return crow, col
    if col.numel() <= _INT32_MAX:
        return crow.to(torch.int32), col.to(torch.int32)
    return crow.to(torch.int64), col.to(torch.int64)


def _spmm(
    layout: str, crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int], x2: Tensor
) -> Tensor:
    """``x2 @ S.T`` for the sparse matrix ``S`` given by (crow, col, values); ``[B, out]``."""
    crow, col = _index_pair(crow, col)
    if layout == "csr":
        mat = torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
        if x2.shape[0] == 1:
            # Matrix-vector kernel: 2-3x faster than a one-column matrix product.
            return (mat @ x2[0]).unsqueeze(0)
    else:
        mat = torch.sparse_bsr_tensor(crow, col, values, size, check_invariants=False)
    return (mat @ x2.t()).t()


def _run_linear(
    x: Tensor, bias: Optional[Tensor], out_features: int, in_features: int, body
) -> Tensor:
    """Flatten leading dims, call ``body(x2)`` -> ``[B, out]``, add bias, restore shape.

    ``x2`` is handed to ``body`` in float32 when ``x``'s dtype has no MKL kernel.
    The result is a fresh contiguous tensor with ``x``'s dtype.
    """
    dtype = x.dtype
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    if dtype not in _NATIVE_DTYPES:
        x2 = x2.float()
    if x2.shape[0] == 0 or out_features == 0 or in_features == 0:
        y = x2.new_zeros(x2.shape[0], out_features)
    else:
        y = body(x2)
    if bias is not None:
        y = torch.add(y, bias)
    if y.dtype != dtype:
        y = y.to(dtype)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], out_features)
    return y.contiguous()


def _cast(values: Tensor, dtype: torch.dtype) -> Tensor:
    return values if values.dtype == dtype else values.to(dtype)


def _csr_forward(x2, crow, col, values, out_features, in_features):
    return _spmm("csr", crow, col, _cast(values, x2.dtype), (out_features, in_features), x2)


def _bsr_forward(x2, crow, col, values, out_features, in_features, r, c):
    values = _cast(values, x2.dtype)
    size = (out_features, in_features)
    if r == 1 and c == 1:
        return _spmm("csr", crow, col, values.reshape(-1), size, x2)
    if r == c:
        return _spmm("bsr", crow, col, values, size, x2)
    crow, col = _index_pair(crow, col)
    if values.numel() > _INT32_MAX:  # expanded indices would overflow int32
        crow, col = crow.long(), col.long()
    if c == 1:
        return _column_block_forward(x2, crow, col, values, out_features, r)
    if r == 1:
        # 1 x c blocks are CSR rows made of runs of c consecutive columns.
        sub_col = torch.add(
            torch.arange(c, dtype=col.dtype, device=col.device), col.view(-1, 1), alpha=c
        )
        return _spmm("csr", crow * c, sub_col.view(-1), values.reshape(-1), size, x2)
    return _split_block_forward(x2, crow, col, values, out_features, in_features, r, c)


def _column_block_forward(x2, crow, col, values, out_features, r):
    """``r x 1`` blocks: ``Y = P_x @ V`` with ``P_x`` sparse in the gathered inputs.

    Block row ``i`` gives ``y[i*r:(i+1)*r] = sum_blk x[col[blk]] * V[blk, :]``, i.e.
    a CSR matrix ``P_x[(b, i), blk] = x[b, col[blk]]`` (``B * nnzb`` entries, one
    gather of ``x``) times the stored ``[nnzb, r]`` values as a dense right-hand
    side. No copy of the weights, and the sparse kernel runs r-wide rows.
    """
    batch = x2.shape[0]
    nnzb = values.shape[0]
    nbr = out_features // r
    xg = x2.index_select(1, col)  # [B, nnzb]
    index_dtype = torch.int32 if batch * nnzb <= _INT32_MAX else torch.int64
    crow = crow.to(index_dtype)
    arange = torch.arange(nnzb, dtype=index_dtype, device=col.device)
    if batch == 1:
        p_crow, p_col = crow, arange
    else:
        starts = torch.arange(batch, dtype=index_dtype, device=col.device).view(batch, 1) * nnzb
        p_crow = torch.cat(
            [(starts + crow[:-1].view(1, nbr)).view(-1), crow.new_full((1,), batch * nnzb)]
        )
        p_col = arange.repeat(batch)
    p_x = torch.sparse_csr_tensor(
        p_crow, p_col, xg.reshape(-1), (batch * nbr, nnzb), check_invariants=False
    )
    return (p_x @ values.reshape(nnzb, r)).view(batch, out_features)


def _split_block_forward(x2, crow, col, values, out_features, in_features, r, c):
    """General ``r x c`` blocks: split into square ``g x g`` sub-blocks, ``g = gcd(r, c)``.

    New block row ``(t, i)`` holds sub-row ``t`` of old block row ``i``, so the
    sub-blocks are ordered ``[kr, nnzb, kc]`` (one copy of the values) and the
    column indices stay sorted within each new row; output rows come out as
    ``(t, i, a)`` and are permuted back.
    """
    g = math.gcd(r, c)
    kr, kc = r // g, c // g
    nnzb = values.shape[0]
    nbr = out_features // r
    sub = values.reshape(nnzb, kr, g, kc, g).permute(1, 0, 3, 2, 4).reshape(-1, g, g)
    sub_col = torch.add(
        torch.arange(kc, dtype=col.dtype, device=col.device), col.view(-1, 1), alpha=kc
    )
    sub_col = sub_col.view(1, -1).expand(kr, -1).reshape(-1)
    starts = torch.arange(kr, dtype=crow.dtype, device=crow.device).view(kr, 1) * nnzb
    sub_crow = torch.cat(
        [((starts + crow[:-1].view(1, nbr)) * kc).view(-1), crow.new_full((1,), kr * nnzb * kc)]
    )
    size = (out_features, in_features)
    if g == 1:
        y2 = _spmm("csr", sub_crow, sub_col, sub.reshape(-1), size, x2)
    else:
        y2 = _spmm("bsr", sub_crow, sub_col, sub, size, x2)
    if kr > 1:  # rows (t, i, a) -> (i, t, a)
        y2 = y2.reshape(-1, kr, nbr, g).transpose(1, 2).reshape(-1, out_features)
    return y2


def _nm_forward(x2, values, indices, n, m, in_features):
    out_features, k = values.shape
    index_dtype = torch.int32 if max(out_features * k, in_features) <= _INT32_MAX else torch.int64
    device = values.device
    cols = indices.to(index_dtype)  # fresh [out, K] tensor, position inside the group
    cols += torch.arange(k, dtype=index_dtype, device=device).div_(n, rounding_mode="floor").mul_(m)
    crow = torch.arange(out_features + 1, dtype=index_dtype, device=device) * k
    values = _cast(values, x2.dtype).reshape(-1)
    return _spmm("csr", crow, cols.view(-1), values, (out_features, in_features), x2)


# --------------------------------------------------------------------------- #
# custom operators
# --------------------------------------------------------------------------- #
def _validate_csr(x, crow_indices, col_indices, values, bias, out_features, in_features) -> None:
    """Shape/dtype checks shared by the CSR kernel and its fake; returns ``out_features``."""
    op = "sparse_linear_csr"
    _check_linear_args(op, x, values, bias, out_features, in_features)
    _check_compressed_args(op, crow_indices, col_indices, values, out_features, 1)
    return out_features


def _validate_bsr(x, crow_indices, col_indices, values, bias, out_features, in_features, block_r, block_c) -> None:
    """Shape/dtype checks shared by the BSR kernel and its fake; returns ``out_features``."""
    op = "sparse_linear_bsr"
    _check_linear_args(op, x, values, bias, out_features, in_features)
    _check_block_args(op, values, out_features, in_features, block_r, block_c)
    _check_compressed_args(op, crow_indices, col_indices, values, out_features // block_r, 3)
    return out_features


def _validate_nm(x, values, indices, bias, n, m, in_features) -> int:
    """Shape/dtype checks shared by the N:M kernel and its fake; returns ``out_features``."""
    op = "sparse_linear_nm"
    _check_nm_args(op, values, indices, n, m, in_features)
    out_features = values.shape[0]
    _check_linear_args(op, x, values, bias, out_features, in_features)
    return out_features


@torch.library.custom_op("sparsecomp::sparse_linear_csr", mutates_args=())
def sparse_linear_csr(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Optional[Tensor],
                      out_features: int, in_features: int) -> Tensor:
    """``x @ W.T + bias`` for ``x [..., in_features]``, ``W [out_features, in_features]`` in CSR format
    (the tensors of :class:`~sparsecomp.ops.formats.CSRWeight`); returns ``[..., out_features]``."""
    _validate_csr(x, crow_indices, col_indices, values, bias, out_features, in_features)
    return _run_linear(x, bias, out_features, in_features,
                       lambda x2: _csr_forward(x2, crow_indices, col_indices, values, out_features, in_features))


@torch.library.custom_op("sparsecomp::sparse_linear_bsr", mutates_args=())
def sparse_linear_bsr(x: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, bias: Optional[Tensor],
                      out_features: int, in_features: int, block_r: int, block_c: int) -> Tensor:
    """``x @ W.T + bias`` with ``W`` in BSR format: ``values [nnzb, block_r, block_c]``, the block shape
    dividing ``(out_features, in_features)`` (the tensors of :class:`~sparsecomp.ops.formats.BSRWeight`)."""
    _validate_bsr(x, crow_indices, col_indices, values, bias, out_features, in_features, block_r, block_c)
    return _run_linear(x, bias, out_features, in_features,
                       lambda x2: _bsr_forward(x2, crow_indices, col_indices, values, out_features, in_features,
                                               block_r, block_c))


@torch.library.custom_op("sparsecomp::sparse_linear_nm", mutates_args=())
def sparse_linear_nm(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                     in_features: int) -> Tensor:
    """``x @ W.T + bias`` with ``W`` packed ``n:m`` along the input dim: ``values`` and ``indices``
    ``[out_features, in_features*n/m]``, ``indices`` the position (``0..m-1``) of each value in its group
    (the tensors of :class:`~sparsecomp.ops.formats.NMWeight`)."""
    out_features = _validate_nm(x, values, indices, bias, n, m, in_features)
    return _run_linear(x, bias, out_features, in_features,
                       lambda x2: _nm_forward(x2, values, indices, n, m, in_features))


# --------------------------------------------------------------------------- #
# fake kernels (shape checks, output shape) and MAC / FLOP formulas: the
# multiply-adds actually done, rows x stored values (N:M padding included)
# --------------------------------------------------------------------------- #
def _register_linear_op(op, validate, values_at: int, stored) -> None:
    """Register ``op``'s fake kernel (``validate`` checks the call and returns ``out_features``) and its
    MAC formula (:mod:`sparsecomp.graph.macs`) and FLOP formula (``FlopCounterMode``): rows of ``x``
    times ``stored(values_shape)`` multiply-adds, ``values`` being argument ``values_at``."""

    @op.register_fake
    def _(x, *args):
        return x.new_empty((*x.shape[:-1], validate(x, *args)))

    register_macs(getattr(torch.ops.sparsecomp, op._name).default,
                  lambda a, kw, out: math.prod(a[0].shape[:-1]) * stored(tuple(a[values_at].shape)))

    @register_flop_formula(getattr(torch.ops.sparsecomp, op._name))
    def _flops(x_shape, *shapes, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * stored(tuple(shapes[values_at - 1]))


_register_linear_op(sparse_linear_csr, _validate_csr, 3, lambda values_shape: values_shape[0])
_register_linear_op(sparse_linear_bsr, _validate_bsr, 3, math.prod)
_register_linear_op(sparse_linear_nm, _validate_nm, 1, math.prod)


# --------------------------------------------------------------------------- #
# functional + module front ends
# --------------------------------------------------------------------------- #
def packed_linear(x: Tensor, weight: PackedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """Apply the sparse operator matching ``weight``'s format.

    Parameters
    ----------
    x : Tensor
        ``[..., in_features]`` input.
    weight : CSRWeight or BSRWeight or NMWeight
        Packed weight.
    bias : Tensor, optional
        ``[out_features]``.

    Returns
    -------
    Tensor
        ``[..., out_features]``, equal to ``F.linear(x, weight.to_dense(), bias)``.
    """
    if not isinstance(weight, (CSRWeight, BSRWeight, NMWeight)):
        raise TypeError(f"expected CSRWeight, BSRWeight or NMWeight, got {type(weight).__name__}")
    return _call_op(x, weight.format, weight, bias, *weight.shape)


def _call_op(x: Tensor, fmt: str, w, bias: Optional[Tensor], out_f: int, in_f: int) -> Tensor:
    """Call the operator of format ``fmt`` on ``w``'s tensors (a format object or a :class:`SparseLinear`:
    both name them ``crow_indices`` / ``col_indices`` / ``values`` / ``indices``, ``blocksize``, ``n``, ``m``)."""
    if fmt == "nm":
        return torch.ops.sparsecomp.sparse_linear_nm(x, w.values, w.indices, bias, w.n, w.m, in_f)
    if fmt == "bsr":
        r, c = w.blocksize
        return torch.ops.sparsecomp.sparse_linear_bsr(x, w.crow_indices, w.col_indices, w.values, bias, out_f, in_f,
                                                      r, c)
    return torch.ops.sparsecomp.sparse_linear_csr(x, w.crow_indices, w.col_indices, w.values, bias, out_f, in_f)


class SparseLinear(nn.Module):
    """Drop-in inference replacement for ``nn.Linear`` with a packed sparse weight.

    The packed tensors (and the bias) are registered as buffers, so they are
    part of ``state_dict`` and are lifted as constants by ``torch.export``.

    Parameters
    ----------
    weight : CSRWeight or BSRWeight or NMWeight
        Packed weight.
    bias : Tensor, optional
        ``[out_features]`` bias with the weight's dtype.
    """

    def __init__(self, weight: PackedWeight, bias: Optional[Tensor] = None) -> None:
        super().__init__()
        if not isinstance(weight, (CSRWeight, BSRWeight, NMWeight)):
            raise TypeError(
                f"weight must be a CSRWeight, BSRWeight or NMWeight, got {type(weight).__name__}"
            )
        self.out_features, self.in_features = weight.shape
        self.format = weight.format
        dtype = weight.values.dtype
        if bias is not None:
            if not isinstance(bias, Tensor) or tuple(bias.shape) != (self.out_features,):
                got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
                raise SparseFormatError(f"bias must have shape ({self.out_features},), got {got}")
            if bias.dtype != dtype:
                raise SparseFormatError(
                    f"bias dtype {bias.dtype} does not match weight dtype {dtype}"
                )
            bias = bias.detach().clone()
        if isinstance(weight, NMWeight):
            self.n, self.m = weight.n, weight.m
            self.register_buffer("values", weight.values)
            self.register_buffer("indices", weight.indices)
        else:
            if isinstance(weight, BSRWeight):
                self.blocksize = weight.blocksize
            self.register_buffer("crow_indices", weight.crow_indices)
            self.register_buffer("col_indices", weight.col_indices)
            self.register_buffer("values", weight.values)
        self.register_buffer("bias", bias)

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Optional[Tensor] = None,
        format: str = "csr",
        block: tuple[int, int] = (4, 4),
        n: int = 2,
        m: int = 4,
        index_dtype: Optional[torch.dtype] = None,
    ) -> "SparseLinear":
        """Pack a dense (already pruned) weight and build the module.

        Parameters
        ----------
        weight : Tensor
            Dense ``[out_features, in_features]`` weight; its zeros are dropped.
        bias : Tensor, optional
            ``[out_features]``.
        format : {"csr", "bsr", "nm"}
            Storage format.
        block : tuple of int
            Block shape ``(r, c)`` for ``"bsr"``.
        n, m : int
            Pattern for ``"nm"``.
        index_dtype : torch.dtype, optional
            Index dtype override.

        Returns
        -------
        SparseLinear
        """
        return cls(pack(weight, format, block=block, n=n, m=m, index_dtype=index_dtype), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "SparseLinear":
        """Build from an ``nn.Linear`` (keyword arguments as :meth:`from_dense`)."""
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_dense(linear.weight.detach(), bias, **kwargs)

    @property
    def packed(self) -> PackedWeight:
        """The current buffers as a (validated) format object."""
        shape = (self.out_features, self.in_features)
        if self.format == "nm":
            return NMWeight(self.values, self.indices, self.n, self.m, shape)
        if self.format == "bsr":
            return BSRWeight(
                self.crow_indices, self.col_indices, self.values, shape, self.blocksize
            )
        return CSRWeight(self.crow_indices, self.col_indices, self.values, shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight storage (bias excluded)."""
        return sum(
            b.numel() * b.element_size()
            for name, b in self.named_buffers(recurse=False)
            if name != "bias" and b is not None
        )

    def to_dense(self) -> Tensor:
        """Dense ``[out_features, in_features]`` weight."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        """Compute ``x @ W.T + bias`` for ``x`` of shape ``[..., in_features]``."""
        return _call_op(x, self.format, self, self.bias, self.out_features, self.in_features)

    def extra_repr(self) -> str:
        extra = ""
        if self.format == "bsr":
            extra = f", block={self.blocksize}"
        elif self.format == "nm":
            extra = f", pattern={self.n}:{self.m}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"format={self.format!r}{extra}, nnz={self.values.numel()}, "
            f"bias={self.bias is not None}"
        )

