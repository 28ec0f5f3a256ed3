"""Tests for the sparse weight formats and the ``sparsecomp::sparse_linear_*`` operators."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from sparsecomp.ops import (
    BSRWeight,
    CSRWeight,
    NMWeight,
    SparseFormatError,
    SparseLinear,
    pack,
    pack_bsr,
    pack_csr,
    pack_nm,
    packed_linear,
)

RTOL, ATOL = 1e-5, 1e-5


# --------------------------------------------------------------------------- #
# weight generators (zeros already applied, as a pruning pass would leave them)
# --------------------------------------------------------------------------- #
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def unstructured(shape, sparsity, seed=0, empty_rows=True):
    g = _gen(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0.0
    if empty_rows and shape[0] >= 3:
        w[1::3] = 0.0  # guaranteed empty rows
    return w


def block_sparse(shape, block, sparsity, seed=0):
    (out_f, in_f), (r, c) = shape, block
    g = _gen(seed)
    keep = (torch.rand(out_f // r, in_f // c, generator=g) >= sparsity).float()
    if keep.shape[0] >= 2:
        keep[0] = 0.0  # an empty block row
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    w = torch.randn(shape, generator=g) * mask
    w[torch.rand(shape, generator=g) < 0.2] = 0.0  # zeros inside kept blocks too
    return w


def nm_sparse(shape, n, m, seed=0):
    out_f, in_f = shape
    g = _gen(seed)
    w = torch.randn(shape, generator=g).view(out_f, in_f // m, m)
    top = w.abs().topk(n, dim=-1).indices
    w = torch.zeros_like(w).scatter_(-1, top, w.gather(-1, top)).view(out_f, in_f)
    w[torch.rand(shape, generator=g) < 0.1] = 0.0  # some groups with < n nonzeros
    if out_f >= 2:
        w[0] = 0.0
    return w


def _inputs(in_f, seed=1):
    g = _gen(seed)
    return [
        torch.randn(1, in_f, generator=g),
        torch.randn(8, in_f, generator=g),
        torch.randn(2, 3, in_f, generator=g),
        torch.randn(in_f, generator=g),
    ]


SHAPES = [(64, 48), (48, 96), (32, 32)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]
BLOCKS = [(4, 4), (8, 8), (16, 1), (1, 16), (2, 8), (8, 2), (2, 3), (1, 1)]
NM_PATTERNS = [(2, 4), (1, 4), (4, 8), (1, 2)]


def _block_shape(block):
    r, c = block
    return (r * 6, c * 5)


# --------------------------------------------------------------------------- #
# packing round trips
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_csr_roundtrip(shape, sparsity):
    w = unstructured(shape, sparsity)
    p = pack_csr(w)
    assert isinstance(p, CSRWeight)
    assert p.crow_indices.dtype == torch.int32 and p.col_indices.dtype == torch.int32
    assert p.nnz == int((w != 0).sum())
    assert torch.equal(p.to_dense(), w)
    assert p.nbytes == 4 * (shape[0] + 1) + 4 * p.nnz + 4 * p.nnz
    p64 = pack_csr(w, index_dtype=torch.int64)
    assert p64.col_indices.dtype == torch.int64 and torch.equal(p64.to_dense(), w)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_bsr_roundtrip(block, sparsity):
    shape = _block_shape(block)
    w = block_sparse(shape, block, sparsity)
    p = pack_bsr(w, block)
    assert isinstance(p, BSRWeight)
    assert p.values.shape[1:] == block
    assert torch.equal(p.to_dense(), w)
    nnzb = int((w.view(shape[0] // block[0], block[0], -1, block[1]) != 0).any(3).any(1).sum())
    assert p.nnzb == nnzb
    assert p.nbytes == 4 * (shape[0] // block[0] + 1) + 4 * nnzb + 4 * nnzb * block[0] * block[1]


@pytest.mark.parametrize("n,m", NM_PATTERNS)
@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int8])
def test_nm_roundtrip(n, m, index_dtype):
    shape = (24, 16 * m)
    w = nm_sparse(shape, n, m)
    p = pack_nm(w, n, m, index_dtype=index_dtype)
    assert isinstance(p, NMWeight)
    k = shape[1] // m * n
    assert p.values.shape == (shape[0], k) and p.indices.shape == (shape[0], k)
    assert p.indices.dtype == index_dtype
    assert torch.equal(p.to_dense(), w)
    assert p.nbytes == shape[0] * k * (4 + 1)
    assert p.density == n / m


def test_pack_dispatch_and_float64():
    w = unstructured((16, 8), 0.5).double()
    assert isinstance(pack(w, "csr"), CSRWeight)
    assert isinstance(pack(w, "bsr", block=(2, 2)), BSRWeight)
    assert isinstance(pack(nm_sparse((16, 8), 2, 4).double(), "nm"), NMWeight)
    assert torch.equal(pack(w, "bsr", block=(4, 2)).to_dense(), w)


# --------------------------------------------------------------------------- #
# operators == F.linear
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr_op_matches_linear(shape, sparsity, with_bias):
    w = unstructured(shape, sparsity, empty_rows=sparsity < 1.0)
    b = torch.randn(shape[0]) if with_bias else None
    p = pack_csr(w)
    for x in _inputs(shape[1]):
        y = packed_linear(x, p, b)
        assert y.shape == (*x.shape[:-1], shape[0]) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9, 1.0])
def test_bsr_op_matches_linear(block, sparsity):
    shape = _block_shape(block)
    w = block_sparse(shape, block, sparsity)
    b = torch.randn(shape[0])
    p = pack_bsr(w, block)
    for x in _inputs(shape[1]):
        y = packed_linear(x, p, b)
        assert y.shape == (*x.shape[:-1], shape[0]) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(64, 48), (48, 96)])
@pytest.mark.parametrize("block", [(4, 4), (16, 1), (1, 16), (8, 4)])
def test_bsr_op_on_larger_shapes(shape, block):
    w = block_sparse(shape, block, 0.5, seed=3)
    p = pack_bsr(w, block)
    for x in _inputs(shape[1]):
        torch.testing.assert_close(packed_linear(x, p), F.linear(x, w), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("n,m", NM_PATTERNS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_nm_op_matches_linear(n, m, with_bias):
    shape = (40, 16 * m)
    w = nm_sparse(shape, n, m)
    b = torch.randn(shape[0]) if with_bias else None
    p = pack_nm(w, n, m)
    for x in _inputs(shape[1]):
        y = packed_linear(x, p, b)
        assert y.shape == (*x.shape[:-1], shape[0]) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("block", [(1, 1), (4, 4), (16, 1), (1, 16), (8, 4)])
def test_int64_indices(block):
    w = block_sparse((32, 32), block, 0.5)
    x = torch.randn(3, 32)
    for p in (pack_csr(w, index_dtype=torch.int64), pack_bsr(w, block, index_dtype=torch.int64)):
        assert p.col_indices.dtype == torch.int64
        torch.testing.assert_close(packed_linear(x, p), F.linear(x, w), rtol=RTOL, atol=ATOL)
        x1 = x[:1]
        torch.testing.assert_close(packed_linear(x1, p), F.linear(x1, w), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_dense_weight_and_zero_batch(fmt):
    w = torch.randn(32, 16) if fmt != "nm" else nm_sparse((32, 16), 2, 4)
    b = torch.randn(32)
    p = pack(w, fmt, block=(8, 2))
    if fmt == "csr":
        assert p.nnz == w.numel()  # fully dense matrix stays exact
    x = torch.randn(0, 16)
    y = packed_linear(x, p, b)
    assert y.shape == (0, 32)
    x = torch.randn(5, 16)
    torch.testing.assert_close(packed_linear(x, p, b), F.linear(x, w, b), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_non_contiguous_input(fmt):
    w = nm_sparse((32, 16), 2, 4) if fmt == "nm" else unstructured((32, 16), 0.7)
    p = pack(w, fmt, block=(16, 1))
    x = torch.randn(16, 10)[:, ::2].t()  # [5, 16], non-contiguous
    x1 = torch.randn(16, 4)[:, 1:2].t()  # [1, 16] with a strided row
    for x in (x, x1):
        assert not x.is_contiguous()
        torch.testing.assert_close(packed_linear(x, p), F.linear(x, w), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(fmt, dtype):
    w = nm_sparse((32, 16), 2, 4) if fmt == "nm" else unstructured((32, 16), 0.7)
    b = torch.randn(32)
    p = pack(w.to(dtype), fmt, block=(4, 4))
    x = torch.randn(3, 16)
    y = packed_linear(x.to(dtype), p, b.to(dtype))
    assert y.dtype == dtype
    ref = F.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())
    tol = dict(rtol=RTOL, atol=ATOL) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), ref, **tol)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_opcheck(fmt):
    w = nm_sparse((32, 16), 2, 4) if fmt == "nm" else unstructured((32, 16), 0.6)
    b = torch.randn(32)
    p = pack(w, fmt, block=(8, 4))
    for x in (torch.randn(2, 3, 16),):
        if fmt == "csr":
            op = torch.ops.sparsecomp.sparse_linear_csr.default
            args = (x, p.crow_indices, p.col_indices, p.values, b, 32, 16)
        elif fmt == "bsr":
            op = torch.ops.sparsecomp.sparse_linear_bsr.default
            args = (x, p.crow_indices, p.col_indices, p.values, b, 32, 16, 8, 4)
        else:
            op = torch.ops.sparsecomp.sparse_linear_nm.default
            args = (x, p.values, p.indices, None, 2, 4, 16)
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- #
# bad inputs
# --------------------------------------------------------------------------- #
def test_errors_are_value_errors():
    from sparsecomp.errors import SparsecompError

    assert issubclass(SparseFormatError, ValueError)
    assert issubclass(SparseFormatError, SparsecompError)
    with pytest.raises(SparseFormatError):
        pack_bsr(torch.randn(30, 32), (4, 4))


def test_bsr_block_not_dividing():
    w = torch.randn(30, 32)
    msg = r"block shape \(4, 4\) does not divide weight shape \(30, 32\)"
    with pytest.raises(ValueError, match=msg):
        pack_bsr(w, (4, 4))
    with pytest.raises(ValueError, match="in_features=32 is not a multiple of block_c=5"):
        pack_bsr(torch.randn(32, 32), (4, 5))
    with pytest.raises(ValueError, match="block shape must be positive"):
        pack_bsr(torch.randn(32, 32), (0, 4))
    with pytest.raises(ValueError, match="does not divide"):
        SparseLinear.from_dense(w, format="bsr", block=(16, 1))


def test_nm_violated():
    w = nm_sparse((8, 16), 2, 4)
    w[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    msg = r"does not satisfy 2:4 sparsity.*row 3, columns 4:8 has 3"
    with pytest.raises(ValueError, match=msg):
        pack_nm(w, 2, 4)
    with pytest.raises(ValueError, match="in_features=18 is not divisible by m=4"):
        pack_nm(torch.zeros(8, 18), 2, 4)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        pack_nm(torch.zeros(8, 16), 5, 4)
    with pytest.raises(ValueError, match="does not satisfy"):
        SparseLinear.from_dense(torch.randn(8, 16), format="nm")


def test_bad_weight_and_format():
    with pytest.raises(ValueError, match="2-D"):
        pack_csr(torch.randn(4))
    with pytest.raises(ValueError, match="floating point"):
        pack_csr(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown sparse format 'coo'"):
        pack(torch.randn(4, 4), "coo")
    with pytest.raises(ValueError, match="index_dtype"):
        pack_csr(torch.randn(4, 4), index_dtype=torch.int16)


def test_format_constructors_validate_structure():
    p = pack_csr(unstructured((8, 8), 0.5, empty_rows=False))
    bad_col = p.col_indices.clone()
    bad_col[0] = 8
    with pytest.raises(ValueError, match=r"col_indices must lie in \[0, 8\)"):
        CSRWeight(p.crow_indices, bad_col, p.values, (8, 8))
    unsorted = p.col_indices.clone()
    row0 = slice(int(p.crow_indices[0]), int(p.crow_indices[1]))
    unsorted[row0] = unsorted[row0].flip(0)
    if row0.stop - row0.start > 1:
        with pytest.raises(ValueError, match="strictly increasing"):
            CSRWeight(p.crow_indices, unsorted, p.values, (8, 8))
    with pytest.raises(ValueError, match="crow_indices has 8 entries, expected 9"):
        CSRWeight(p.crow_indices[:-1], p.col_indices, p.values, (8, 8))
    q = pack_nm(nm_sparse((4, 8), 2, 4))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        NMWeight(q.values, torch.full_like(q.indices, 4), 2, 4, (4, 8))
    msg = r"values blocks have shape \(2, 2\), expected blocksize \(4, 1\)"
    with pytest.raises(ValueError, match=msg):
        b = pack_bsr(torch.randn(8, 8), (2, 2))
        BSRWeight(b.crow_indices, b.col_indices, b.values, (8, 8), (4, 1))


def test_op_argument_errors():
    w = unstructured((16, 8), 0.5)
    p = pack_csr(w)
    msg = "x has 9 input features, the weight expects in_features=8"
    with pytest.raises(ValueError, match=msg):
        packed_linear(torch.randn(2, 9), p)
    with pytest.raises(ValueError, match="bias has 15 entries, expected out_features=16"):
        packed_linear(torch.randn(2, 8), p, torch.randn(15))
    with pytest.raises(ValueError, match="does not match weight values dtype"):
        packed_linear(torch.randn(2, 8, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="crow_indices has 16 entries, expected 17"):
        torch.ops.sparsecomp.sparse_linear_csr(
            torch.randn(2, 8), p.crow_indices[:-1], p.col_indices, p.values, None, 16, 8
        )
    q = pack_bsr(w, (4, 4))
    with pytest.raises(ValueError, match="does not divide"):
        torch.ops.sparsecomp.sparse_linear_bsr(
            torch.randn(2, 8), q.crow_indices, q.col_indices, q.values, None, 16, 8, 3, 4
        )
    r = pack_nm(nm_sparse((16, 8), 2, 4))
    with pytest.raises(ValueError, match="not divisible by m=3"):
        torch.ops.sparsecomp.sparse_linear_nm(torch.randn(2, 8), r.values, r.indices, None, 2, 3, 8)
    with pytest.raises(ValueError, match="bias must have shape"):
        SparseLinear(p, torch.randn(3))
    with pytest.raises(TypeError):
        packed_linear(torch.randn(2, 8), w)


# --------------------------------------------------------------------------- #
# SparseLinear + torch.export
# --------------------------------------------------------------------------- #
def _weight_for(fmt, shape=(48, 32)):
    return nm_sparse(shape, 2, 4) if fmt == "nm" else block_sparse(shape, (8, 4), 0.5)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_sparse_linear_module(fmt):
    lin = nn.Linear(32, 48)
    with torch.no_grad():
        lin.weight.copy_(_weight_for(fmt))
    mod = SparseLinear.from_linear(lin, format=fmt, block=(8, 4))
    assert mod.format == fmt and (mod.in_features, mod.out_features) == (32, 48)
    names = {n for n, _ in mod.named_buffers()}
    expected = {"values", "indices", "bias"} if fmt == "nm" else {
        "crow_indices", "col_indices", "values", "bias"
    }
    assert names == expected and set(mod.state_dict()) == expected
    assert list(mod.parameters()) == []
    assert torch.equal(mod.to_dense(), lin.weight.detach())
    assert mod.nbytes == mod.packed.nbytes < lin.weight.numel() * 4
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(mod(x), lin(x).detach(), rtol=RTOL, atol=ATOL)
    # state_dict round trip into a module with the same sparsity structure
    clone = SparseLinear.from_dense(
        lin.weight.detach() * 2, torch.zeros(48), format=fmt, block=(8, 4)
    )
    clone.load_state_dict(mod.state_dict())
    torch.testing.assert_close(clone(x), mod(x))
    assert f"format='{fmt}'" in repr(mod)


class _OpModel(nn.Module):
    """A tiny model that calls the sparse ops directly, with dense ops around them."""

    def __init__(self, fmt):
        super().__init__()
        self.fmt = fmt
        w = _weight_for(fmt)
        self.w_dense = w
        p = pack(w, fmt, block=(8, 4))
        if fmt == "nm":
            self.register_buffer("values", p.values)
            self.register_buffer("indices", p.indices)
        else:
            self.register_buffer("crow", p.crow_indices)
            self.register_buffer("col", p.col_indices)
            self.register_buffer("values", p.values)
        self.register_buffer("bias", torch.randn(48))
        self.head = nn.Linear(48, 5)

    def forward(self, x):
        x = x * 2.0
        if self.fmt == "csr":
            y = torch.ops.sparsecomp.sparse_linear_csr(
                x, self.crow, self.col, self.values, self.bias, 48, 32
            )
        elif self.fmt == "bsr":
            y = torch.ops.sparsecomp.sparse_linear_bsr(
                x, self.crow, self.col, self.values, self.bias, 48, 32, 8, 4
            )
        else:
            y = torch.ops.sparsecomp.sparse_linear_nm(
                x, self.values, self.indices, self.bias, 2, 4, 32
            )
        return self.head(torch.relu(y))

    def reference(self, x):
        return self.head(torch.relu(F.linear(x * 2.0, self.w_dense, self.bias)))


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_export_dynamic_batch(fmt, tmp_path):
    model = _OpModel(fmt).eval()
    ep = torch.export.export(model, (torch.randn(4, 32),), dynamic_shapes={"x": {0: Dim("batch")}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert f"sparsecomp.sparse_linear_{fmt}.default" in targets
    exported = ep.module()
    with torch.no_grad():
        for batch in (3, 9, 1):
            x = torch.randn(batch, 32)
            torch.testing.assert_close(exported(x), model.reference(x), rtol=RTOL, atol=ATOL)
    # the op survives decompositions and a save/load round trip
    ep = ep.run_decompositions()
    path = tmp_path / f"sparse_{fmt}.pt2"
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.reference(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "nm"])
def test_export_sparse_linear_module_3d(fmt):
    w = _weight_for(fmt)
    b = torch.randn(48)
    mod = SparseLinear.from_dense(w, b, format=fmt, block=(16, 1)).eval()
    ep = torch.export.export(
        mod, (torch.randn(2, 5, 32),), dynamic_shapes={"x": {0: Dim("b"), 1: Dim("s")}}
    )
    buffers = {spec.target for spec in ep.graph_signature.input_specs if spec.target}
    assert "values" in buffers
    for shape in [(3, 7, 32), (1, 2, 32)]:
        x = torch.randn(shape)
        torch.testing.assert_close(ep.module()(x), F.linear(x, w, b), rtol=RTOL, atol=ATOL)
