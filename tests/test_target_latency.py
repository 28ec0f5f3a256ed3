"""The measured latency model (sparsecomp/target/latency.py): table keys, the on-disk cache, prediction
against end-to-end measurement. Timings run with 1 thread on a shared machine, so the tolerances are loose
on purpose and stated."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import sparsecomp
from sparsecomp.errors import ConfigError
from sparsecomp.target.latency import (LatencyModel, LatencyTable, OpKey, Timing, at_batch, measure_models, model_ops,
                                     table_path)

FAST = Timing(threads=1, warmup=2, repeats=5, min_time=0.05)


class MLP(torch.nn.Module):
    """Three residual MLP blocks: the linears are most of the time, as in a transformer's FFN."""

    def __init__(self, d: int = 256, hidden: int = 1024, blocks: int = 3) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(),
                                                              torch.nn.Linear(hidden, d)) for _ in range(blocks))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path))
    return tmp_path


def _captured(rows: int = 64):
    torch.manual_seed(0)
    return sparsecomp.capture(MLP().eval(), (torch.randn(2, rows, 256),))


def test_keys_are_deterministic_and_name_the_shape():
    cap = _captured()
    inputs = at_batch(cap.example_args, 1)
    first, second = model_ops(cap, inputs), model_ops(cap, inputs)
    assert [str(k) for _, k in first] == [str(k) for _, k in second]
    assert [str(k) for _, k in first][:2] == ["linear:bias=1,in=256,out=1024,rows=64",
                                              "linear:bias=1,in=1024,out=256,rows=64"]
    assert len(first) == 6  # two linears per block; GELU and the adds are the residual
    assert str(OpKey.of("linear", out=3, rows=2, bias=0, **{"in": 4})) == "linear:bias=0,in=4,out=3,rows=2"


def test_cache_miss_then_hit(cache):
    key = OpKey.of("linear", rows=8, out=32, bias=1, **{"in": 16})
    table = LatencyTable("torch", FAST)
    assert table.path.parent == cache and table.path == table_path("torch", 1)
    ms = table.ms(key)
    assert table.misses == 2 and table.hits == 0  # the op and the backend's per-call overhead
    saved = json.loads(table.path.read_text())
    assert saved["backend"] == "torch" and saved["threads"] == 1 and str(key) in saved["entries"]
    again = LatencyTable("torch", FAST)
    assert again.ms(key) == ms and again.misses == 0 and again.hits == 1
    assert table_path("torch", 2) != table_path("torch", 1)  # threads are part of the identity
    assert table_path("ort", 1) != table_path("torch", 1)


def test_malformed_cache_is_ignored_with_a_warning(cache):
    path = table_path("torch", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the latency cache"):
        table = LatencyTable("torch", FAST)
    assert table.entries == {}


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="backend must be one of"):
        LatencyTable("cuda", FAST)
    with pytest.raises(ConfigError, match="threads"):
        Timing(threads=0)
    with pytest.raises(ConfigError, match="at least one anchor"):
        LatencyModel.fit(LatencyTable("torch", FAST), [], ())


#: stated tolerance of a whole-model prediction on this MLP (1 thread, ~2-5 ms per call, shared 2-core
#: machine, models timed interleaved): measured errors 1-6 % in three runs; the rest is room for a noisy
#: neighbour
PREDICTION_TOLERANCE = 0.25


def test_prediction_within_tolerance_of_measurement(cache):
    cap = _captured()
    inputs = at_batch(cap.example_args, 1)
    pruned = {r: sparsecomp.compress(cap, cap.example_args, sparsecomp.StructuredPruning(ratio=r))
              for r in (0.25, 0.5, 0.75)}
    timing = Timing(threads=1, warmup=3, repeats=10, min_time=0.1, rounds=3)
    table = LatencyTable("torch", timing)
    tries = iter(range(1, 10))

    def errors() -> dict[float, dict]:
        nonlocal table
        # a fresh table per try: a burst while the per-op table is timed skews every prediction made from it
        # (a CI run missed by 58 % three times on one table; the whole-model re-measures alone cannot fix that)
        table = LatencyTable("torch", timing, path=cache / f"table_try{next(tries)}.json")
        measured = {name: s.median_ms for name, s in measure_models(
            {"dense": cap, **{str(r): m for r, m in pruned.items()}}, inputs, "torch", timing).items()}
        model = LatencyModel.fit(table, [cap, pruned[0.75]], inputs, measured=[measured["dense"], measured["0.75"]])
        assert len(model.anchors) == 2
        # not anchors: predicted from the table alone
        return {r: model.check(pruned[r], inputs, measured[str(r)]) for r in (0.25, 0.5)}

    checks = errors()
    for _ in range(2):  # re-measure: a neighbour's burst can hit one model of the interleaved run
        if all(abs(c["error"]) < PREDICTION_TOLERANCE for c in checks.values()):
            break
        checks = errors()
    for r, check in checks.items():
        assert abs(check["error"]) < PREDICTION_TOLERANCE, (r, check)
    model = LatencyModel.fit(table, [cap, pruned[0.75]], inputs, measured=[1.0, 0.5])
    # the prediction orders the models as their widths do
    preds = [model.predict(pruned[r], inputs).total_ms for r in (0.25, 0.5, 0.75)]
    assert preds[0] > preds[1] > preds[2]


def test_ort_table(cache):
    pytest.importorskip("onnxruntime")
    table = LatencyTable("ort", FAST)
    small, big = (OpKey.of("linear", rows=64, out=o, bias=1, **{"in": 256}) for o in (64, 1024))
    assert table.overhead() > 0
    assert table.ms(big) > table.ms(small)
    assert LatencyTable("ort", FAST).ms(big) == table.ms(big)  # read back from the ORT table's file
