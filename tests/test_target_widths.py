"""Issue 25.12: a backend-suitable round_to, from timings of widths (table entries filled by hand here,
measured in the last test)."""

from __future__ import annotations

import pytest
import torch

import sparsecomp
from sparsecomp.errors import ConfigError
from sparsecomp.target.latency import LatencyTable, OpKey, Timing, at_batch
from sparsecomp.target.widths import _with_width, representative_op, suitable_round_to

FAST = Timing(threads=1, warmup=1, repeats=3, min_time=0.02)
OP = OpKey.of("linear", rows=16, out=64, bias=1, **{"in": 32})


@pytest.fixture
def table(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path))
    t = LatencyTable("torch", FAST)
    t.entries["overhead:"] = 0.0
    return t


def _fill(table: LatencyTable, ms_of) -> None:
    for w in range(1, 65):
        table.entries[str(_with_width(OP, w))] = ms_of(w)


def test_widths_off_the_fast_path_raise_round_to(table):
    # multiples of 8 cost w; every other width costs as much as the next multiple of 8 plus 50 %
    _fill(table, lambda w: float(w) if w % 8 == 0 else 1.5 * (w // 8 + 1) * 8)
    choice = suitable_round_to(table, OP)
    assert choice.round_to == 8
    assert [w for w, _, fast in choice.widths if fast] == [8, 16, 24, 32]
    assert "round_to=8" in choice.summary() and table.misses == 0  # all from the table


def test_smooth_backend_keeps_every_width(table):
    _fill(table, lambda w: 0.1 + 0.01 * w)
    assert suitable_round_to(table, OP).round_to == 1


def test_representative_op_is_the_largest_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 64))
    cap = sparsecomp.capture(model, (torch.randn(2, 8),))
    assert str(representative_op(cap, at_batch(cap.example_args, 1))) == "linear:bias=1,in=16,out=64,rows=1"
    with pytest.raises(ConfigError, match="no linear"):
        representative_op(sparsecomp.capture(torch.nn.ReLU(), (torch.randn(2, 8),)), (torch.randn(1, 8),))


def test_measured_round_to_is_a_candidate(table):
    choice = suitable_round_to(table, OpKey.of("linear", rows=8, out=64, bias=1, **{"in": 64}), candidates=(1, 4, 8))
    assert choice.round_to in (1, 4, 8) and len(choice.widths) == 9 and table.misses == 9
