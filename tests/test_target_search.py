"""compress_to_target: the target met as measured (or a clear error naming the best point), the report,
the plot, the user's model untouched. Torch backend, 1 thread, a residual MLP whose linears dominate."""

from __future__ import annotations

import json

import pytest
import torch

import sparsecomp
from sparsecomp import ConfigError, Target, TargetUnreachableError, compress_to_target

from test_target_latency import MLP


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _model():
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(2, 64, 256), [torch.randn(4, 64, 256) for _ in range(3)]


def test_target_config_validates_and_round_trips():
    t = Target(speedup=2.0, backend="ort", round_to=8)
    assert Target.from_dict(json.loads(t.to_json())) == t
    for bad in ({"speedup": 1.0}, {"speedup": 2, "backend": "gpu"}, {"speedup": 2, "batch": 0},
                {"speedup": 2, "tolerance": 0.5}, {"speedup": 2, "round_to": 0}, {"speedup": 2, "max_ratio": 1.0}):
        with pytest.raises(ConfigError):
            Target(**bad)
    with pytest.raises(ConfigError, match="no field"):
        Target.from_dict({"speedup": 2, "spedup": 3})


def test_bad_inputs_are_config_errors():
    m, x, _ = _model()
    with pytest.raises(ConfigError, match="needs a sparsecomp.Target"):
        compress_to_target(m, (x,), 2.0)
    with pytest.raises(ConfigError, match="template must be a StructuredPruning"):
        compress_to_target(m, (x,), Target(speedup=2.0), template=sparsecomp.LowRank(rank_ratio=0.5))


def test_target_met_as_measured(cache):
    m, x, calib = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = compress_to_target(m, (x,), Target(speedup=1.5, round_to=8, max_tries=4), calibration=calib, progress=False)
    # met, and met twice: the reported speedup was re-measured
    assert res.chosen.met and res.chosen.speedup >= 1.5 and res.chosen.remeasured_speedup >= 1.5
    assert res.report["met"] and res.report["chosen"]["mac_ratio"] == res.chosen.mac_ratio
    assert all(p.met == (p.speedup >= 1.5 and (p.remeasured_speedup or 0) >= 1.5) for p in res.points)
    # the chosen point is the most faithful met one
    assert res.chosen.output_error == min(p.output_error for p in res.points if p.met)
    # per-layer choices: widths are multiples of round_to and some layers shrank
    assert res.layers and all(row["chosen"][0] % 8 == 0 for row in res.layers if row["weight"].endswith("0.weight"))
    # the module is the compressed one; its output error is what the report says
    with torch.no_grad():
        ref, got = m(calib[0]), res.module(calib[0])
    assert got.shape == ref.shape and 0 < float((got - ref).norm() / ref.norm()) < 0.5
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    png = res.plot(cache / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "**chosen**" in res.table() and "| weight |" in res.layer_table()
    saved = json.loads(res.save_report(cache / "r.json").read_text())
    assert saved["latency_model"]["table_misses"] > 0 and len(saved["points"]) == len(res.points)


def test_recovery_after_the_search_is_measured_and_kept_only_when_it_holds(cache):
    """recover=Recover(...): the chosen pruning is distilled, re-measured end to end and returned when it
    still meets the target and its validation did not get worse; the report says what it bought."""
    m, x, _ = _model()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(8, 64, 256, generator=g) for _ in range(6)]
    with pytest.raises(ConfigError, match="needs calibration data"):
        compress_to_target(m, (x,), Target(speedup=1.5), recover=sparsecomp.Recover(epochs=1))
    with pytest.raises(ConfigError, match="needs a sparsecomp.Recover"):
        compress_to_target(m, (x,), Target(speedup=1.5), calibration=calib, recover=sparsecomp.LowRank(rank_ratio=0.5))
    rec = sparsecomp.Recover(block_epochs=0, epochs=8, lr=1e-3, batch_size=8, eval_every=2, patience=50)
    # a pruning without the refit leaves something to recover
    res = compress_to_target(m, (x,), Target(speedup=1.5, round_to=8, max_tries=3), calibration=calib,
                             progress=False, recover=rec,
                             template=sparsecomp.StructuredPruning(mac_ratio=0.5, criterion="fluctuation", reconstruct=False))
    r = res.report["recover"]
    assert r["config"]["type"] == "Recover" and r["seconds"] > 0 and r["phases"][-1]["phase"] == "result"
    assert r["kept"] == (r["measured_speedup"] >= 1.5 and r["val_loss_after"] <= r["val_loss_before"])
    # same widths as the chosen pruning, and when kept the returned module is the recovered one
    widths = {n: tuple(p.shape) for n, p in res.module.named_parameters()}
    assert all(tuple(row["chosen"]) == widths[row["weight"]] for row in res.layers)
    assert r["kept"] and r["val_loss_after"] < r["val_loss_before"]
    assert any(ph.get("phase") == "end-to-end" for ph in r["phases"])


def test_unreachable_target_names_the_best_point(cache):
    m, x, calib = _model()
    with pytest.raises(TargetUnreachableError, match=r"50x on torch was not reached after 1 compression\(s\) "
                       r"\(the next ratio \(0.500\) was already measured \(Target.max_ratio=0.5 reached\)\); "
                       r"the fastest model measured") as err:
        compress_to_target(m, (x,), Target(speedup=50.0, round_to=8, max_tries=2, max_ratio=0.5),
                           calibration=calib, progress=False)
    assert err.value.best["speedup"] == max(p["speedup"] for p in err.value.points)
    assert len(err.value.points) == 1 and not err.value.points[0]["met"]
    assert err.value.points[0]["mac_ratio"] == 0.5  # the first try is capped at max_ratio; no second one


def _pt(ratio: float, speedup: float):
    from sparsecomp.target.search import Point

    return Point(ratio, 8, 1.0, 1.0, 1.0, speedup, 0.0, None, None, False, 0.0)


def test_next_ratio_interpolates_measured_points():
    from sparsecomp.target.search import _next_ratio

    # dense (0, 1.0) and a point at 0.5 running at 1/2 the latency: 1/1.5 of the latency lies at 1/3 of the way
    assert abs(_next_ratio([_pt(0.5, 2.0)], 1 / 1.5, 0.9) - 1 / 3) < 1e-9
    # all points too slow: extrapolate from the two largest ratios, capped at max_ratio
    assert abs(_next_ratio([_pt(0.2, 1.25), _pt(0.4, 1 / 0.6)], 0.5, 0.9) - 0.5) < 1e-9
    assert _next_ratio([_pt(0.2, 1.25), _pt(0.4, 1 / 0.6)], 0.1, 0.7) == 0.7
    # a slower model at a larger ratio (noise): a fixed step up instead of a negative slope
    assert abs(_next_ratio([_pt(0.3, 1.2), _pt(0.4, 1.1)], 0.5, 0.9) - 0.5) < 1e-9
