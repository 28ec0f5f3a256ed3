"""The sparse kernels' software prefetch: each kernel follows its ``Prefetch`` (numerics against torch,
and the prefetches it emits), the per-host plan is measured, saved, read back and used by lowering,
and bad settings / files are refused or reported."""

from __future__ import annotations

import json
import re

import pytest
import torch

tvm = pytest.importorskip("tvm")

import sparsecomp  # noqa: E402
from sparsecomp.backends.tvm import calibrate, frontend, kernels, target  # noqa: E402
from sparsecomp.backends.tvm.kernels import DEFAULT_PLAN, OFF, Prefetch, PrefetchPlan  # noqa: E402
from sparsecomp.app.cli import main  # noqa: E402
from sparsecomp.errors import ConfigError  # noqa: E402
from sparsecomp.ops import SparseLinear  # noqa: E402
from sparsecomp.ops.formats import pack  # noqa: E402

_PREFETCH = re.compile(r'"llvm\.prefetch", .*, 0, (\d), 1\)')


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test reads and writes plans in its own cache directory, never the user's."""
    monkeypatch.setenv(calibrate.CACHE_ENV, str(tmp_path / "cache"))


def _localities(func) -> list[int]:
    """The locality of every software prefetch a kernel emits."""
    return [int(m) for m in _PREFETCH.findall(func.script())]


def _host_has(feature: str) -> bool:
    return bool(tvm.target.codegen.target_has_features(feature, target.host_target()))


def _run(func, arrays, out_shape):
    exe = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target.host_target())
    dev = tvm.cpu()
    out = tvm.runtime.tensor(torch.zeros(out_shape).numpy(), dev)
    exe["main"](*[tvm.runtime.tensor(a.contiguous().numpy(), dev) for a in arrays], out)
    return torch.from_numpy(out.numpy())


def _pruned(n_out, k, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, c = block
    w = torch.randn(n_out, k, generator=g)
    keep = torch.rand(n_out // r, k // c, generator=g) < 0.35
    return w * keep.repeat_interleave(r, 0).repeat_interleave(c, 1)


def test_prefetch_configs_validate_on_construction():
    with pytest.raises(ValueError, match="distance"):
        Prefetch(-64)
    with pytest.raises(ValueError, match="distance"):
        Prefetch(2048.0)
    with pytest.raises(ValueError, match="locality"):
        Prefetch(2048, 0)
    with pytest.raises(TypeError, match="PrefetchPlan.csr"):
        PrefetchPlan(csr=2048)
    assert Prefetch(4096).ahead(64, 2) == 32 and Prefetch(64).ahead(4096) == 1 and OFF.ahead(64) == 0
    # tall blocks (r >= c, r >= 8) walk in lockstep; narrower or wider ones are the other walk
    plan = PrefetchPlan(narrow_blocks=Prefetch(1024), tall_blocks=Prefetch(4096, 3))
    assert plan.bsr(16, 1) == plan.bsr(8, 8) == Prefetch(4096, 3)
    assert plan.bsr(4, 4) == plan.bsr(1, 16) == plan.bsr(8, 16) == Prefetch(1024)


@pytest.mark.parametrize("block", [(16, 1), (1, 16),  # a tall walk, a narrow one (the 1xC kernel)
                                   pytest.param((8, 8), marks=pytest.mark.slow),
                                   pytest.param((4, 4), marks=pytest.mark.slow)])
def test_bsr_kernels_follow_their_prefetch(block):
    """Off: no prefetch at all; on: every prefetch with the plan's locality; the default plan as
    before (none for tall blocks, prefetcht1 for narrow ones). Numerics equal torch's either way."""
    r, c = block
    n_out, k = 48, 64
    w = _pruned(n_out, k, block)
    p = pack(w, "bsr", block=block)
    stored = [torch.from_numpy(a) for a in kernels.bsr_stored(p.col_indices.numpy(), p.values.numpy(), r, c)]
    bias = torch.randn(n_out)
    default = _localities(kernels.bsr_kernel(n_out, k, r, c, p.values.shape[0], "int32", parallel=False))
    assert default == ([] if r >= 8 and r >= c else [2] * len(default)) and (r >= 8 or default)
    xs = {batch: torch.randn(batch, k) for batch in (1, 3)}
    results = {}
    for pf in (OFF, Prefetch(4096, 3)):
        func = kernels.bsr_kernel(n_out, k, r, c, p.values.shape[0], "int32", parallel=False, pf=pf)
        got = _localities(func)
        assert got == [pf.locality] * len(got) and bool(got) == bool(pf.distance), (pf, got)
        for batch, x in xs.items():
            y = _run(func, [x, p.crow_indices.to(torch.int32), *stored, bias], (batch, n_out))
            torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-4, atol=1e-4, msg=f"{block} {pf} batch {batch}")
            results.setdefault(batch, []).append(y)
    for batch, (off, on) in results.items():  # a prefetch changes no arithmetic: bit-identical
        assert torch.equal(off, on), (block, batch)


def test_csr_and_nm_kernels_follow_their_prefetch():
    n_out, k = 40, 64
    w = _pruned(n_out, k, (1, 1), seed=1)
    bias = torch.randn(n_out)
    csr = pack(w, "csr")
    sell = kernels.sell_layout(csr.crow_indices.numpy(), csr.col_indices.numpy().astype("int16"), csr.values.numpy())
    assert set(_localities(kernels.csr_kernel(n_out, k, len(sell[0]) - 1, sell[1].shape[0], "int16",
                                              parallel=False))) == {2}
    x = torch.randn(1, k)
    ys = []
    for pf in (OFF, Prefetch(4096, 3)):
        func = kernels.csr_kernel(n_out, k, len(sell[0]) - 1, sell[1].shape[0], "int16", parallel=False, pf=pf)
        assert set(_localities(func)) == ({3} if pf.distance else set())
        y = _run(func, [x.T, *(torch.from_numpy(a) for a in sell), bias], (1, n_out))
        torch.testing.assert_close(y, x @ w.T + bias, rtol=1e-4, atol=1e-4)
        ys.append(y)
    assert torch.equal(ys[0], ys[1])  # bit-identical across plans
    if not _host_has("avx2"):
        return
    # N:M lanes: the lockstep walk of two groups follows the plan; the single-group walk (an odd
    # group count's last group, the parallel path) keeps prefetcht1 at PREFETCH_BYTES
    g = w.reshape(n_out, -1, 4)
    top = g.abs().argsort(-1)[..., 3:]
    wn = torch.zeros_like(g).scatter(-1, top, g.gather(-1, top)).reshape(n_out, k)
    pn = pack(wn, "nm", n=1, m=4)
    vals, pos = kernels.nm_lane_layout(pn.values.numpy(), pn.indices.numpy())
    assert set(_localities(kernels.nm_lanes_kernel(n_out, k, 1, 4, parallel=False))) == {2}
    xs = {batch: torch.randn(batch, k) for batch in (1, 2)}
    results = {}
    for pf in (OFF, Prefetch(4096, 3)):
        func = kernels.nm_lanes_kernel(n_out, k, 1, 4, parallel=False, pf=pf)
        assert (3 in _localities(func)) == bool(pf.distance)
        for batch, x in xs.items():
            y = _run(func, [x, torch.from_numpy(vals), torch.from_numpy(pos), bias], (batch, n_out))
            torch.testing.assert_close(y, x @ wn.T + bias, rtol=1e-4, atol=1e-4)
            results.setdefault(batch, []).append(y)
    assert all(torch.equal(off, on) for off, on in results.values())  # bit-identical across plans


def test_lowering_uses_the_saved_plan_for_its_target():
    """No plan saved: the default. A saved plan for the host: its CSR entry reaches the kernel. A
    target of another CPU does not pick up the host's plan."""
    layer = SparseLinear.from_dense(_pruned(24, 48, (1, 1)), torch.randn(24), format="csr")
    ep = sparsecomp.capture(layer, (torch.randn(2, 48),)).exported
    host = target.host_target()
    assert calibrate.plan_for() == DEFAULT_PLAN and not calibrate.plan_path().exists()
    mod, fired = frontend.import_program(ep, target=host)
    assert fired == {"csr": 1} and set(_localities(mod)) == {2}
    path = calibrate.save_plan(PrefetchPlan(csr=Prefetch(4096, 3)))
    assert path == calibrate.plan_path() and calibrate.plan_for().csr == Prefetch(4096, 3)
    mod, _ = frontend.import_program(ep, target=host)
    assert set(_localities(mod)) == {3}
    other = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    mod, _ = frontend.import_program(ep, target=other)
    assert set(_localities(mod)) == {2}
    low = sparsecomp.lower(layer, (torch.randn(2, 48),), backend="tvm")  # verified against torch
    x = torch.randn(1, 48)
    torch.testing.assert_close(low(x), layer(x), rtol=1e-4, atol=1e-4)


def test_plan_for_reports_and_ignores_a_bad_file():
    path = calibrate.plan_path()
    path.parent.mkdir(parents=True)
    for text in ("not json", json.dumps({"version": 999, "plan": {}}),
                 json.dumps({"version": 1, "plan": {"csr": {"distance": 100, "locality": 9}}})):
        path.write_text(text)
        with pytest.warns(UserWarning, match="ignoring the prefetch calibration"):
            assert calibrate.plan_for() == DEFAULT_PLAN


def test_calibrate_measures_saves_and_reads_back(monkeypatch):
    """A small, fast calibration (two candidates a walk): every walk timed, the faster of each pair
    chosen (``min_gain`` 0), the plan saved and read back by ``plan_for``."""
    small = {walk: (cands[0], Prefetch(4096, 3)) for walk, cands in calibrate.CANDIDATES.items()}
    monkeypatch.setattr(calibrate, "CANDIDATES", small)
    cases = calibrate._cases
    monkeypatch.setattr(calibrate, "_cases", lambda *a: cases(*a)[:1])  # one kernel shape a walk
    log = []
    result = calibrate.calibrate(shape=(64, 64), cold_bytes=1 << 20, rounds=1, calls=2, min_gain=0.0,
                                 log=log.append)
    walks = {"narrow_blocks", "tall_blocks", "csr"} | ({"nm"} if _host_has("avx2") else set())
    assert set(result.times) == walks and all(len(t) == 2 for t in result.times.values()) and len(log) == 4
    for walk, times in result.times.items():
        assert calibrate._label(getattr(result.plan, walk)) == min(times, key=times.__getitem__)
    assert result.path == calibrate.plan_path() and calibrate.plan_for() == result.plan
    saved = json.loads(result.path.read_text())
    assert saved["settings"]["shape"] == [64, 64] and set(saved["times_us"]) == walks
    assert result.table().count("| yes |") == len(walks)


def test_a_candidate_must_beat_the_default_by_min_gain():
    fast, default = Prefetch(4096, 3), Prefetch()
    assert calibrate._choose({default: 1.0, fast: 0.98}, default, 0.03) == default  # within noise
    assert calibrate._choose({default: 1.0, fast: 0.96}, default, 0.03) == fast
    assert calibrate._choose({default: 1.0, fast: 1.2}, default, 0.0) == default


def test_calibrate_refuses_bad_settings_and_other_cpus():
    host_cpu = target.host_target().attrs.get("mcpu")
    other = {"kind": "llvm", "mcpu": "skylake" if host_cpu != "skylake" else "znver3", "mtriple": "x86_64-linux-gnu"}
    with pytest.raises(ConfigError, match="another one"):
        calibrate.calibrate(other)
    with pytest.raises(ConfigError, match="multiples of 16"):
        calibrate.calibrate(shape=(60, 64))
    with pytest.raises(ConfigError, match="sparsity"):
        calibrate.calibrate(sparsity=1.0)
    with pytest.raises(ConfigError, match="rounds"):
        calibrate.calibrate(rounds=0)
    assert not calibrate.plan_path().exists()  # nothing half-done


def test_cli_calibrate_show(capsys):
    assert main(["calibrate", "--show"]) == 0
    out = capsys.readouterr().out
    assert "none: the default plan is used" in out and "PrefetchPlan(" in out
