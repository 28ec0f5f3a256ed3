"""Recover: distillation of a compressed graph from the original one (tiny models, seconds each)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp import ConfigError, LowRank, Recover, Sparsify, StructuredPruning
from sparsecomp.capture import capture
from sparsecomp.config import config_from_dict
from sparsecomp.passes.base import PassContext, run_pass
from sparsecomp.passes.recover.graphs import corresponding_blocks


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class ResMLP(nn.Module):
    """Residual blocks over a fixed-width stream (the LayerNorms keep it unpruned, as in a transformer)."""

    def __init__(self, d_in: int = 8, d: int = 16, h: int = 48, depth: int = 3, d_out: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(depth))
        self.out = nn.Linear(d, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def _teacher() -> ResMLP:
    torch.manual_seed(0)
    return ResMLP().eval()


def _data(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 8, generator=g) for _ in range(n)]


def _rel_error(model, teacher, xs) -> float:
    with torch.no_grad():
        num = sum(float(((model(x) - teacher(x)) ** 2).sum()) for x in xs)
        den = sum(float((teacher(x) ** 2).sum()) for x in xs)
    return num / den


def _report(model):
    return next(r for r in model.sparsecomp_report if r["pass"] == "Recover")["layers"]


@pytest.fixture(scope="module")
def teacher_capture():
    teacher = _teacher()
    return teacher, capture(teacher, (_data(1, 1)[0][:2],))


def _compress_then_recover(cap, cfg, calib, recover):
    """(compressed module, recovered module, Recover's report), the first pass run once."""
    small = run_pass(cap, cfg, calib).captured
    res = run_pass(small, recover, calib, PassContext(original=cap))
    return small.module, res.captured.module, res.report


FAST = dict(block_epochs=3, epochs=10, lr=3e-3, batch_size=16, eval_every=4, patience=20)


def test_config_validation_and_round_trip(tmp_path):
    cfg = Recover(epochs=2, block_epochs=1, budget_s=60, augment=["crop", "concat"], output_loss="cosine")
    assert cfg.augment == ("crop", "concat")
    assert config_from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(Exception):
        cfg.lr = 1.0
    for bad in (dict(lr=0), dict(output_loss="l1"), dict(schedule="step"), dict(augment=("flip",)),
                dict(val_fraction=1.0), dict(batch_size=0), dict(epochs=0, block_epochs=0), dict(budget_s=-1),
                dict(warmup=1.0)):
        with pytest.raises(ConfigError):
            Recover(**bad)


def test_blocks_found_from_the_graphs():
    teacher = _teacher()
    x = torch.randn(4, 8)
    cap = capture(teacher, (x,))
    pruned = run_pass(cap, StructuredPruning(ratio=0.5)).captured
    blocks, reason = corresponding_blocks(pruned.module, cap.module)
    assert blocks == ["blocks.0", "blocks.1", "blocks.2"] and reason == ""
    # a plain MLP has no chain of corresponding blocks: the block phase is skipped with the reason
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    c2 = capture(mlp, (x,))
    blocks, reason = corresponding_blocks(run_pass(c2, StructuredPruning(ratio=0.5)).captured.module, c2.module)
    assert blocks == [] and "no chain" in reason


def test_recovers_toward_the_teacher(teacher_capture):
    teacher, cap = teacher_capture
    calib, held_out = _data(8, 1), _data(4, 2)
    refit = run_pass(cap, StructuredPruning(ratio=0.6, criterion="l1", reconstruct=False), calib).captured.module
    rec = sparsecomp.compress(cap, None, [StructuredPruning(ratio=0.6, criterion="l1", reconstruct=False), Recover(**FAST)], calibration=calib)
    report = _report(rec)
    start, blockwise, e2e, result = report
    assert blockwise["phase"] == "block-wise" and blockwise["val_loss"] < start["val_loss"]
    assert result["val_loss"] < 0.5 * result["val_loss_start"]
    assert _rel_error(rec, teacher, held_out) < 0.5 * _rel_error(refit, teacher, held_out)
    assert teacher.blocks[0].up.weight.shape == (48, 16)  # the user's model is untouched
    w = "blocks.0.up.weight"
    assert rec.get_parameter(w).shape == refit.get_parameter(w).shape  # pruned widths stay


def test_a_budget_without_epochs_is_spent_and_epochs_alone_bound_the_phase(teacher_capture):
    """epochs=None with budget_s trains until the budget is spent (block phase at most BLOCK_SHARE of it);
    without a budget the end-to-end phase runs DEFAULT_EPOCHS; explicit epochs bound it under a budget."""
    from sparsecomp.passes.recover.config import BLOCK_SHARE, DEFAULT_EPOCHS
    _, cap = teacher_capture
    calib = _data(8, 1)  # 256 samples: 231 train, 15 steps per epoch at batch 16
    small = run_pass(cap, StructuredPruning(ratio=0.6, criterion="l1", reconstruct=False), calib).captured
    fast = dict(lr=3e-3, batch_size=16, patience=10_000)
    timed = run_pass(small, Recover(block_epochs=1, budget_s=6.0, **fast), calib, PassContext(original=cap)).report
    phases = {p["phase"]: p for p in timed}
    assert phases["block-wise"]["seconds"] <= BLOCK_SHARE * 6.0 + 0.5
    assert phases["result"]["seconds"] >= 0.85 * 6.0  # the budget is used, not 4 epochs and out
    assert phases["end-to-end"]["seconds"] >= 0.5 * 6.0 and not phases["end-to-end"]["early_stopped"]
    plain = run_pass(small, Recover(block_epochs=0, **fast), calib, PassContext(original=cap)).report
    assert next(p for p in plain if p["phase"] == "end-to-end")["steps"] == DEFAULT_EPOCHS * 15
    bounded = run_pass(small, Recover(block_epochs=0, epochs=2, budget_s=60.0, **fast), calib,
                       PassContext(original=cap)).report
    assert next(p for p in bounded if p["phase"] == "end-to-end")["steps"] == 2 * 15


@pytest.mark.parametrize("cfg", [
    Sparsify(sparsity=0.6, cost_model="never"),
    Sparsify(sparsity=0.6, cost_model="always"),
    Sparsify(sparsity=0.5, pattern="block", block=(4, 4), cost_model="always"),
    Sparsify(pattern="n:m", n=2, m=4, cost_model="always"),
], ids=["masked-dense", "csr", "bsr4x4", "nm2:4"])
def test_sparse_patterns_are_kept_exactly(cfg, teacher_capture):
    teacher, cap = teacher_capture
    calib = _data(6, 1)
    sparse, rec, _ = _compress_then_recover(cap, cfg, calib, Recover(**FAST))
    before = dict(sparse.named_buffers()) | dict(sparse.named_parameters())
    after = dict(rec.named_buffers()) | dict(rec.named_parameters())
    assert before.keys() == after.keys()
    changed = 0
    for name, t in before.items():
        a = after[name]
        assert a.shape == t.shape and a.dtype == t.dtype, name
        if not t.is_floating_point():  # index arrays of the packed formats
            assert torch.equal(a, t), name
        elif t.dim() >= 2 or "values" in name:
            assert torch.equal(a == 0, t == 0), name  # the zero pattern (mask) is exactly the same
        changed += not torch.equal(a, t)
    assert changed > 0
    assert _rel_error(rec, teacher, _data(4, 2)) < _rel_error(sparse, teacher, _data(4, 2))


def test_low_rank_stays_factored(teacher_capture):
    teacher, cap = teacher_capture
    low, rec, _ = _compress_then_recover(cap, LowRank(rank_ratio=0.25, cost_model="always"), _data(6, 1),
                                         Recover(**FAST))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.named_parameters()}  # noqa: E731
    assert any(k.endswith("_lr_a") for k in shapes(low))
    assert shapes(rec) == shapes(low)
    assert _rel_error(rec, teacher, _data(4, 2)) < _rel_error(low, teacher, _data(4, 2))


def test_early_stopping_keeps_the_better_model(teacher_capture):
    _, cap = teacher_capture
    bad = Recover(block_epochs=0, epochs=5, lr=5.0, eval_every=1, patience=2, warmup=0.0)
    pruned, rec, report = _compress_then_recover(cap, StructuredPruning(ratio=0.5), _data(6, 1), bad)
    *_, e2e, result = report
    assert e2e["early_stopped"] and e2e["steps"] == 2
    assert "starting weights" in result["kept"]
    assert rec is pruned  # the refit itself comes back


def test_deterministic_with_a_seed(teacher_capture):
    _, cap = teacher_capture
    calib = _data(4, 1)
    small = run_pass(cap, StructuredPruning(ratio=0.5, criterion="l1", reconstruct=False), calib).captured
    fast = dict(FAST, block_epochs=1, epochs=3)
    run = lambda seed: run_pass(small, Recover(**fast, seed=seed), calib,  # noqa: E731
                                PassContext(original=cap)).captured.module.state_dict()
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_needs_the_teacher_and_data():
    cap = capture(_teacher(), (torch.randn(2, 8),))
    with pytest.raises(sparsecomp.PassError, match="teacher"):
        run_pass(cap, Recover(), _data(2, 1))
    with pytest.raises((sparsecomp.PassError, ConfigError), match="calibration"):
        run_pass(cap, Recover(), None, PassContext(original=cap))
