"""sparsecomp.report: per-pass tables built from ``sparsecomp_report``."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp.report import format_layers, format_report


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), torch.randn(4, 32)


def _table_rows(text: str) -> list[list[str]]:
    """Cells of the markdown table lines (header and separator included)."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]


def test_report_prints_and_returns_sparsify_table():
    model, x = _model()
    out = sparsecomp.compress(model, (x,), sparsecomp.Sparsify(sparsity=0.5, ignore=("2",)), calibration=[x])
    buf = io.StringIO()
    text = sparsecomp.report(out, file=buf)
    assert buf.getvalue() == text
    assert text.startswith("## 1. Sparsify (modified)\n")
    assert '"sparsity": 0.5' in text and '"type": "Sparsify"' in text  # the config
    assert "layers: 1 dense-with-zeros, 1 skipped" in text
    rows = _table_rows(text)
    header = rows[0]
    for col in ("layer", "shape", "format", "sparsity", "MACs", "MACs after", "bytes", "rel. error", "note"):
        assert col in header
    body = {r[0]: dict(zip(header, r)) for r in rows[2:]}
    assert set(body) == {"0.weight", "2.weight"}
    first = body["0.weight"]
    assert first["shape"] == "64x32" and first["format"] == "dense-with-zeros"
    assert first["sparsity"] == "0.500"
    assert "break-even" in first["note"]
    assert float(first["rel. error"]) > 0
    assert body["2.weight"]["note"] == "skipped: ignored" and body["2.weight"]["format"] == ""


def test_report_multi_pass_and_sparse_format():
    model, x = _model()
    out = sparsecomp.compress(model, (x,), [sparsecomp.StructuredPruning(ratio=0.25),
                                           sparsecomp.Sparsify(sparsity=0.9, cost_model="always")])
    text = sparsecomp.report(out, show=False)
    assert text.index("## 1. StructuredPruning") < text.index("## 2. Sparsify (modified)")
    sparsify_part = text[text.index("## 2. Sparsify"):]
    assert "layers: 2 csr" in sparsify_part
    body = _table_rows(sparsify_part)[2:]
    assert len(body) == 2 and all(r[2] == "csr" for r in body)
    # the pruned shape of the first layer (48 of 64 neurons kept) shows in the Sparsify table
    assert body[0][1] == "48x32"


def test_report_prints_to_stdout(capsys):
    model, x = _model()
    out = sparsecomp.compress(model, (x,), sparsecomp.Sparsify(pattern="n:m", cost_model="always"))
    text = sparsecomp.report(out)
    assert capsys.readouterr().out == text
    assert "nm 2:4" in text


def test_format_layers_unknown_keys_and_formatting():
    rows = [
        {"layer": "a.weight", "shape": [8, 4], "params_before": 1_500_000, "relative_error": 0.0123, "custom": "x"},
        {"layer": "b.weight", "shape": [4, 4], "skipped": "ignored"},
    ]
    text = format_layers(rows)
    cells = _table_rows(text)
    assert cells[0] == ["layer", "shape", "params", "rel. error", "custom", "note"]
    assert cells[2] == ["a.weight", "8x4", "1.50M", "1.230e-02", "x", ""]
    assert cells[3] == ["b.weight", "4x4", "", "", "", "skipped: ignored"]
    assert format_layers([]) == "(no layers)"


def test_format_report_accepts_list_and_rejects_garbage():
    text = format_report([{"pass": "X", "modified": False, "layers": []}])
    assert text.startswith("## 1. X (unchanged)") and "(no layers)" in text
    assert format_report([]) == "(no passes)\n"
    with pytest.raises(TypeError):
        format_report(["not a dict"])
    with pytest.raises(TypeError, match="sparsecomp_report"):
        sparsecomp.report(nn.Linear(2, 2))


def test_report_shows_resolved_settings_output_error_and_unknown_ops():
    class Erfcx(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(torch.special.erfcx(self.a(x)) + self.a(x)))

    with pytest.warns(UserWarning):
        out = sparsecomp.compress(Erfcx(), (torch.randn(4, 8),), sparsecomp.StructuredPruning(mac_ratio=0.3))
    text = sparsecomp.report(out, show=False)
    assert 'resolved (without calibration data): {"allocation": "uniform", "criterion": "l2", "reconstruct": false}' in text
    assert f"output error: {out.sparsecomp_report[0]['output_error']:.4g}" in text
    assert "ops without a rule (their dims were fixed)" in text and "aten.special_erfcx.default" in text
