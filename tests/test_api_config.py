"""Config validation and serialisation, capture behaviour and clear errors on bad input."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

import sparsecomp
from sparsecomp import CaptureError, ConfigError, StructuredPruning
from sparsecomp.config import config_from_dict, load_recipe


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, "0.5", True, 2])
def test_invalid_ratio_is_refused(bad):
    with pytest.raises(ConfigError, match="ratio"):
        StructuredPruning(ratio=bad)


def test_invalid_fields_are_refused():
    with pytest.raises(ConfigError, match="criterion"):
        StructuredPruning(criterion="magic")
    with pytest.raises(ConfigError, match="'importance' was renamed to 'criterion'"):
        StructuredPruning(importance="l2")
    with pytest.raises(ConfigError, match="'importance' was renamed to 'criterion'"):
        StructuredPruning.from_dict({"type": "StructuredPruning", "importance": "l2"})
    with pytest.raises(ConfigError, match="mac_ratio"):
        StructuredPruning(ratio=0.3, allocation="global", criterion="fluctuation")
    with pytest.raises(ConfigError, match="not both"):
        StructuredPruning(ratio=0.3, mac_ratio=0.3)
    with pytest.raises(ConfigError, match="granularity"):
        StructuredPruning(granularity="block")
    with pytest.raises(ConfigError, match="round_to"):
        StructuredPruning(round_to=0)
    with pytest.raises(ConfigError, match="per_layer"):
        StructuredPruning(per_layer={"fc": 1.5})


def test_config_is_frozen_and_round_trips(tmp_path):
    cfg = StructuredPruning(ratio=0.3, criterion="l2", ignore=["head*"], per_layer={"layer1": 0.1}, round_to=8)
    with pytest.raises(Exception):
        cfg.ratio = 0.9
    d = json.loads(cfg.to_json())
    assert config_from_dict(d) == cfg
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps([d]))
    assert load_recipe(str(path)) == [cfg]
    with pytest.raises(ConfigError, match="unknown config type"):
        config_from_dict({"type": "Nope"})
    with pytest.raises(ConfigError, match="no field"):
        StructuredPruning.from_dict({"type": "StructuredPruning", "ratoi": 0.2})


def test_yaml_recipe(tmp_path):
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"passes": [StructuredPruning(ratio=0.25).to_dict()]}))
    assert load_recipe(str(path)) == [StructuredPruning(ratio=0.25)]


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: torch.export refuses
            return x * 2
        return x


def test_uncapturable_model_gets_clear_error():
    with pytest.raises(CaptureError, match="_DataDependent"):
        sparsecomp.capture(_DataDependent(), (torch.randn(2, 3),))


class _FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(x.reshape(2, 6))  # hard-codes the batch size


def test_static_fallback_warns():
    with pytest.warns(UserWarning, match=r"pins x dim 0 \(= 2\)"):
        cap = sparsecomp.capture(_FixedBatch(), (torch.randn(2, 6),))
    assert not cap.dynamic and cap.input_dims() == [("x", (2, 6))]


def test_static_fallback_when_export_refuses_dynamic_dims_warns():
    with pytest.warns(UserWarning, match="static shapes"):
        cap = sparsecomp.capture(_FixedBatch(), (torch.randn(2, 6),), dynamic_dims=False)
    assert not cap.dynamic


def test_batch_one_example_gives_dynamic_batch():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    small = sparsecomp.compress(m, (torch.randn(1, 4),), StructuredPruning(ratio=0.5))
    assert small(torch.randn(7, 4)).shape == (7, 2)


def test_compress_rejects_non_configs():
    m = nn.Linear(3, 3)
    with pytest.raises(ConfigError):
        sparsecomp.compress(m, (torch.randn(2, 3),), [])
    with pytest.raises(ConfigError):
        sparsecomp.compress(m, (torch.randn(2, 3),), {"ratio": 0.5})


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_ignore_and_per_layer():
    x = torch.randn(4, 8)
    out = sparsecomp.compress(_mlp(), (x,), StructuredPruning(ratio=0.5, ignore=["2"]))
    # both hidden groups touch module "2": neither is pruned (the rule did not fire)
    params = dict(out.named_parameters())
    assert params["0.weight"].shape == (32, 8) and params["2.weight"].shape == (32, 32)
    out = sparsecomp.compress(_mlp(), (x,), StructuredPruning(ratio=0.5, per_layer={"0": 0.25}))
    params = dict(out.named_parameters())
    assert params["0.weight"].shape == (24, 8)  # the group touching module 0 uses the override
    assert params["4.weight"].shape == (4, 16)  # the other group uses the default ratio
    out = sparsecomp.compress(_mlp(), (x,), StructuredPruning(ratio=0.5, round_to=8, per_layer={"0": 0.3}))
    assert dict(out.named_parameters())["0.weight"].shape[0] % 8 == 0


def _half_dead_mlp():
    """``_mlp`` whose hidden neurons 0-15 of both layers are dead (zero in and out, bias 0): every
    criterion must remove exactly them at ratio 0.5."""
    m = _mlp()
    with torch.no_grad():
        for i in (0, 2):
            m[i].weight[:16] = 0.0
            m[i].bias[:16] = 0.0
            m[i + 2].weight[:, :16] = 0.0
    return m


@pytest.mark.parametrize("criterion", ["l1", "l2", "taylor", "activation"])
def test_criteria_remove_the_dead_neurons(criterion):
    m = _half_dead_mlp()
    x = torch.randn(4, 8)
    calib = [torch.randn(16, 8) for _ in range(3)] if criterion in ("taylor", "activation") else None
    out = sparsecomp.compress(m, (x,), StructuredPruning(ratio=0.5, criterion=criterion), calibration=calib)
    params = dict(out.named_parameters())
    torch.testing.assert_close(params["0.weight"], m[0].weight[16:], rtol=0, atol=0)  # exactly 16-31 kept
    torch.testing.assert_close(params["2.weight"], m[2].weight[16:, 16:], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(out(x), m(x), rtol=1e-6, atol=1e-6)


def test_random_criterion_is_seeded():
    x = torch.randn(4, 8)
    runs = [sparsecomp.compress(_mlp(), (x,), StructuredPruning(ratio=0.5, criterion="random", seed=s))
            for s in (0, 0, 1)]
    w = [dict(r.named_parameters())["0.weight"] for r in runs]
    assert w[0].shape == (16, 8) and torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_activation_importance_prefers_used_channels():
    """Channels whose inputs are always zero on calibration data are the ones removed."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        m[0].weight[:4] = 0.0  # neurons 0-3 are dead ...
        m[0].bias[:4] = -1.0
        m[2].weight[:, :4] = 10.0  # ... but have large outgoing weights (an l1 criterion keeps them)
    x = torch.randn(16, 4)
    act = sparsecomp.compress(m, (x,), StructuredPruning(ratio=0.5, criterion="activation"), calibration=x)
    l1 = sparsecomp.compress(m, (x,), StructuredPruning(ratio=0.5, criterion="l1"))
    torch.testing.assert_close(act(x), m(x), rtol=1e-5, atol=1e-5)  # only dead neurons removed: exact
    assert (l1(x) - m(x)).abs().max() > 1e-3



def test_exported_program_input_is_accepted():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    ep = torch.export.export(m, (torch.randn(3, 4),))
    small = sparsecomp.compress(ep, (torch.randn(3, 4),), StructuredPruning(ratio=0.5))
    assert small(torch.randn(3, 4)).shape == (3, 2)


def test_compressed_model_can_be_compressed_again():
    m = _mlp()
    x = torch.randn(4, 8)
    once = sparsecomp.compress(m, (x,), StructuredPruning(ratio=0.5))
    twice = sparsecomp.compress(once, (x,), StructuredPruning(ratio=0.5))
    assert dict(twice.named_parameters())["2.weight"].shape == (8, 8)
    assert twice(x).shape == (4, 4)


# ------------------------------------------------------------------------------------ no silent degradation
@pytest.mark.parametrize("cfg", [
    StructuredPruning(ratio=0.5, criterion="activation"),
    StructuredPruning(ratio=0.5, criterion="l2", reconstruct=True),
    StructuredPruning(mac_ratio=0.5, criterion="fluctuation", allocation="global"),
    sparsecomp.LowRank(rank_ratio=0.5, method="activation"),
    sparsecomp.Sparsify(sparsity=0.5, criterion="wanda"),
])
def test_data_driven_settings_without_calibration_are_refused(cfg):
    """The capture's example inputs are never calibration data behind the user's back."""
    with pytest.raises(ConfigError, match="needs calibration data"):
        sparsecomp.compress(_mlp(), (torch.randn(4, 8),), cfg)


def test_auto_resolves_to_data_free_default_without_calibration_and_recipe_with_it():
    x = torch.randn(4, 8)
    plain = sparsecomp.compress(_mlp(), (x,), StructuredPruning(mac_ratio=0.3))
    rep = plain.sparsecomp_report[0]
    assert rep["calibration"] == "none"
    assert {k: rep["resolved"][k] for k in ("criterion", "allocation", "reconstruct")} == {
        "criterion": "l2", "allocation": "uniform", "reconstruct": False}
    assert 0 < rep["uniform_fraction"] < 1
    data = sparsecomp.compress(_mlp(), (x,), StructuredPruning(mac_ratio=0.3),
                               calibration=[torch.randn(32, 8) for _ in range(2)])
    rep = data.sparsecomp_report[0]
    assert rep["calibration"] == "given"
    assert {k: rep["resolved"][k] for k in ("criterion", "allocation", "reconstruct")} == {
        "criterion": "fluctuation", "allocation": "sensitivity", "reconstruct": "all"}


def test_uniform_mac_ratio_reaches_the_mac_target():
    from sparsecomp.app.metrics import count_macs

    m, x = _mlp(), torch.randn(4, 8)
    dense = count_macs(m, (x,))
    for target in (0.2, 0.5):
        out = sparsecomp.compress(m, (x,), StructuredPruning(mac_ratio=target, allocation="uniform"))
        removed = 1 - count_macs(out, (x,)) / dense
        assert target <= removed < target + 0.1, (target, removed)


class _Erfcx(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.special.erfcx(self.a(x)))))  # erfcx: no op rule


def test_unknown_ops_that_freeze_groups_reach_the_user():
    with pytest.warns(UserWarning, match=r"aten.special_erfcx.default \(x1\).*144 parameters \(29.8 %"):
        out = sparsecomp.compress(_Erfcx(), (torch.randn(4, 8),), StructuredPruning(ratio=0.5))
    unknown = out.sparsecomp_report[0]["unknown_ops"]
    assert unknown["ops"] == {"aten.special_erfcx.default": 1}
    assert unknown["frozen_tensors"] == ["a.bias", "a.weight"] and unknown["frozen_params"] == 144


def test_no_unknown_op_warning_for_a_covered_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sparsecomp.compress(_mlp(), (torch.randn(4, 8),), StructuredPruning(ratio=0.1))
    assert "unknown_ops" not in out.sparsecomp_report[0]


def test_every_result_reports_its_output_error_and_warns_when_large():
    m, x = _mlp(), torch.randn(4, 8)
    with pytest.warns(UserWarning, match="output moved by .* on the example inputs"):
        out = sparsecomp.compress(m, (x,), StructuredPruning(ratio=0.75))
    with torch.no_grad():
        want = float((out(x) - m(x)).norm() / m(x).norm())
    assert out.sparsecomp_report[0]["output_error"] == pytest.approx(want, rel=1e-3)
    calib = [torch.randn(16, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = sparsecomp.compress(m, (x,), StructuredPruning(ratio=0.0), calibration=calib)
    assert same.sparsecomp_report[0]["output_error"] == 0.0
