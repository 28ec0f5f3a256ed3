"""Sparsify pass: masks, rewrite into the sparse operators, cost model, configs, composition, Wanda on MiniLM."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import sparsecomp
from sparsecomp.passes.sparsify import cost_model
from sparsecomp.config import config_from_dict, load_recipe
from sparsecomp.errors import ConfigError
from sparsecomp.graph.attrs import get_attr
from sparsecomp.passes.sparsify import (
    SPARSE_OPS,
    Sparsify,
    block_mask,
    layer_mask,
    nm_mask,
    scores,
    unstructured_mask,
)

LINEAR = torch.ops.aten.linear.default
SPARSE_TARGETS = set(SPARSE_OPS.values())


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))) + x)


def _mlp():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(4, 64)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in SPARSE_TARGETS | {LINEAR}]


def _rows(out, name="Sparsify") -> dict[str, dict]:
    rep = [r for r in out.sparsecomp_report if r["pass"] == name]
    assert len(rep) == 1
    return {row["layer"]: row for row in rep[0]["layers"]}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _masked_reference(model: nn.Module, cfg: Sparsify, skip=()) -> nn.Module:
    """The eager model with every linear weight masked by the public mask functions (magnitude)."""
    ref = copy.deepcopy(model)
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and name not in skip:
            mask = layer_mask(cfg, scores(mod.weight, "magnitude"))
            mod.weight.data.mul_(mask)
    return ref


# ------------------------------------------------------------------------------------------------ masks
def test_unstructured_mask_keeps_top_per_row():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.1, 0.4, 0.3, 0.2]])
    assert unstructured_mask(s, 0.5).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert unstructured_mask(s, 0.0).all()


def test_block_mask_scores_blocks_by_sum():
    s = torch.zeros(4, 4)
    s[0:2, 2:4] = 1.0  # best 2x2 block of block row 0
    s[2:4, 0:2] = 1.0  # best of block row 1
    m = block_mask(s, 0.5, (2, 2))
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[0:2, 2:4] = True
    expect[2:4, 0:2] = True
    assert torch.equal(m, expect)


def test_nm_mask_structure():
    torch.manual_seed(0)
    s = torch.rand(8, 32)
    m = nm_mask(s, 2, 4)
    assert (m.view(8, 8, 4).sum(-1) == 2).all()
    # the kept two are the two largest of every group
    kept = s.view(8, 8, 4)[m.view(8, 8, 4)].view(8, 8, 2).min(-1).values
    dropped = s.view(8, 8, 4)[~m.view(8, 8, 4)].view(8, 8, 2).max(-1).values
    assert (kept >= dropped).all()


def test_mask_counts_random_shapes():
    """Property check over 60 random shapes/sparsities: exact kept counts and structure of every mask."""
    rng = torch.Generator().manual_seed(0)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for _ in range(60):
        r, c, nbr, nbc, n = draw(1, 4), draw(1, 4), draw(1, 4), draw(1, 6), draw(1, 3)
        sparsity = float(torch.rand(1, generator=rng)) * 0.99
        s = torch.rand(nbr * r, nbc * c, generator=rng)
        um = unstructured_mask(s, sparsity)
        assert (um.sum(1) == nbc * c - int(sparsity * nbc * c + 1e-9)).all()
        blocks = block_mask(s, sparsity, (r, c)).view(nbr, r, nbc, c)
        assert (blocks == blocks[:, :1, :, :1]).all()  # constant inside every block
        assert (blocks[:, 0, :, 0].sum(1) == nbc - int(sparsity * nbc + 1e-9)).all()
        m = n + draw(1, 4)
        nm = nm_mask(torch.rand(nbr, nbc * m, generator=rng), n, m)
        assert (nm.view(nbr, nbc, m).sum(-1) == n).all()


def test_wanda_score_uses_input_norms():
    w = torch.ones(2, 3)
    col_sq = torch.tensor([1.0, 4.0, 9.0])
    assert torch.equal(scores(w, "wanda", col_sq), torch.tensor([[1.0, 2.0, 3.0]] * 2, dtype=torch.float64))
    with pytest.raises(ConfigError):
        scores(w, "wanda", None)


# ------------------------------------------------------------------------------------------------ rewrite
PATTERNS = [
    dict(sparsity=0.8),
    dict(sparsity=0.5, pattern="block", block=(16, 1)),
    dict(sparsity=0.75, pattern="block", block=(4, 4)),
    dict(sparsity=0.5, pattern="block", block=(8, 2)),  # non-square, non-column: split kernel
    dict(sparsity=0.5, pattern="block", block=(1, 16)),
    dict(pattern="n:m", n=2, m=4),
    dict(pattern="n:m", n=1, m=8),
]


@pytest.mark.parametrize("kw", PATTERNS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_sparse_op_equals_masked_dense(kw):
    model, x = _mlp()
    cfg = Sparsify(cost_model="always", **kw)
    out = sparsecomp.compress(model, (x,), cfg)
    # the rule fired on every linear: no aten.linear left, one sparse op of the config's format each
    assert _targets(out) == [SPARSE_OPS[cfg.format]] * 3
    # the packed tensors are get_attr buffers of the graph module
    for node in out.graph.nodes:
        if node.op == "call_function" and node.target in SPARSE_TARGETS:
            consts = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
            assert len(consts) >= 2 and all(isinstance(get_attr(out, c.target), torch.Tensor) for c in consts)
    ref = _masked_reference(model, cfg)
    dense_zeros = sparsecomp.compress(model, (x,), Sparsify(**{**kw, "cost_model": "never"}))
    assert _targets(dense_zeros) == [LINEAR] * 3
    with torch.no_grad():
        for xb in (x, torch.randn(7, 64), torch.randn(1, 64)):
            want = ref(xb)
            assert _rel(out(xb), want) < 1e-5
            assert _rel(dense_zeros(xb), want) < 1e-5
    rows = _rows(out)
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear):
            row = rows[f"{name}.weight"]
            zeros = float((mod.weight == 0).float().mean())
            assert row["sparsity"] == pytest.approx(zeros)
            assert row["format"] != "dense-with-zeros" and row["reason"].startswith("forced")
            assert row["macs_after"] < row["macs_before"] and row["bytes_after"] < row["bytes_before"]
    # the user's model is untouched
    assert not (model.up.weight == 0).any()


def test_nm_structure_is_exact():
    model, x = _mlp()
    for policy in ("always", "never"):
        out = sparsecomp.compress(model, (x,), Sparsify(pattern="n:m", n=2, m=4, cost_model=policy))
        for name in ("up", "down", "head"):
            if policy == "never":
                w = get_attr(out, f"{name}.weight")
            else:
                from sparsecomp.ops import NMWeight

                sub = getattr(out, name)
                w = NMWeight(sub.weight_nm_values, sub.weight_nm_indices, 2, 4,
                             (getattr(model, name).out_features, getattr(model, name).in_features)).to_dense()
            groups = (w != 0).view(w.shape[0], -1, 4).sum(-1)
            assert int(groups.max()) <= 2


@pytest.mark.parametrize("kw", [dict(sparsity=0.9), dict(sparsity=0.5, pattern="block", block=(16, 1)),
                                dict(pattern="n:m")], ids=["csr", "bsr", "nm"])
def test_count_macs_counts_stored_values(kw):
    from sparsecomp.app.metrics import count_macs

    model, x = _mlp()
    out = sparsecomp.compress(model, (x,), Sparsify(cost_model="always", **kw))
    rows = _rows(out).values()
    assert count_macs(out, (x,)) == x.shape[0] * sum(r["params_after"] for r in rows)
    assert count_macs(out, (x,)) < count_macs(model, (x,))


def test_export_with_dynamic_batch_after_rewrite():
    model, x = _mlp()
    out = sparsecomp.compress(model, (x,), Sparsify(sparsity=0.9, cost_model="always"))
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(out, (x,), dynamic_shapes=({0: batch},), strict=False)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert SPARSE_OPS["csr"] in targets
    y = torch.randn(9, 64)
    with torch.no_grad():
        assert _rel(ep.module()(y), out(y)) < 1e-6


def test_ignore_keeps_layer_dense_and_untouched():
    model, x = _mlp()
    out = sparsecomp.compress(model, (x,), Sparsify(sparsity=0.9, cost_model="always", ignore=("down",)))
    assert _targets(out) == [SPARSE_OPS["csr"], LINEAR, SPARSE_OPS["csr"]]
    assert torch.equal(get_attr(out, "down.weight"), model.down.weight)
    rows = _rows(out)
    assert rows["down.weight"]["skipped"] == "ignored"
    ref = _masked_reference(model, Sparsify(sparsity=0.9), skip=("down",))
    with torch.no_grad():
        assert _rel(out(x), ref(x)) < 1e-5


def test_cost_model_keeps_low_sparsity_dense_with_zeros():
    model, x = _mlp()
    out = sparsecomp.compress(model, (x,), Sparsify(sparsity=0.5))  # cost_model="auto", batch 1
    assert _targets(out) == [LINEAR] * 3  # 50% unstructured never pays on CPU
    for row in _rows(out).values():
        assert row["format"] == "dense-with-zeros"
        assert "< break-even 0.80 for csr at 1 rows" in row["reason"]
        assert row["macs_after"] == row["macs_before"]
    assert (get_attr(out, "up.weight") == 0).float().mean() == pytest.approx(0.5)
    # 95%: above every break-even at 1 row -> sparse
    hi = sparsecomp.compress(model, (x,), Sparsify(sparsity=0.95))
    assert _targets(hi) == [SPARSE_OPS["csr"]] * 3
    # 2:4 never beats dense in our measurements
    nm = sparsecomp.compress(model, (x,), Sparsify(pattern="n:m"))
    assert _targets(nm) == [LINEAR] * 3
    assert all("never beat dense" in r["reason"] for r in _rows(nm).values())


def test_cost_model_rows_follow_batch_size_and_sequence():
    torch.manual_seed(0)
    seq_model = nn.Sequential(nn.Linear(64, 64)).eval()
    x = torch.randn(2, 16, 64)  # 16 tokens per sample
    out = sparsecomp.compress(seq_model, (x,), Sparsify(sparsity=0.85, batch_size=8))
    (row,) = _rows(out).values()
    assert row["rows"] == 128  # batch_size 8 x 16 tokens
    assert row["format"] == "dense-with-zeros" and "break-even 0.95 for csr at 128 rows" in row["reason"]
    out1 = sparsecomp.compress(seq_model, (x,), Sparsify(sparsity=0.85, batch_size=1))
    (row1,) = _rows(out1).values()
    assert row1["rows"] == 16 and row1["format"] == "dense-with-zeros"  # 16 rows: max(0.8, 0.95)
    # 0.7 of 64 inputs keeps 20 per row (68.75% zeros): 16x1 blocks at batch 1 need 0.70 -> dense
    blk = sparsecomp.compress(nn.Linear(64, 64).eval(), (torch.randn(2, 64),),
                              Sparsify(sparsity=0.7, pattern="block", block=(16, 1)))
    assert _targets(blk) == [LINEAR]
    # 70% of 768 inputs is 69.9% zeros: within the slack of the 0.70 break-even -> sparse
    blk = sparsecomp.compress(nn.Linear(768, 32).eval(), (torch.randn(2, 768),),
                              Sparsify(sparsity=0.7, pattern="block", block=(16, 1)))
    assert _targets(blk) == [SPARSE_OPS["bsr"]]


def test_cost_model_table():
    assert cost_model.break_even("csr", 1) == (0.8, "csr")
    assert cost_model.break_even("csr", 4) == (0.8, "csr")  # between 1 and 8: the larger
    assert cost_model.break_even("csr", 10_000) == (0.95, "csr")
    assert cost_model.break_even("bsr16x1", 1) == (0.7, "bsr16x1")
    assert cost_model.break_even("bsr2x2", 1) == (0.8, "csr")  # unmeasured block: the CSR row
    assert cost_model.break_even("nm2:4", 8) == (None, "nm2:4")
    assert cost_model.break_even("nm1:8", 8) == (None, "nm1:8")
    assert cost_model.decide("bsr", 0.75, 1, block=(16, 1)).sparse
    assert not cost_model.decide("csr", 0.75, 1).sparse
    d = cost_model.decide("bsr", 0.75, 1, block=(2, 2))
    assert not d.sparse and "using the csr break-even" in d.reason
    assert cost_model.decide("nm", 0.5, 1, policy="always").sparse
    assert not cost_model.decide("csr", 0.99, 1, policy="never").sparse
    with pytest.raises(ValueError):
        cost_model.decide("csr", 0.5, 1, policy="sometimes")


def test_shared_weight_is_skipped():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = nn.Linear(32, 32)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    m = Tied().eval()
    x = torch.randn(2, 32)
    out = sparsecomp.compress(m, (x,), Sparsify(sparsity=0.9, cost_model="always"))
    assert SPARSE_OPS["csr"] not in _targets(out)
    assert out.sparsecomp_report[0]["modified"] is False
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x))


def test_wanda_prefers_high_norm_inputs():
    """With input features of very different scales, Wanda keeps the weights on the loud features."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval()
    scale = torch.ones(64)
    scale[:8] = 30.0  # outlier features, as in transformer activations
    calib = [torch.randn(16, 64) * scale for _ in range(4)]
    test = torch.randn(64, 64) * scale
    errs = {}
    for crit in ("magnitude", "wanda"):
        out = sparsecomp.compress(lin, (calib[0],), Sparsify(sparsity=0.5, criterion=crit, cost_model="never"),
                                  calibration=calib)
        with torch.no_grad():
            errs[crit] = _rel(out(test), lin(test))
        (row,) = _rows(out).values()
        assert row["relative_error"] > 0 and row["criterion"] == crit
    assert errs["wanda"] < 0.7 * errs["magnitude"]


def test_sparsity_zero_is_identity():
    model, x = _mlp()
    out = sparsecomp.compress(model, (x,), Sparsify(sparsity=0.0, cost_model="always"))
    assert _targets(out) == [LINEAR] * 3
    assert out.sparsecomp_report[0]["modified"] is False


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("kwargs", [
    dict(sparsity=1.0),
    dict(sparsity=-0.1),
    dict(sparsity=float("nan")),
    dict(sparsity=True),
    dict(),  # unstructured needs a sparsity
    dict(pattern="n:m", n=4, m=4),
    dict(pattern="n:m", n=3, m=2),
    dict(pattern="n:m", n=0, m=4),
    dict(pattern="n:m", sparsity=0.7),  # contradicts 1 - n/m
    dict(sparsity=0.5, pattern="block", block=(0, 4)),
    dict(sparsity=0.5, pattern="block", block=(4,)),
    dict(sparsity=0.5, pattern="2:4"),
    dict(sparsity=0.5, criterion="taylor"),
    dict(sparsity=0.5, cost_model="maybe"),
    dict(sparsity=0.5, batch_size=0),
    dict(sparsity=0.5, ignore=3),
])
def test_bad_configs(kwargs):
    with pytest.raises(ConfigError):
        Sparsify(**kwargs)


def test_layer_shape_errors_name_the_layer():
    model, x = _mlp()
    with pytest.raises(ConfigError, match=r"'head.weight'.*out_features=32 is not a multiple of r=3"):
        sparsecomp.compress(model, (x,), Sparsify(sparsity=0.5, pattern="block", block=(3, 1), ignore=("up", "down")))
    with pytest.raises(ConfigError, match=r"in_features=64 of 'up.weight' is not a multiple of m=6"):
        sparsecomp.compress(model, (x,), Sparsify(pattern="n:m", n=1, m=6))
    # ignoring the offending layers makes the same config valid
    ok = sparsecomp.compress(model, (x,), Sparsify(sparsity=0.5, pattern="block", block=(16, 1)))
    assert ok is not None


def test_config_round_trip(tmp_path):
    cfg = Sparsify(sparsity=0.7, pattern="block", block=(16, 1), criterion="wanda", ignore=("head",),
                   cost_model="always", batch_size=8)
    d = json.loads(cfg.to_json())
    assert d["type"] == "Sparsify" and d["block"] == [16, 1]
    assert config_from_dict(d) == cfg
    assert Sparsify.from_dict(d) == cfg
    nm = Sparsify(pattern="n:m", n=2, m=4)
    assert config_from_dict(json.loads(nm.to_json())) == nm
    yaml = pytest.importorskip("yaml")
    passes = [sparsecomp.StructuredPruning(ratio=0.25), sparsecomp.LowRank(rank_ratio=0.5), cfg]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"passes": [p.to_dict() for p in passes]}))
    assert load_recipe(str(path)) == passes


# ------------------------------------------------------------------------------------------------ composition
def test_structured_lowrank_sparsify_compose_in_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(8, 64)
    # LowRank's own cost model would keep these small layers dense: force the factorization
    force = {"cost_model": "always"} if "cost_model" in sparsecomp.LowRank.__dataclass_fields__ else {}
    first = [sparsecomp.StructuredPruning(ratio=0.25), sparsecomp.LowRank(rank_ratio=0.25, **force)]
    sp = Sparsify(sparsity=0.5, cost_model="always", ignore=("4",))
    out = sparsecomp.compress(model, (x,), [*first, sp])
    assert [r["pass"] for r in out.sparsecomp_report] == ["StructuredPruning", "LowRank", "Sparsify"]
    assert all(r["modified"] for r in out.sparsecomp_report)
    # reference: the first two passes, then the magnitude mask applied by hand to every linear weight
    ref = sparsecomp.compress(model, (x,), first)
    assert [n.target for n in ref.graph.nodes if n.op == "call_function" and n.target is LINEAR]
    ref_w = {}
    for node in ref.graph.nodes:
        if node.op == "call_function" and node.target is LINEAR:
            name = node.args[1].target
            if name.startswith("4."):
                continue
            w = get_attr(ref, name)
            ref_w[name] = (w * layer_mask(sp, scores(w, "magnitude"))).detach()
    assert any("_lr_" in name for name in ref_w)  # the LowRank factors were sparsified too
    rows = _rows(out)
    assert set(ref_w) == {k for k, r in rows.items() if "skipped" not in r}
    with torch.no_grad():
        for name, w in ref_w.items():
            get_attr(ref, name).copy_(w)
        for xb in (x, torch.randn(3, 64)):
            assert _rel(out(xb), ref(xb)) < 1e-5
    n_sparse = sum(1 for t in _targets(out) if t in SPARSE_TARGETS)
    assert n_sparse == len(ref_w) and _targets(out).count(LINEAR) == _targets(ref).count(LINEAR) - len(ref_w)


def test_zoo_transformer_rewrite():
    from sparsecomp.testing import zoo

    model, args, kwargs = zoo.build("hf_bert")
    captured = sparsecomp.capture(model, args, kwargs or None)
    cfg = Sparsify(pattern="n:m", cost_model="always")
    out = sparsecomp.compress(captured, None, cfg)
    # reference: the captured dense graph with every linear weight masked by hand
    ref = copy.deepcopy(captured.module)
    n_linear = 0
    for node in ref.graph.nodes:
        if node.op == "call_function" and node.target is LINEAR and node.args[1].op == "get_attr":
            w = get_attr(ref, node.args[1].target)
            w.data.mul_(layer_mask(cfg, scores(w, "magnitude")))
            n_linear += 1
    n_sparse = sum(1 for t in _targets(out) if t in SPARSE_TARGETS)
    assert n_sparse == n_linear == len(_rows(out)) > 10 and LINEAR not in _targets(out)
    with torch.no_grad():
        got = pytree.tree_leaves(out(*args, **kwargs))
        want = pytree.tree_leaves(ref(*args, **kwargs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(g, torch.Tensor) and g.is_floating_point():
            assert _rel(g, w) < 1e-5


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm():
    from sparsecomp.app.evaluate import load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES, HELDOUT_SENTENCES

    try:
        encoder = load_encoder()
    except sparsecomp.MissingDependencyError as exc:  # pragma: no cover - depends on the environment
        pytest.skip(str(exc))
    calib = encoder.inputs(BUILTIN_SENTENCES[:8], 32)
    held = encoder.inputs(HELDOUT_SENTENCES[:16], 32)
    return encoder.model, sparsecomp.capture(encoder.model, calib), calib, held


def _embedding_error(minilm, cfg) -> float:
    from sparsecomp.app.models import sentence_embeddings

    enc, captured, calib, (ids, mask) = minilm
    out = sparsecomp.compress(captured, None, cfg, calibration=[calib])
    with torch.no_grad():
        ref = sentence_embeddings(enc(ids, mask), mask)
        got = sentence_embeddings(out(ids, mask), mask)
    return _rel(got, ref)


@pytest.mark.parametrize("kw", [
    dict(sparsity=0.5),
    pytest.param(dict(pattern="n:m", n=2, m=4), marks=pytest.mark.slow),  # full table: benchmarks/minilm_sparsify.py
], ids=["50%", "2:4"])
def test_minilm_wanda_beats_magnitude(minilm, kw):
    """Real MiniLM weights and sentences: Wanda's activation-aware score loses less than magnitude."""
    errs = {c: _embedding_error(minilm, Sparsify(criterion=c, cost_model="never", **kw)) for c in ("magnitude", "wanda")}
    assert errs["wanda"] < errs["magnitude"], errs


# ------------------------------------------------------------------------------------------------ CLI recipe
def test_cli_multi_pass_recipe(tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    from sparsecomp.app.cli import main

    factory = tmp_path / "factory.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 16))\n"
        "    return m, (torch.randn(4, 64),)\n"
    )
    passes = [sparsecomp.StructuredPruning(ratio=0.25), sparsecomp.LowRank(rank_ratio=0.25),
              Sparsify(sparsity=0.9, pattern="block", block=(16, 1), criterion="wanda")]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"passes": [p.to_dict() for p in passes]}))
    out = tmp_path / "small.pt2"
    calib = tmp_path / "calib.pt"  # wanda is data-driven: without --calibration the CLI refuses the recipe
    torch.save([torch.randn(16, 64) for _ in range(4)], calib)
    assert main(["compress", f"{factory}:make", "--recipe", str(recipe), "-o", str(out)]) == 2
    assert "needs calibration data" in capsys.readouterr().err
    assert main(["compress", f"{factory}:make", "--recipe", str(recipe), "--calibration", str(calib),
                 "--report", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## 3. Sparsify (modified)" in text and "bsr 16x1" in text
    ep = torch.export.load(str(out))
    assert SPARSE_OPS["bsr"] in {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert ep.module()(torch.randn(3, 64)).shape == (3, 16)


def test_weight_held_in_a_buffer():
    class BufLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(32, 64))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w)

    torch.manual_seed(0)
    m = BufLinear().eval()
    x = torch.randn(2, 64)
    for policy, target in (("never", LINEAR), ("always", SPARSE_OPS["csr"])):
        out = sparsecomp.compress(m, (x,), Sparsify(sparsity=0.5, cost_model=policy))
        assert _targets(out) == [target]
        w = m.w * unstructured_mask(scores(m.w, "magnitude"), 0.5)
        with torch.no_grad():
            assert _rel(out(x), x @ w.T) < 1e-5
