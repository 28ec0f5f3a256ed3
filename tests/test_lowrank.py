"""LowRank pass: factor math, rank choice, linear and conv rewrites, activation-aware (whitened / ASVD)
factorizations, the CPU cost model, global rank allocation, configs, and the real MiniLM."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecomp
from sparsecomp.config import config_from_dict
from sparsecomp.errors import ConfigError
from sparsecomp.passes.lowrank import LowRank
from sparsecomp.passes.lowrank.allocate import _Choice, allocate_global
from sparsecomp.passes.lowrank.factor import (_COST, asvd_scale, choose_rank, decompose, energy_rank, error_curve,
                                              factored_is_faster, lowrank_factors, max_fast_rank,
                                              relative_output_error, whitened_error_curve)
from sparsecomp.passes.lowrank.transform import _conv_args, _ints, conv_patches
from sparsecomp.testing import zoo

LINEAR = torch.ops.aten.linear.default
CONVS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
         torch.ops.aten.conv1d.padding, torch.ops.aten.conv2d.padding, torch.ops.aten.conv3d.padding,
         torch.ops.aten.convolution.default)


@pytest.fixture(autouse=True)
def _one_thread():
    # the SVDs here are small: on a loaded 2-core machine two threads make them 10-30x slower
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _count(gm, targets) -> int:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


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
        self.square = nn.Linear(64, 32)  # at rank_ratio 0.25 r=8: 8*96 < 2048 saves
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
    # whitened and ASVD-scaled factorizations are also exact at full rank
    x = torch.randn(200, shape[1]) @ torch.randn(shape[1], shape[1])
    a, b = lowrank_factors(w, min(shape), gram=x.double().T @ x.double())
    torch.testing.assert_close(b @ a, w, atol=1e-4, rtol=1e-4)
    a, b = lowrank_factors(w, min(shape), scale=asvd_scale(x.abs().mean(0)))
    torch.testing.assert_close(b @ a, w, atol=1e-5, rtol=1e-5)


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


@pytest.mark.parametrize("method", ["svd", "asvd", "activation"])
def test_error_curve_is_the_measured_output_error(method):
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    x = torch.randn(300, 40) * torch.logspace(0, -2, 40) @ torch.linalg.qr(torch.randn(40, 40))[0]
    g = x.double().T @ x.double()
    if method == "activation":
        dec = decompose(w, g, damping=1e-12)
        curve = whitened_error_curve(dec[1])
    elif method == "asvd":
        dec = decompose(w, scale=asvd_scale(x.abs().mean(0)))
        curve = error_curve(w, *dec, g)
    else:
        dec = decompose(w)
        curve = error_curve(w, *dec, g)
    assert curve.shape == (25,) and float(curve[24]) < 1e-6 and math.isclose(float(curve[0]), 1.0, rel_tol=1e-6)
    for r in (1, 5, 12, 23):
        a, b = lowrank_factors(w, r, gram=g if method == "activation" else None, damping=1e-12,
                               scale=dec[3] ** -1 if method == "asvd" else None)
        measured = float((x.double() @ (w.double() - (b @ a).double()).T).norm() / (x.double() @ w.double().T).norm())
        assert math.isclose(float(curve[r]), measured, rel_tol=1e-4, abs_tol=1e-7), (r, float(curve[r]), measured)
        assert math.isclose(relative_output_error(w, b @ a, g), measured, rel_tol=1e-4)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv_patches_is_im2col(d):
    torch.manual_seed(0)
    size = {1: (2, 5, 17), 2: (2, 5, 9, 11), 3: (2, 3, 6, 7, 5)}[d]
    kernel, stride, dil, pad = (3, 2, 2)[:d], (2, 1, 1)[:d], (1, 2, 1)[:d], (1, 0, 2)[:d]
    x = torch.randn(*size)
    w = torch.randn(7, size[1], *kernel)
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    y = conv(x, w, None, stride, pad, dil)  # [N, out, *L]
    p = conv_patches(x, kernel, stride, tuple((q, q) for q in pad), dil)
    got = (p @ w.reshape(7, -1).T).reshape(size[0], *y.shape[2:], 7).movedim(-1, 1)
    torch.testing.assert_close(got, y, atol=1e-5, rtol=1e-5)
    if d == 2:
        u = F.unfold(x, kernel, dilation=dil, padding=pad, stride=stride)
        torch.testing.assert_close(p, u.transpose(1, 2).reshape(-1, u.shape[1]))


def test_cost_model():
    # a big layer on many rows pays at half the params; a tiny layer on one row never does
    assert factored_is_faster(1536, 384, 100, 128)
    kappa, overhead = _COST["linear"]
    for r in (50, 100, 200):  # one row per call: the fixed overhead of the extra op matters
        assert factored_is_faster(1536, 384, r, 1) == (kappa * r * 1920 + overhead < 1536 * 384)
    assert not factored_is_faster(64, 64, 4, 1)
    assert not factored_is_faster(64, 64, 32, 10_000)  # r*(m+n) >= m*n: no saving at all
    assert max_fast_rank(64, 64, 1) == 0
    for m, n, rows, kind in ((384, 384, 128, "linear"), (1536, 384, 8, "linear"), (64, 576, 1024, "conv2d")):
        r = max_fast_rank(m, n, rows, kind)
        assert 0 < r < m * n / (m + n)
        assert factored_is_faster(m, n, r, rows, kind) and not factored_is_faster(m, n, r + 1, rows, kind)


def test_allocate_global_meets_budget_and_beats_uniform():
    # three layers: fast-decaying, slow-decaying and flat spectra (relative errors as functions of rank)
    def curve(decay, k=32):
        s = torch.tensor([decay ** i for i in range(k)], dtype=torch.float64)
        return whitened_error_curve(s)

    choices = [_Choice(curve(0.6), 64.0, 1024.0, 31), _Choice(curve(0.9), 64.0, 1024.0, 31),
               _Choice(curve(0.99), 64.0, 1024.0, 31)]
    budget = 0.5 * 3 * 1024
    ranks = allocate_global(choices, budget)
    cost = sum(c.dense if r == 0 else c.unit * r for c, r in zip(choices, ranks))
    err = sum(0.0 if r == 0 else float(c.err[r]) ** 2 for c, r in zip(choices, ranks))
    assert cost <= budget
    uniform_err = sum(float(c.err[8]) ** 2 for c in choices)  # r = 0.5 * 1024 / 64 everywhere: same budget
    assert err < uniform_err
    # the exact optimum over all rank triples (dense = 0) is not better
    best = min(
        sum(0.0 if r == 0 else float(c.err[r]) ** 2 for c, r in zip(choices, rs))
        for rs in itertools.product(range(32), repeat=3)
        if sum(c.dense if r == 0 else c.unit * r for c, r in zip(choices, rs)) <= budget
    )
    assert err <= best + 1e-3
    with pytest.raises(ConfigError, match="budget"):
        allocate_global(choices, 100.0)


# ------------------------------------------------------------------------------------------------ linear
def test_compress_factors_big_layers_only():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 64)
    calib = [torch.randn(512, 64)]  # 512 rows per call: factoring pays under the cost model
    before = sparsecomp.capture(model, (x,)).module
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25, ignore=("keep",)), calibration=calib)
    layers = _layers(out)

    for name in ("up.weight", "down.weight"):
        row = layers[name]
        assert "skipped" not in row, row
        assert row["rank"] == 16 and row["params_after"] == 16 * 320 < row["params_before"]
        assert 0 <= row["relative_error"] < 1 and row["op"] == "linear" and row["rows_per_call"] == 512
    assert layers["keep.weight"]["skipped"] == "ignored"
    assert "min_features" in layers["head.weight"]["skipped"]
    assert "skipped" not in layers["square.weight"]
    assert _count(out, LINEAR) == _count(before, LINEAR) + 3

    params = dict(out.named_parameters())
    assert "up.weight" not in params and "down.weight" not in params
    assert params["up.weight_lr_a"].shape == (16, 64) and params["up.weight_lr_b"].shape == (256, 16)
    assert "keep.weight" in params
    assert sum(p.numel() for p in out.parameters()) < sum(p.numel() for p in model.parameters())
    y = out(torch.randn(5, 64))  # dynamic batch kept
    assert y.shape == (5, 4)
    # the input model is untouched
    assert isinstance(model.up.weight, nn.Parameter) and model.up.weight.shape == (256, 64)


def test_cost_model_keeps_small_calls_dense():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(8, 64)  # 8 rows per call: the extra op's overhead outweighs the saved MACs
    before = sparsecomp.capture(model, (x,)).module
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25))
    layers = _layers(out)
    for name in ("up.weight", "down.weight", "keep.weight", "square.weight"):
        assert layers[name]["skipped"].startswith("not faster"), layers[name]
        assert "rows=8" in layers[name]["skipped"]
    assert out.sparsecomp_report[0]["modified"] is False
    assert _count(out, LINEAR) == _count(before, LINEAR)
    # switching the cost model off factors them anyway
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25, cost_model="always"))
    assert _count(out, LINEAR) == _count(before, LINEAR) + 4


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


@pytest.mark.parametrize("method", ["svd", "asvd", "activation"])
def test_full_rank_linear_is_identity(method):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 64)
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=1.0, method=method, cost_model="always",
                                                   min_features=1, ignore=("keep",)), calibration=x)
    assert _count(out, LINEAR) == _count(sparsecomp.capture(model, (x,)).module, LINEAR) + 4
    assert "keep.weight" in dict(out.named_parameters())  # the ignored layer did not fire
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=1e-5)


def test_exactly_low_rank_weights_are_reproduced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 32)).eval()
    with torch.no_grad():  # rank-4 weights: rank 8 (rank_ratio 0.25 of 32) loses nothing
        model[0].weight.copy_(torch.randn(256, 4) @ torch.randn(4, 32) / 4)
        model[2].weight.copy_(torch.randn(32, 4) @ torch.randn(4, 256) / 16)
    x = torch.randn(8, 32)
    out = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25), calibration=[torch.randn(1024, 32)])
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
    for method in ("svd", "asvd", "activation"):
        out = sparsecomp.compress(model, (calib[0],), LowRank(rank_ratio=0.125, method=method), calibration=calib)
        row = _layers(out)["0.weight"]
        assert row["method"] == method
        errs[method] = row["relative_error"]
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
    assert errs["activation"] <= errs["asvd"] < errs["svd"], errs


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
    model, args, kwargs = zoo.build("hf_bert")
    out = sparsecomp.compress(model, args, LowRank(param_ratio=0.5, cost_model="always"), example_kwargs=kwargs)
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


# ------------------------------------------------------------------------------------------------ conv
class ConvNet(nn.Module):
    """kxk and 1x1 convs with stride/padding/dilation, 'same' padding, aten.convolution, 1d and 3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(16, 48, 3, stride=2, padding=2, dilation=2)
        self.c2 = nn.Conv2d(48, 32, 1)
        self.c3 = nn.Conv2d(32, 32, 3, padding="same", bias=False)
        self.raw = nn.Parameter(torch.randn(24, 32, 3, 3) / 10)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.c1d = nn.Conv1d(24, 32, 5, padding=1)
        self.c3d = nn.Conv3d(4, 40, (3, 3, 2), stride=(1, 2, 1))

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c3(self.c2(h)))
        h = torch.ops.aten.convolution(h, self.raw, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
        h = self.grouped(h)                      # [B, 24, 8, 8]
        s = self.c1d(h.flatten(2)).mean(-1)      # [B, 32]
        v = self.c3d(h.reshape(h.shape[0], 4, 6, 8, 8)).mean((2, 3, 4))  # [B, 40]
        return torch.cat([s, v], 1)


def _geometry(node) -> tuple:
    """(stride, padding, dilation, groups) of a conv node, defaults filled in (export drops them)."""
    d, stride, padding, dilation, groups, _ = _conv_args(node)

    def norm(v):
        return v if isinstance(v, str) else tuple(_ints(v, d, "", node))

    return norm(stride), norm(padding), norm(dilation), groups


def _factored_convs(out) -> dict[str, tuple]:
    """For each ``*_lr_b`` parameter: (outer node, inner node) of its factored conv pair."""
    pairs = {}
    for n in out.graph.nodes:
        if n.op == "call_function" and n.target in CONVS and n.args[1].op == "get_attr" \
                and n.args[1].target.endswith("_lr_b"):
            pairs[n.args[1].target] = (n, n.args[0])
    return pairs


def test_conv_rewrite_structure_and_numerics():
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 16, 16, 16)
    captured = sparsecomp.capture(model, (x,))
    before = captured.module
    out = sparsecomp.compress(captured, None, LowRank(rank_ratio=0.5, cost_model="always", ignore=("c2",)))
    layers = _layers(out)
    assert layers["grouped.weight"]["skipped"] == "grouped convolution (groups=4; not factored)"
    assert layers["c2.weight"]["skipped"] == "ignored"
    fired = {k for k, r in layers.items() if "skipped" not in r}
    assert fired == {"c1.weight", "c3.weight", "raw", "c1d.weight", "c3d.weight"}
    assert _count(out, CONVS) == _count(before, CONVS) + len(fired)
    assert layers["c3d.weight"]["op"] == "conv3d" and layers["c3d.weight"]["rank"] == 20  # ceil(0.5 * min(40, 4*3*3*2))
    pairs = _factored_convs(out)
    outer, inner = pairs["c1.weight_lr_b"]
    # the kxk conv keeps stride/padding/dilation and has no bias; the 1x1 conv has the bias
    assert inner.args[1].target == "c1.weight_lr_a" and inner.args[2] is None
    assert _geometry(inner) == ((2, 2), (2, 2), (2, 2), 1)
    assert outer.args[2].target == "c1.bias" and _geometry(outer) == ((1, 1), (0, 0), (1, 1), 1)
    r = layers["c1.weight"]["rank"]
    assert r == 24  # ceil(0.5 * min(48, 16*3*3))
    assert tuple(out.get_parameter("c1.weight_lr_a").shape) == (r, 16, 3, 3)
    assert tuple(out.get_parameter("c1.weight_lr_b").shape) == (48, r, 1, 1)
    assert pairs["c3.weight_lr_b"][1].args[4] == "same" and _geometry(pairs["c3.weight_lr_b"][0])[1] == (0, 0)
    assert pairs["raw_lr_b"][0].target is torch.ops.aten.convolution.default
    # numerics: the rewrite computes exactly the model with each weight replaced by its B @ A
    ref = ConvNet().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("c1", "c3", "c1d", "c3d"):
            a = out.get_parameter(f"{name}.weight_lr_a")
            b = out.get_parameter(f"{name}.weight_lr_b")
            getattr(ref, name).weight.copy_((b.flatten(1) @ a.flatten(1)).reshape(getattr(ref, name).weight.shape))
        ref.raw.copy_((out.get_parameter("raw_lr_b").flatten(1) @ out.get_parameter("raw_lr_a").flatten(1)).reshape(24, 32, 3, 3))
    x2 = torch.randn(3, 16, 16, 16)
    torch.testing.assert_close(out(x2), ref(x2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "conv1d_net", "conv3d_net", "unet_small"])
def test_zoo_conv_full_rank_matches_eager(name):
    model, args, kwargs = zoo.build(name)
    captured = sparsecomp.capture(model, args, kwargs)  # compress never mutates it
    before = captured.module
    out = sparsecomp.compress(captured, None, LowRank(rank_ratio=1.0, cost_model="always", min_features=1))
    layers = list(_layers(out).values())
    fired = [r for r in layers if "skipped" not in r]
    skipped = [r for r in layers if "skipped" in r]
    assert fired and all(r["relative_error"] < 1e-6 for r in fired)
    assert all(r["skipped"].startswith(("grouped convolution", "transposed convolution")) for r in skipped), skipped
    if name == "unet_small":
        assert any(r["skipped"].startswith("transposed") for r in skipped)
    assert _count(out, CONVS + (LINEAR,)) == _count(before, CONVS + (LINEAR,)) + len(fired)
    with torch.no_grad():
        ref = model(*args, **kwargs)
        got = out(*args, **kwargs)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["asvd", "activation"])
def test_conv_activation_error_is_measured_on_patches(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 64, 3, padding=1, bias=False)
    model = nn.Sequential(conv).eval()
    basis = torch.linalg.qr(torch.randn(16, 16))[0]
    calib = [(torch.randn(4, 10, 10, 16) * torch.logspace(0, -3, 16) @ basis.T).permute(0, 3, 1, 2).contiguous()
             for _ in range(2)]
    errs = {}
    for m in ("svd", method):
        out = sparsecomp.compress(model, (calib[0],), LowRank(rank_ratio=0.125, method=m), calibration=calib)
        row = _layers(out)["0.weight"]
        assert row["op"] == "conv2d" and row["rank"] == 8 and row["rows_per_call"] == 400
        with torch.no_grad():
            ref = torch.cat([model(c) for c in calib])
            got = torch.cat([out(c) for c in calib])
        measured = float((ref - got).norm() / ref.norm())
        assert math.isclose(measured, row["relative_error"], rel_tol=1e-3, abs_tol=1e-6)
        errs[m] = measured
    assert errs[method] < errs["svd"], errs


# ------------------------------------------------------------------------------------------------ global
class Mixed(nn.Module):
    """Layers with very different spectra: global allocation should spend rank where it matters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(96, 96)
        self.b = nn.Linear(96, 192)
        self.c = nn.Linear(192, 96)
        with torch.no_grad():  # a: nearly rank 4; b: decaying spectrum; c: flat (random)
            self.a.weight.copy_(torch.randn(96, 4) @ torch.randn(4, 96) / 4 + 0.01 * torch.randn(96, 96))
            u, _, vh = torch.linalg.svd(torch.randn(192, 96), full_matrices=False)
            self.b.weight.copy_(u @ torch.diag(torch.logspace(0, -2, 96)) @ vh)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("method,target", [("svd", "params"), ("activation", "params"), ("asvd", "macs")])
def test_global_allocation_meets_budget_and_beats_uniform(method, target):
    model = Mixed().eval()
    x = torch.randn(8, 96)
    calib = [torch.randn(256, 96)]
    res = {}
    for alloc in ("uniform", "global"):
        out = sparsecomp.compress(model, (x,), LowRank(param_ratio=0.4, method=method, allocation=alloc,
                                                       target=target), calibration=calib)
        rows = list(_layers(out).values())
        res[alloc] = (
            sum(r.get("params_after", r["params_before"]) for r in rows),
            sum(r.get("relative_error", 0.0) ** 2 for r in rows),
            {r["layer"]: r.get("rank", 0) if "skipped" not in r else 0 for r in rows},
        )
    total = sum(m.weight.numel() for m in (model.a, model.b, model.c))
    budget = 0.4 * total  # every layer sees the same 256 rows per call, so MACs and params budgets agree
    assert res["global"][0] <= budget, res
    assert res["uniform"][0] <= budget, res
    assert res["global"][1] < res["uniform"][1], res  # strictly better on this model
    assert res["global"][2]["a.weight"] < res["global"][2]["c.weight"]  # the near-rank-4 layer needs little


def test_global_reports_dense_layers_and_tiny_budget_error():
    model = Mixed().eval()
    x = torch.randn(8, 96)
    calib = [torch.randn(256, 96)]
    # at 0.9 the allocation keeps some layer dense (zero error) and squeezes the others
    out = sparsecomp.compress(model, (x,), LowRank(param_ratio=0.9, method="activation", allocation="global"),
                              calibration=calib)
    rows = _layers(out)
    assert any(r.get("skipped", "").startswith("global allocation: dense") for r in rows.values()), rows
    fired = [r for r in rows.values() if "skipped" not in r]
    assert fired and all(r["allocation"] == "global" for r in fired)
    with pytest.raises(ConfigError, match="budget"):
        sparsecomp.compress(model, (x,), LowRank(param_ratio=0.01, allocation="global", cost_model="always"),
                            calibration=calib)


# ------------------------------------------------------------------------------------------------ MiniLM
@pytest.fixture(scope="module")
def minilm():
    from sparsecomp.app.evaluate import load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES, HELDOUT_SENTENCES, sentence_embeddings

    encoder = load_encoder()
    model = encoder.model
    cal = encoder.inputs(BUILTIN_SENTENCES, seq_len=32)
    ev = encoder.inputs(HELDOUT_SENTENCES, seq_len=32)
    with torch.no_grad():
        ref = sentence_embeddings(model(*ev), ev[1])
    return model, cal, ev, ref, sentence_embeddings


def test_minilm_activation_beats_svd_on_embeddings_fast(minilm):
    """Real all-MiniLM-L6-v2, the linears of the first two layers at param_ratio 0.5, in eager (each weight replaced by its
    factors' product ``B @ A``, which is what the rewritten graph computes): held-out embeddings."""
    import copy

    model, cal, ev, ref, pool = minilm
    linears = {name: mod for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name.startswith(("model.encoder.layer.0.", "model.encoder.layer.1."))}
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [mod.register_forward_hook(hook(name)) for name, mod in linears.items()]
    with torch.no_grad():
        model(*cal)
    for h in handles:
        h.remove()
    assert len(grams) == 12
    errs = {}
    for method in ("svd", "activation"):
        approx = copy.deepcopy(model)
        with torch.no_grad():
            for name, mod in approx.named_modules():
                if name in linears:
                    m, n = mod.weight.shape
                    r = choose_rank(LowRank(param_ratio=0.5), m, n)
                    a, b = lowrank_factors(mod.weight, r, gram=grams[name] if method == "activation" else None)
                    mod.weight.copy_(b @ a)
            emb = pool(approx(*ev), ev[1])
        errs[method] = float((emb - ref).norm() / ref.norm())
    assert errs["activation"] < 0.85 * errs["svd"], errs


@pytest.mark.slow
def test_minilm_pass_activation_beats_svd_on_embeddings(minilm):
    """The pass itself on MiniLM (reduced: the six linears of the first encoder layer)."""
    model, cal, ev, ref, pool = minilm
    captured = sparsecomp.capture(model, cal)
    errs = {}
    for method in ("svd", "activation"):
        cfg = LowRank(param_ratio=0.3, method=method, ignore=("model.encoder.layer.[1-5].*", "*embeddings*"))
        out = sparsecomp.compress(captured, None, cfg, calibration=[cal])
        rows = [r for r in out.sparsecomp_report[0]["layers"] if "skipped" not in r]
        assert len(rows) == 6 and all(r["layer"].startswith("model.encoder.layer.0.") for r in rows)
        with torch.no_grad():
            emb = pool(out(*ev), ev[1])
        errs[method] = float((emb - ref).norm() / ref.norm())
    assert errs["activation"] < 0.85 * errs["svd"], errs


# ------------------------------------------------------------------------------------------------ configs
def test_config_round_trip():
    for cfg in (LowRank(rank_ratio=0.25, ignore=("lm_head", "*.query")),
                LowRank(energy=0.9, method="activation", min_features=8),
                LowRank(param_ratio=0.5),
                LowRank(param_ratio=0.5, method="asvd", allocation="global", target="macs", cost_model="always")):
        data = json.loads(cfg.to_json())
        assert data["type"] == "LowRank"
        back = config_from_dict(data)
        assert back == cfg
    assert LowRank(rank_ratio=0.5, ignore="x").ignore == ("x",)
    assert LowRank(energy=0.9, method="activation").needs_calibration
    assert LowRank(energy=0.9, method="asvd").needs_calibration
    assert not LowRank(energy=0.9).needs_calibration


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
    {"param_ratio": 0.5, "allocation": "greedy"},
    {"param_ratio": 0.5, "target": "flops"},
    {"rank_ratio": 0.5, "allocation": "global"},
    {"energy": 0.9, "allocation": "global"},
    {"param_ratio": 0.5, "cost_model": "yes"},
    {"param_ratio": 0.5, "cost_model": 1},
    {"param_ratio": 0.5, "cost_model": True},
    {"param_ratio": 0.5, "cost_model": False},
])
def test_bad_configs(kwargs):
    with pytest.raises(ConfigError):
        LowRank(**kwargs)


def test_from_dict_unknown_field():
    with pytest.raises(ConfigError):
        config_from_dict({"type": "LowRank", "rank_ratio": 0.5, "rank": 3})


def test_cost_model_is_the_sparsify_vocabulary():
    """cost_model takes Sparsify's strings; a bool names them; "never" keeps the rank-r weight dense."""
    with pytest.raises(ConfigError, match="'auto', 'always', 'never'"):
        LowRank(rank_ratio=0.5, cost_model=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 32)
    factored = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25, cost_model="always", min_features=8))
    dense = sparsecomp.compress(model, (x,), LowRank(rank_ratio=0.25, cost_model="never", min_features=8))
    assert sorted(n for n, _ in dense.named_parameters()) == sorted(n for n, _ in model.named_parameters())
    assert any(n.endswith("_lr_a") for n, _ in factored.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(dense(x), factored(x), rtol=1e-5, atol=1e-5)
        assert torch.linalg.matrix_rank(dense.get_parameter("0.weight")) == 8
