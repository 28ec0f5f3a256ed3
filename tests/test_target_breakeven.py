"""Issue 25.6: Sparsify's cost decision uses the break-even table measured for its backend on this machine,
and the documented BREAK_EVEN table when nothing was measured (the report says which)."""

from __future__ import annotations

import pytest
import torch

import sparsecomp
from sparsecomp.errors import ConfigError
from sparsecomp.passes.sparsify import cost_model
from sparsecomp.target.breakeven import break_even_of, measure_break_even, measured_break_even
from sparsecomp.target.latency import Timing, machine_identity, table_path, write_json_cache

FAST = Timing(threads=1, warmup=1, repeats=3, min_time=0.02)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_break_even_of():
    assert break_even_of([0.5, 0.7, 0.9], [3.0, 1.0, 0.5], dense_ms=1.0) == 0.7
    assert break_even_of([0.5, 0.7, 0.9], [0.5, 2.0, 0.5], dense_ms=1.0) == 0.9  # must stay below from there on
    assert break_even_of([0.5, 0.9], [2.0, 1.5], dense_ms=1.0) is None


def _layer_rows(backend: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    x = torch.randn(2, 64)
    out = sparsecomp.compress(model, (x,), sparsecomp.Sparsify(sparsity=0.6, backend=backend))
    rows = [r for r in out.sparsecomp_report[0]["layers"] if "format" in r]
    return model, x, out, rows


def _save(backend: str, table: dict) -> None:
    write_json_cache(table_path(backend, 1, "breakeven"), machine_identity(backend, 1),
                     {k: [list(p) for p in v] for k, v in table.items()})


def test_sparsify_uses_measured_table_for_its_backend(cache):
    # nothing measured: the documented table (csr break-even 0.80 at 1 row) keeps 60 % dense
    model, x, out, rows = _layer_rows("torch")
    assert rows and all(r["format"] == "dense-with-zeros" for r in rows)
    assert all("< break-even 0.80" in r["reason"] and "this machine" not in r["reason"] for r in rows)
    # a table measured for torch on this machine says csr wins from 0.5: the same config now goes sparse
    _save("torch", {"csr": [[1, 0.5], [128, 0.9]]})
    _, _, out, rows = _layer_rows("torch")
    assert rows and all(r["format"] != "dense-with-zeros" for r in rows)
    assert all("break-even 0.50" in r["reason"] and "measurements of torch" in r["reason"] for r in rows)
    zeros = sparsecomp.compress(model, (x,), sparsecomp.Sparsify(sparsity=0.6, cost_model="never"))
    torch.testing.assert_close(out(x), zeros(x), rtol=1e-5, atol=1e-5)  # the sparse kernel = masked dense
    # ... and it is torch's table: ORT, with nothing measured, still uses the documented one
    _, _, _, rows = _layer_rows("ort")
    assert all(r["format"] == "dense-with-zeros" and "this machine" not in r["reason"] for r in rows)


def test_bad_backend_is_config_error():
    with pytest.raises(ConfigError, match="backend"):
        sparsecomp.Sparsify(sparsity=0.5, backend="gpu")
    with pytest.raises(ConfigError, match="threads"):
        sparsecomp.Sparsify(sparsity=0.5, threads=0)


def test_measure_break_even_saves_a_table_sparsify_reads(cache):
    table = measure_break_even("torch", FAST, formats=("csr",), rows=(1,), sparsities=(0.5, 0.95),
                               shape=(64, 64), progress=False)
    assert set(table) == {"csr"} and table["csr"][0][0] == 1 and table["csr"][0][1] in (None, 0.5, 0.95)
    assert measured_break_even("torch", 1) == table
    assert measured_break_even("torch", 2) is None
    got, source = cost_model.table_for("torch", 1)
    assert got == table and "this machine" in source
    assert cost_model.table_for("ort", 1) == (cost_model.BREAK_EVEN, cost_model.DOCUMENTED)
