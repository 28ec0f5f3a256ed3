"""`sparsecomp compress MODULE:FN --speedup S --backend B --calibration FILE -o OUT` at a small shape."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import sparsecomp
from sparsecomp.app.cli import main

FACTORY = textwrap.dedent("""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                                                  torch.nn.Linear(1024, 256)) for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    def make():
        torch.manual_seed(0)
        return MLP().eval(), (torch.randn(2, 64, 256),)
""")


@pytest.fixture
def factory(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "mlp_factory.py"
    path.write_text(FACTORY)
    calib = tmp_path / "calib.pt"
    torch.manual_seed(1)
    torch.save([torch.randn(4, 64, 256) for _ in range(3)], calib)
    return path, calib


def test_cli_speedup_writes_artefact_report_and_plot(factory, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    path, calib = factory
    out = tmp_path / "out"
    rc = main(["compress", f"{path}:make", "--speedup", "1.3", "--backend", "ort", "--calibration", str(calib),
               "--round-to", "8", "-q", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "target 1.3x met" in text and "saved:" in text
    report = json.loads((out / "report.json").read_text())
    assert report["met"] and report["chosen"]["remeasured_speedup"] >= 1.3 and report["target"]["backend"] == "ort"
    assert (out / "target.png").read_bytes()[:4] == b"\x89PNG"
    assert "**chosen**" in (out / "points.md").read_text()
    # the artefact is the chosen model in ONNX Runtime: it loads and computes what the compressed graph does
    loaded = sparsecomp.load(out / "model")
    x = torch.randn(1, 64, 256)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mlp_factory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dense, _ = mod.make()
    got = loaded(x)
    assert got.shape == (1, 64, 256)
    err = float((got - dense(x)).norm() / dense(x).norm())
    assert 0 < err < 0.5  # pruned: close to the dense model, not equal


def test_cli_speedup_refuses_a_fixed_ratio(factory, tmp_path, capsys):
    path, _ = factory
    assert main(["compress", f"{path}:make", "--speedup", "2", "--ratio", "0.5", "-o", str(tmp_path / "o")]) == 2
    assert "cannot be combined with --ratio" in capsys.readouterr().err
    assert main(["compress", f"{path}:make", "--speedup", "2"]) == 2
    assert "needs -o OUT" in capsys.readouterr().err
    assert main(["compress", f"{path}:make", "--speedup", "0.5", "-o", str(tmp_path / "o")]) == 2
    assert "Target.speedup must be a number > 1" in capsys.readouterr().err
    assert main(["compress", f"{path}:make", "--speedup", "2", "--recover", "60", "-o", str(tmp_path / "o")]) == 2
    assert "--recover needs --calibration FILE" in capsys.readouterr().err
    assert main(["compress", f"{path}:make", "--speedup", "2", "--recover", "-5", "-o", str(tmp_path / "o")]) == 2
    assert "must be a finite number > 0" in capsys.readouterr().err
