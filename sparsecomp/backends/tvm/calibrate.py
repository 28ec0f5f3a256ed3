"""Per-host choice of the sparse kernels' software prefetch, by measurement, kept in a cache.

At batch 1 a sparse linear streams its weights from DRAM once per call, and how close it comes to
the bandwidth bound depends on how the walk prefetches: how far ahead, into which cache level, and
whether the lockstep walks of tall blocks / N:M prefetch at all. The best answer differs between
CPUs (3072x768 at 90 %, cold, batch 1): on a Zen 3 ``prefetcht1`` 2 KiB ahead for narrow blocks and
CSR and nothing for the lockstep walks (the default :data:`.kernels.DEFAULT_PLAN`); on an AVX-512
Xeon the default left every format near 0.77-0.82 of the bound, and 4 KiB ahead everywhere with
``prefetcht0`` for CSR took them to 0.86-0.97.

:func:`calibrate` times each :data:`CANDIDATES` entry of each walk on a synthetic, cold weight (its
own shape and sparsity, not a benchmark's), on this machine, and keeps a candidate other than the
default only if it is at least ``min_gain`` faster. The plan is saved as JSON under
:func:`cache_dir` keyed by the target and the CPU model; :func:`plan_for` (used by every lowering)
reads it back, and falls back to the default when there is none. Run it once per machine:
``sparsecomp calibrate`` (about a minute) or ``calibrate()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import tvm

from ...errors import ConfigError
from ...cache import CACHE_ENV, cache_dir, cpu_model  # noqa: F401  (CACHE_ENV: re-exported for tests)
from . import kernels
from .kernels import DEFAULT_PLAN, Prefetch, PrefetchPlan
from .target import host_target, resolve_target
from .weights import WeightArena

__all__ = ["CANDIDATES", "Calibration", "cache_dir", "calibrate", "plan_for", "plan_path", "save_plan"]

_VERSION = 1

# per walk, the default first: the grid measured on the two hosts above (distances below 2 KiB and
# above 4 KiB were slower on both; prefetcht2 = prefetcht1 on x86)
CANDIDATES: dict[str, tuple[Prefetch, ...]] = {
    "narrow_blocks": (DEFAULT_PLAN.narrow_blocks, Prefetch(4096), Prefetch(2048, 3), Prefetch(4096, 3)),
    "tall_blocks": (DEFAULT_PLAN.tall_blocks, Prefetch(2048), Prefetch(4096), Prefetch(4096, 3)),
    "csr": (DEFAULT_PLAN.csr, Prefetch(4096), Prefetch(2048, 3), Prefetch(4096, 3)),
    "nm": (DEFAULT_PLAN.nm, Prefetch(2048), Prefetch(4096), Prefetch(4096, 3)),
}


def _key(target: tvm.target.Target) -> str:
    return hashlib.sha1(f"{target}|{cpu_model()}".encode()).hexdigest()[:16]


def plan_path(target: Any = None) -> Path:
    """Where the plan for ``target`` (default: the host) on this machine is kept."""
    return cache_dir() / f"prefetch-{_key(resolve_target(target))}.json"


def _prefetch_from(d: dict) -> Prefetch:
    return Prefetch(int(d["distance"]), int(d["locality"]))


def plan_for(target: Any = None) -> PrefetchPlan:
    """The calibrated plan for ``target`` (default: the host) on this machine; the default plan
    when none was calibrated. An unreadable cache file is reported (a warning) and ignored."""
    path = plan_path(target)
    if not path.exists():
        return DEFAULT_PLAN
    try:
        saved = json.loads(path.read_text())
        if saved.get("version") != _VERSION:
            raise ValueError(f"version {saved.get('version')!r}, expected {_VERSION}")
        return PrefetchPlan(**{name: _prefetch_from(d) for name, d in saved["plan"].items()})
    except Exception as err:  # noqa: BLE001 - any malformed file: fall back, say why
        warnings.warn(f"sparsecomp: ignoring the prefetch calibration {path} ({type(err).__name__}: {err}); "
                      "using the default plan. Run `sparsecomp calibrate` to redo it.", stacklevel=2)
        return DEFAULT_PLAN


def save_plan(plan: PrefetchPlan, target: Any = None, record: dict | None = None) -> Path:
    """Keep ``plan`` as the one :func:`plan_for` returns for ``target`` (default: the host) on this
    machine, with ``record`` (what was measured) beside it; written atomically. Returns the path."""
    tgt = resolve_target(target)
    path = plan_path(tgt)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": _VERSION, "target": str(tgt), "cpu": cpu_model(),
            "plan": {name: asdict(getattr(plan, name)) for name in CANDIDATES}, **(record or {})}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # never a half-written plan
    return path


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured: ``times[walk][candidate] = seconds`` per call (median),
    the chosen ``plan``, and ``path``, where it was saved (``None``: not saved)."""

    plan: PrefetchPlan
    times: dict = field(default_factory=dict)
    path: Path | None = None

    def table(self) -> str:
        """Markdown table: each walk's candidates, their time relative to the default, the choice."""
        lines = ["| walk | prefetch | us per call | vs default | chosen |", "|---|---|---|---|---|"]
        for walk, times in self.times.items():
            default = times[_label(CANDIDATES[walk][0])]
            chosen = _label(getattr(self.plan, walk))
            for label, t in times.items():
                lines.append(f"| {walk} | {label} | {t * 1e6:.1f} | {default / t:.2f}x | "
                             f"{'yes' if label == chosen else ''} |")
        return "\n".join(lines)


def _label(p: Prefetch) -> str:
    if not p.distance:
        return "none"
    return f"{p.distance} B, {'prefetcht0' if p.locality == 3 else 'prefetcht1' if p.locality == 2 else 'prefetcht2'}"


class _Case:
    """One kernel shape over cold copies of its packed weights: ``build(pf)`` -> a compiled kernel,
    ``args(i)`` -> its arguments on copy ``i``, ``check(y)`` -> max relative error."""

    def __init__(self, build: Callable, arrays: list, x: np.ndarray, bias_n: int, out_shape: tuple,
                 ref: np.ndarray, cold_bytes: int):
        self.build = build
        nbytes = sum(a.nbytes for a in arrays)
        self.n = max(2, -(-cold_bytes // nbytes))
        ts = WeightArena(list(arrays) * self.n).tensors
        k = len(arrays)
        self.copies = [ts[i * k:(i + 1) * k] for i in range(self.n)]
        self.order = np.random.default_rng(0).permutation(self.n)
        self.x, self.bias, self.y = WeightArena(
            [x, np.zeros(bias_n, np.float32), np.zeros(out_shape, np.float32)]).tensors
        self.ref = ref
        self.nbytes = nbytes

    def runner(self, f) -> Callable[[int], None]:
        x, bias, y, copies, order = self.x, self.bias, self.y, self.copies, self.order

        def run(calls: int, start: int) -> None:
            for c in range(calls):
                f(x, *copies[order[(start + c) % len(order)]], bias, y)

        f(x, *copies[0], bias, y)
        got = self.y.numpy()[:, : self.ref.shape[1]]
        err = float(np.abs(got - self.ref).max() / max(np.abs(self.ref).max(), 1e-30))
        if not err < 1e-4:
            raise RuntimeError(f"calibration kernel gave wrong results (max relative error {err:.2e})")
        return run


def _cases(walk: str, n_out: int, k: int, sparsity: float, cold_bytes: int, target) -> list:
    """The kernels timed for ``walk`` (their times are summed): two block shapes for the BSR walks,
    one for CSR and N:M. ``[]`` when the walk does not run on ``target`` (N:M lanes need AVX2)."""
    from ...ops.formats import pack

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n_out, k, generator=g)
    x = torch.randn(1, k, generator=g)

    def blocks(r: int, c: int) -> torch.Tensor:
        keep = torch.rand(n_out // r, k // c, generator=g) >= sparsity
        return w * keep.repeat_interleave(r, 0).repeat_interleave(c, 1)

    def bsr(r: int, c: int) -> _Case:
        wp = blocks(r, c)
        p = pack(wp, "bsr", block=(r, c))
        nnzb = p.values.shape[0]
        stored = kernels.bsr_stored(p.col_indices.numpy(), p.values.numpy(), r, c)
        return _Case(lambda pf: kernels.bsr_kernel(n_out, k, r, c, nnzb, "int32", parallel=False, pf=pf),
                     [p.crow_indices.numpy().astype(np.int32), *stored], x.numpy(), n_out, (1, n_out),
                     (x @ wp.T).numpy(), cold_bytes)

    if walk == "narrow_blocks":
        return [bsr(4, 4), bsr(1, 16)]
    if walk == "tall_blocks":
        return [bsr(16, 1), bsr(8, 8)]
    if walk == "csr":
        wp = blocks(1, 1)
        p = pack(wp, "csr")
        sptr, col, vals, perm = kernels.sell_layout(p.crow_indices.numpy(), p.col_indices.numpy().astype(np.int16),
                                                    p.values.numpy())
        bmi = bool(tvm.target.codegen.target_has_features("bmi", target))
        return [_Case(lambda pf: kernels.csr_kernel(n_out, k, len(sptr) - 1, col.shape[0], "int16",
                                                    parallel=False, bmi=bmi, pf=pf),
                      [sptr, col, vals, perm], x.T.contiguous().numpy(), n_out, (1, n_out), (x @ wp.T).numpy(),
                      cold_bytes)]
    n, m = 2, 8
    if not kernels.nm_lanes_supported(n_out, k, n, m, bool(tvm.target.codegen.target_has_features("avx2", target))):
        return []
    grouped = w.reshape(n_out, -1, m)
    top = grouped.abs().argsort(-1)[..., m - n:]
    wp = torch.zeros_like(grouped).scatter(-1, top, grouped.gather(-1, top)).reshape(n_out, k)
    p = pack(wp, "nm", n=n, m=m)
    vals, pos = kernels.nm_lane_layout(p.values.numpy(), p.indices.numpy())
    padded = vals.shape[0] * kernels.SELL_R
    return [_Case(lambda pf: kernels.nm_lanes_kernel(n_out, k, n, m, parallel=False, pf=pf), [vals, pos],
                  x.numpy(), padded, (1, padded), (x @ wp.T).numpy(), cold_bytes)]


def _choose(total: dict, default: Prefetch, min_gain: float) -> Prefetch:
    """The fastest of ``total`` (seconds per candidate) if it takes at most ``1 - min_gain`` of the
    default's time, else the default: a choice that measurement noise could have made is not made."""
    best = min(total, key=total.__getitem__)
    return best if total[best] <= (1.0 - min_gain) * total[default] else default


def _time(runners: dict, rounds: int, calls: int) -> dict:
    """Median seconds per call of each runner, over interleaved rounds (one untimed call first)."""
    samples: dict = {key: [] for key in runners}
    start = 0
    for _ in range(rounds):
        for key, run in runners.items():
            run(1, start)
            t0 = time.perf_counter()
            run(calls, start + 1)
            samples[key].append((time.perf_counter() - t0) / calls)
            start += calls + 1
    return {key: statistics.median(v) for key, v in samples.items()}


def calibrate(target: Any = None, *, save: bool = True, shape: tuple[int, int] = (4096, 1024),
              sparsity: float = 0.85, cold_bytes: int = 256 << 20, rounds: int = 9, calls: int = 20,
              min_gain: float = 0.03, log: Callable[[str], None] | None = None) -> Calibration:
    """Measure every :data:`CANDIDATES` entry of each walk on this machine; return (and with
    ``save``, keep for :func:`plan_for`) the fastest.

    Each walk's kernels run at batch 1, one thread, on a random ``shape`` weight at ``sparsity``
    (N:M: 2:8), over copies of the packed weights adding up to ``cold_bytes`` so that every call reads
    DRAM; candidates are timed in ``rounds`` interleaved rounds of ``calls`` calls, the median kept.
    A candidate replaces the default only when at least ``min_gain`` faster. ``target`` must be this
    machine's CPU (default: the host): a plan for another CPU cannot be measured here.
    """
    tgt = resolve_target(target)
    host = host_target()
    if target is not None and (tgt.attrs.get("mcpu") != host.attrs.get("mcpu")):
        raise ConfigError(f"calibrate measures this machine's CPU ({host.attrs.get('mcpu')}); "
                          f"target {tgt} is another one")
    n_out, k = shape
    if not (isinstance(n_out, int) and isinstance(k, int) and n_out % 16 == 0 and k % 16 == 0 and n_out > 0
            and k > 0):
        raise ConfigError(f"calibrate: shape must be two positive multiples of 16, got {shape!r}")
    if not 0.0 < sparsity < 1.0:
        raise ConfigError(f"calibrate: sparsity must be in (0, 1), got {sparsity!r}")
    if rounds < 1 or calls < 1 or cold_bytes < 0 or not 0.0 <= min_gain < 1.0:
        raise ConfigError("calibrate: rounds and calls must be >= 1, cold_bytes >= 0, min_gain in [0, 1)")
    say = log or (lambda _msg: None)
    chosen: dict[str, Prefetch] = {}
    times: dict[str, dict[str, float]] = {}
    for walk, candidates in CANDIDATES.items():
        cases = _cases(walk, n_out, k, sparsity, cold_bytes, tgt)
        if not cases:
            chosen[walk] = getattr(DEFAULT_PLAN, walk)
            say(f"{walk}: not used on this target, default kept")
            continue
        runners = {}
        for ci, case in enumerate(cases):
            for pf in candidates:
                f = tvm.compile(tvm.IRModule({"main": case.build(pf).with_attr("global_symbol", "main")}),
                                target=tgt)["main"]
                runners[(ci, pf)] = case.runner(f)
        t = _time(runners, rounds, calls)
        total = {pf: sum(t[(ci, pf)] for ci in range(len(cases))) for pf in candidates}
        chosen[walk] = _choose(total, candidates[0], min_gain)
        times[walk] = {_label(pf): total[pf] for pf in candidates}
        say(f"{walk}: " + ", ".join(f"{_label(pf)} {total[pf] * 1e6:.1f} us" for pf in candidates)
            + f" -> {_label(chosen[walk])}")
        del cases, runners
    plan = PrefetchPlan(**chosen)
    path = None
    if save:
        path = save_plan(plan, tgt, {
            "times_us": {w: {lbl: round(s * 1e6, 2) for lbl, s in ts.items()} for w, ts in times.items()},
            "settings": {"shape": list(shape), "sparsity": sparsity, "cold_bytes": cold_bytes,
                         "rounds": rounds, "calls": calls, "min_gain": min_gain},
            "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return Calibration(plan, times, path)
