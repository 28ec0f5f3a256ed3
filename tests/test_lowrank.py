"""LowRank pass: factor math, rank choice, graph rewrite, activation-aware whitening, configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp.config import config_from_dict
from sparsecomp.errors import ConfigError
from sparsecomp.passes.lowrank import (
    LowRank,
    choose_rank,
    decompose,
    energy_rank,
    lowrank_factors,
    relative_output_error,
)

LINEAR = torch.ops.aten.linear.default


def _n_linear(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR)


def _layers(out) -> dict[str, dict]:
    (rep,) = out.sparsecomp_report
    assert rep["pass"] == "LowRank"
    return {row["layer"]: row for row in rep["layers"]}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)
        self.keep = nn.Linear(64, 128)   # ignored by pattern
        self.square = nn.Linear(64, 32)  # at rank_ratio 0.25 r=8: 8*96 < 2048 saves; see no-saving test
        self.head = nn.Linear(32, 4)     # below min_features

    def forward(self, x):
        h = self.down(torch.relu(self.up(x)))
        h = self.keep(h)[..., :64] + h
        return self.head(torch.relu(self.square(h)))


# ------------------------------------------------------------------------------------------------ math
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (32, 32)])
def test_full_rank_reproduces_weight(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    a, b = lowrank_factors(w, min(shape))
    assert a.shape == (min(shape), shape[1]) and b.shape == (shape[0], min(shape))
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)
    # whitened factorization is also exact at full rank
    x = torch.randn(200, shape[1]) @ torch.randn(shape[1], shape[1])
    a, b = lowrank_factors(w, min(shape), gram=x.double().T @ x.double())
    torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=1e-4)


def test_truncated_svd_is_eckart_young():
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    s = torch.linalg.svdvals(w.double())
    a, b = lowrank_factors(w, 10)
    err = torch.linalg.norm(w.double() - (b @ a).double())
    assert math.isclose(float(err), float(s[10:].norm()), rel_tol=1e-4)


def test_rank_choice():
    assert choose_rank(LowRank(rank_ratio=0.25), 256, 64) == 16
    assert choose_rank(LowRank(rank_ratio=0.3), 10, 100) == 3
    assert choose_rank(LowRank(param_ratio=0.5), 64, 64) == 16  # 16 * 128 = 0.5 * 4096
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.7) == 2
    assert energy_rank(s, 1.0) == 3
    assert choose_rank(LowRank(energy=0.99), 4, 4, s) == 3


# ------------------------------------------------------------------------------------------------ the pass
def test_compress_factors_big_layers_only():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 64)
    before = sparsecomp.capture(model, (x,)).module
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25, ignore=("keep",)))
    layers = _layers(out)

    for name in ("up.weight", "down.weight"):
        row = layers[name]
        assert "skipped" not in row, row
        assert row["rank"] == 16 and row["params_after"] == 16 * 320 < row["params_before"]
        assert 0 <= row["relative_error"] < 1
    assert layers["keep.weight"]["skipped"] == "ignored"
    assert "min_features" in layers["head.weight"]["skipped"]
    assert "skipped" not in layers["square.weight"]
    assert _n_linear(out) == _n_linear(before) + 3

    params = dict(out.named_parameters())
    assert "up.weight" not in params and "down.weight" not in params
    assert params["up.weight_lr_a"].shape == (16, 64) and params["up.weight_lr_b"].shape == (256, 16)
    assert "keep.weight" in params
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    y = out(torch.randn(5, 64))  # dynamic batch kept
    assert y.shape == (5, 4)
    # the input model is untouched
    assert isinstance(model.up.weight, nn.Parameter) and model.up.weight.shape == (256, 64)


def test_no_saving_layer_left_dense():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 64)
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.8))
    layers = _layers(out)
    for name in ("up.weight", "down.weight", "keep.weight", "square.weight"):
        assert layers[name]["skipped"] == "no saving", layers[name]
    (rep,) = out.sparsecomp_report
    assert rep["modified"] is False
    torch.testing.assert_close(out(x), model(x))


def test_exactly_low_rank_weights_are_reproduced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 32)).eval()
    with torch.no_grad():  # rank-4 weights: rank 8 (rank_ratio 0.25 of 32) loses nothing
        model[0].weight.copy_(torch.randn(256, 4) @ torch.randn(4, 32) / 4)
        model[2].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 256) / 16)
    x = torch.randn(8, 32)
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25))
    layers = _layers(out)
    assert layers["0.weight"]["rank"] == 8 and layers["2.weight"]["rank"] == 8
    assert layers["0.weight"]["relative_error"] < 1e-5
    torch.testing.assert_close(out(x), model(x), atol=1e-4, rtol=1e-4)


def test_activation_beats_svd_on_correlated_inputs():
    torch.manual_seed(0)
    n = 64
    # inputs with a strongly non-isotropic covariance: a few directions carry nearly all the energy
    basis = torch.linalg.qr(torch.randn(n, n))[0]
    scales = torch.logspace(1, -3, n)
    model = nn.Sequential(nn.Linear(n, 128), nn.ReLU(), nn.Linear(128, n)).eval()
    calib = [torch.randn(64, n) * scales @ basis.T for _ in range(4)]
    errs = {}
    for method in ("svd", "activation"):
        out = sparsecomp.compress(model, (calib[0],), LowRank(rank_ratio=0.125, method=method), calibration=calib)
        errs[method] = _layers(out)["0.weight"]["relative_error"]
        # the reported error is the measured one on the calibration data
        test_x = torch.cat(calib)
        w = model[0].weight.detach()
        approx = (out.get_submodule("0").weight_lr_b @ out.get_submodule("0").weight_lr_a).detach()
        measured = float((test_x @ (w - approx).T).norm() / (test_x @ w.T).norm())
        assert math.isclose(measured, errs[method], rel_tol=1e-3, abs_tol=1e-6)
        held_out = torch.randn(256, n) * scales @ basis.T  # same distribution, unseen samples
        errs[method + "_held_out"] = float((held_out @ (w - approx).T).norm() / (held_out @ w.T).norm())
    assert errs["activation"] < 0.5 * errs["svd"], errs
    assert errs["activation_held_out"] < 0.5 * errs["svd_held_out"], errs


def test_activation_energy_criterion():
    torch.manual_seed(0)
    w = torch.randn(32, 48)
    x = torch.randn(100, 48) * torch.logspace(0, -4, 48)
    _, s, _, linv = decompose(w, x.double().T @ x.double())
    assert linv is not None
    r = energy_rank(s, 0.9)
    a, b = lowrank_factors(w, r, gram=x.double().T @ x.double())
    err = relative_output_error(w, b @ a, x.double().T @ x.double())
    assert err <= math.sqrt(0.1) + 1e-6


def test_hf_bert_param_ratio():
    from sparsecomp.testing import zoo

    model, args, kwargs = zoo.build("hf_bert")
    out = sparsecomp.compress(model, args, LowRank(param_ratio=0.5), example_kwargs=kwargs)
    layers = _layers(out)
    done = [r for r in layers.values() if "skipped" not in r]
    assert len(done) >= 24  # q, k, v, o, ffn up/down of 4 layers
    for r in done:
        assert r["params_after"] <= 0.5 * r["params_before"]
    with torch.no_grad():
        ref = model(*args, **kwargs)
        got = out(*args, **kwargs)
    assert [t.shape for t in got] == [t.shape for t in ref]
    assert all(torch.isfinite(t).all() for t in got)


# ------------------------------------------------------------------------------------------------ configs
def test_config_round_trip():
    for cfg in (LowRank(rank_ratio=0.25, ignore=("lm_head", "*.query")),
                LowRank(energy=0.9, method="activation", min_features=8),
                LowRank(param_ratio=0.5)):
        data = json.loads(cfg.to_json())
        assert data["type"] == "LowRank"
        back = config_from_dict(data)
        assert back == cfg
    assert LowRank(rank_ratio=0.5, ignore="x").ignore == ("x",)
    assert LowRank(energy=0.9, method="activation").needs_calibration


@pytest.mark.parametrize("kwargs", [
    {},
    {"rank_ratio": 0.5, "energy": 0.9},
    {"rank_ratio": 0.5, "param_ratio": 0.5},
    {"rank_ratio": 0.0},
    {"rank_ratio": 1.5},
    {"rank_ratio": float("nan")},
    {"rank_ratio": True},
    {"energy": 0.0},
    {"energy": 1.01},
    {"param_ratio": 1.0},
    {"param_ratio": -0.1},
    {"param_ratio": "0.5"},
    {"rank_ratio": 0.5, "method": "qr"},
    {"rank_ratio": 0.5, "min_features": 0},
    {"rank_ratio": 0.5, "min_features": 2.5},
    {"rank_ratio": 0.5, "ignore": (1,)},
    {"rank_ratio": 0.5, "damping": 0.0},
])
def test_bad_configs(kwargs):
    with pytest.raises(ConfigError):
        LowRank(**kwargs)


def test_from_dict_unknown_field():
    with pytest.raises(ConfigError):
        config_from_dict({"type": "LowRank", "rank_ratio": 0.5, "rank": 3})
