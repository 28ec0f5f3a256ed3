"""A measured latency model per backend, per machine: per-op timings at the shapes that occur, cached.

What it is for: ``compress_to_target`` and ``Sparsify`` ask how long a model (or one op of it) takes on
the backend the user deploys to, on this machine, with the threads they deploy with. The answer is a
measurement, never a MAC count.

* :func:`measure_model` lowers a model to ``"torch"`` (the captured graph run eagerly), ``"ort"`` or
  ``"tvm"`` and times it (warm-up, repeats, median; threads set for the call).
* :class:`LatencyTable` holds per-op timings keyed by :class:`OpKey` (``"linear:rows=128,in=384,out=1536"``),
  each measured once by lowering a one-op module to the backend, and kept as JSON under
  :func:`cache_dir` keyed by the CPU model, the backend and its version, torch's version and the thread
  count (as :mod:`sparsecomp.backends.tvm.calibrate` keeps its prefetch plans). A key absent from the
  file is measured on first use (a *miss*) and saved; a present one is read back (a *hit*).
* :class:`LatencyModel` predicts a whole model's latency from the table: the backend's per-call overhead,
  plus the table time of every op in :data:`OP_BENCHES` at its shape (times a fitted ``scale``), plus a
  *residual* (everything the table does not time: norms, activations, adds, copies), both fitted on
  end-to-end measurements of anchor models (the dense one and a pruned one). :meth:`LatencyModel.check` compares a prediction with an end-to-end
  measurement and returns the relative error; ``compress_to_target`` reports it for every point.

Ops are found by running the captured graph once on the timing inputs (concrete shapes, also under a
dynamic capture). Timings are in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from ..app.metrics import LatencyStats, measure_latencies, measure_latency
from ..calibration.data import observe, progress_bar
from ..capture.export import Captured, capture
from ..errors import ConfigError
from ..cache import CACHE_ENV, cache_dir, cpu_model  # noqa: F401  (CACHE_ENV: re-exported for tests)

aten = torch.ops.aten

#: backends a latency can be measured on
BACKENDS = ("torch", "ort", "tvm")
_VERSION = 1


# ------------------------------------------------------------------------------------------------ timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """How a latency is measured: ``threads`` intra-op threads, ``warmup`` untimed calls, then at least
    ``repeats`` timed calls and ``min_time`` seconds; the median is the latency. Several models timed
    together (:func:`measure_models`) are interleaved over ``rounds`` rounds, which keeps their ratios
    stable on a shared machine."""

    threads: int = 1
    warmup: int = 3
    repeats: int = 15
    min_time: float = 0.2
    rounds: int = 1

    def __post_init__(self) -> None:
        for name in ("threads", "repeats", "rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"Timing.{name} must be a positive integer, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"Timing.warmup must be a non-negative integer, got {self.warmup!r}")
        if isinstance(self.min_time, bool) or not isinstance(self.min_time, (int, float)) or not (
                math.isfinite(self.min_time) and self.min_time >= 0):
            raise ConfigError(f"Timing.min_time must be a non-negative number of seconds, got {self.min_time!r}")


def check_backend(backend: Any) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def runner(model: Any, inputs: tuple, backend: str, threads: int = 1) -> Callable[..., Any]:
    """``model`` (a module or a ``Captured``) made callable on ``backend`` with ``threads`` threads.

    ``"torch"`` runs the captured graph (or the module) eagerly; ``"ort"`` / ``"tvm"`` go through
    :func:`sparsecomp.lower` (verified against torch on ``inputs``).
    """
    check_backend(backend)
    if backend == "torch":
        return model.module if isinstance(model, Captured) else model
    from ..backends.registry import lower

    if isinstance(model, Captured):  # a static capture at the timing shapes, as lower() does
        model = model.module
    return lower(model, inputs, backend=backend, num_threads=threads)


def time_call(fn: Callable[..., Any], inputs: tuple, timing: Timing = Timing()) -> LatencyStats:
    """Median latency of ``fn(*inputs)`` (torch threads set to ``timing.threads`` during the call)."""
    return measure_latency(fn, tuple(inputs), threads=timing.threads, warmup=timing.warmup,
                           repeats=timing.repeats, min_time=timing.min_time)


def measure_model(model: Any, inputs: tuple, backend: str, timing: Timing = Timing()) -> LatencyStats:
    """Lower ``model`` to ``backend`` and time it end to end on ``inputs``."""
    return time_call(runner(model, inputs, backend, timing.threads), inputs, timing)


def measure_models(models: Mapping[str, Any], inputs: tuple, backend: str,
                   timing: Timing = Timing()) -> dict[str, LatencyStats]:
    """Lower every model to ``backend`` and time them interleaved (``timing.rounds`` rounds, pooled)."""
    runners = {name: runner(m, inputs, backend, timing.threads) for name, m in models.items()}
    return measure_latencies(runners, tuple(inputs), threads=timing.threads, rounds=timing.rounds,
                             warmup=timing.warmup, repeats=timing.repeats, min_time=timing.min_time)


# ------------------------------------------------------------------------------------------------ op keys
@dataclasses.dataclass(frozen=True)
class OpKey:
    """One op at one shape: ``kind`` (a :data:`OP_BENCHES` kind) and its sorted ``(name, value)`` dims.

    ``str(key)`` is the table key, the same on every run: ``"linear:in=384,out=1536,rows=128"``.
    """

    kind: str
    dims: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, kind: str, **dims: int) -> "OpKey":
        return cls(kind, tuple(sorted((k, int(v)) for k, v in dims.items())))

    def __str__(self) -> str:
        return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.dims)

    def get(self, name: str) -> int:
        return dict(self.dims)[name]


@dataclasses.dataclass(frozen=True)
class OpBench:
    """How one ATen op is keyed and timed: ``key(args, out)`` from concrete values (``None``: not timed),
    ``build(key)`` a one-op module and its inputs."""

    key: Callable[[tuple, Any], OpKey | None]
    build: Callable[[OpKey], tuple[torch.nn.Module, tuple]]


def _rows(shape: Iterable[int]) -> int:
    return int(math.prod(int(s) for s in shape))


def _linear_key(args: tuple, out: Any) -> OpKey:
    x, w = args[0], args[1]
    bias = len(args) > 2 and args[2] is not None
    return OpKey.of("linear", rows=_rows(x.shape[:-1]), **{"in": int(w.shape[1])}, out=int(w.shape[0]),
                    bias=int(bias))


def _linear_build(key: OpKey) -> tuple[torch.nn.Module, tuple]:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Linear(key.get("in"), key.get("out"), bias=bool(key.get("bias")))
    return m.eval(), (torch.randn(key.get("rows"), key.get("in"), generator=g),)


def _conv2d_key(args: tuple, out: Any) -> OpKey | None:
    x, w = args[0], args[1]
    if x.dim() != 4:
        return None
    stride, padding, dilation = (tuple(args[i]) if len(args) > i else d for i, d in
                                 ((3, (1, 1)), (4, (0, 0)), (5, (1, 1))))
    if isinstance(padding, str) or len(set(stride)) > 1 or len(set(padding)) > 1 or len(set(dilation)) > 1:
        return None
    groups = int(args[6]) if len(args) > 6 else 1
    bias = len(args) > 2 and args[2] is not None
    return OpKey.of("conv2d", n=x.shape[0], cin=x.shape[1], h=x.shape[2], w=x.shape[3], cout=w.shape[0],
                    kh=w.shape[2], kw=w.shape[3], stride=stride[0], pad=padding[0], dil=dilation[0],
                    groups=groups, bias=int(bias))


class _Conv(torch.nn.Module):
    def __init__(self, key: OpKey) -> None:
        super().__init__()
        k = dict(key.dims)
        self.conv = torch.nn.Conv2d(k["cin"], k["cout"], (k["kh"], k["kw"]), stride=k["stride"], padding=k["pad"],
                                    dilation=k["dil"], groups=k["groups"], bias=bool(k["bias"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _conv2d_build(key: OpKey) -> tuple[torch.nn.Module, tuple]:
    k = dict(key.dims)
    g = torch.Generator().manual_seed(0)
    return _Conv(key).eval(), (torch.randn(k["n"], k["cin"], k["h"], k["w"], generator=g),)


def _sdpa_key(args: tuple, out: Any) -> OpKey | None:
    q, k, v = args[:3]
    if q.dim() != 4:
        return None
    mask = len(args) > 3 and isinstance(args[3], torch.Tensor)
    return OpKey.of("sdpa", b=q.shape[0], heads=q.shape[1], lq=q.shape[2], lk=k.shape[2], dk=q.shape[3],
                    dv=v.shape[3], mask=int(mask))


class _Sdpa(torch.nn.Module):
    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_build(key: OpKey) -> tuple[torch.nn.Module, tuple]:
    k = dict(key.dims)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(k["b"], k["heads"], k["lq"], k["dk"], generator=g)
    kk = torch.randn(k["b"], k["heads"], k["lk"], k["dk"], generator=g)
    v = torch.randn(k["b"], k["heads"], k["lk"], k["dv"], generator=g)
    inputs = (q, kk, v) + ((torch.zeros(k["b"], 1, k["lq"], k["lk"]),) if k["mask"] else ())
    return _Sdpa().eval(), inputs


#: ATen op -> how it is keyed and timed. Ops not here are part of a model's residual.
OP_BENCHES: dict[Any, OpBench] = {
    aten.linear.default: OpBench(_linear_key, _linear_build),
    aten.conv2d.default: OpBench(_conv2d_key, _conv2d_build),
    aten.scaled_dot_product_attention.default: OpBench(_sdpa_key, _sdpa_build),
}


class _AddOne(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


#: the key of the backend's per-call overhead (a one-element ``x + 1``), subtracted from every op timing
OVERHEAD = OpKey.of("overhead")


def model_ops(model: Any, inputs: tuple) -> list[tuple[str, OpKey]]:
    """Every timed op of ``model`` (a ``Captured`` or an fx ``GraphModule``) at ``inputs``: ``(node, key)``.

    The graph is run once node by node, so the shapes are concrete even when the capture is dynamic.
    """
    gm = model.module if isinstance(model, Captured) else model
    if not isinstance(gm, torch.fx.GraphModule):
        raise ConfigError(f"model_ops needs a captured graph, got {type(gm).__name__}")
    found: list[tuple[str, OpKey]] = []

    def hook(node: torch.fx.Node, value: Any, interp: Any) -> None:
        bench = OP_BENCHES.get(node.target) if node.op == "call_function" else None
        if bench is None:
            return
        args = tuple(interp.env[a] if isinstance(a, torch.fx.Node) else a for a in node.args)
        key = bench.key(args, value)
        if key is not None:
            found.append((node.name, key))

    observe(gm, tuple(inputs), {}, hook)
    return found


# ------------------------------------------------------------------------------------------------ cache
def backend_version(backend: str) -> str:
    try:
        if backend == "ort":
            import onnxruntime
            return onnxruntime.__version__
        if backend == "tvm":
            import tvm
            return tvm.__version__
    except ImportError:
        return "missing"
    return torch.__version__


def machine_identity(backend: str, threads: int) -> dict[str, Any]:
    """What a cached table is valid for: this CPU, this backend and version, torch's version, threads."""
    return {"cpu": cpu_model(), "backend": backend, "backend_version": backend_version(backend),
            "torch": torch.__version__, "threads": int(threads)}


def table_path(backend: str, threads: int = 1, kind: str = "latency") -> Path:
    """Where the ``kind`` table of ``backend`` at ``threads`` threads on this machine is kept."""
    ident = json.dumps(machine_identity(check_backend(backend), threads), sort_keys=True)
    return cache_dir() / f"{kind}-{backend}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.json"


def read_json_cache(path: Path, what: str) -> dict | None:
    """The ``entries`` of a cache file, ``None`` when absent; a malformed file is ignored with a warning."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {_VERSION}")
        return dict(data["entries"])
    except Exception as err:  # noqa: BLE001 - any malformed file: ignore it, say why
        warnings.warn(f"sparsecomp: ignoring the {what} cache {path} ({type(err).__name__}: {err}); "
                      "it will be measured again", stacklevel=3)
        return None


def write_json_cache(path: Path, identity: dict, entries: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": _VERSION, **identity, "entries": dict(sorted(entries.items()))}, indent=1))
    tmp.replace(path)  # never a half-written table


class LatencyTable:
    """Per-op latencies (ms, per-call overhead subtracted) of one backend on this machine, cached on disk.

    >>> table = LatencyTable("torch", Timing(threads=1))           # doctest: +SKIP
    >>> table.ms(OpKey.of("linear", rows=128, **{"in": 384}, out=1536, bias=1))  # doctest: +SKIP
    """

    def __init__(self, backend: str, timing: Timing = Timing(), path: Path | None = None) -> None:
        self.backend = check_backend(backend)
        self.timing = timing
        self.path = Path(path) if path is not None else table_path(backend, timing.threads)
        self.entries: dict[str, float] = {k: float(v) for k, v in (read_json_cache(self.path, "latency") or {}).items()}
        self.hits = 0
        self.misses = 0

    def _measure(self, key: OpKey) -> float:
        if key == OVERHEAD:
            module, inputs = _AddOne().eval(), (torch.zeros(2, 1),)
        else:
            module, inputs = OP_BENCHES_BY_KIND[key.kind].build(key)
        return time_call(runner(module, inputs, self.backend, self.timing.threads), inputs, self.timing).median_ms

    def overhead(self) -> float:
        """The backend's per-call overhead (ms): a one-element ``x + 1``."""
        return self.ms(OVERHEAD, subtract_overhead=False)

    def ms(self, key: OpKey, subtract_overhead: bool = True) -> float:
        """Latency of ``key`` (measured now and saved on a miss)."""
        name = str(key)
        if name in self.entries:
            self.hits += 1
        else:
            self.misses += 1
            raw = self._measure(key)
            over = self.overhead() if subtract_overhead else 0.0
            self.entries[name] = max(raw - over, 0.0)
            self.save()
        return self.entries[name]

    def measure_all(self, keys: Iterable[OpKey], progress: bool = False) -> None:
        """Make sure every key is in the table (measuring the missing ones, with a progress bar)."""
        missing = sorted({str(k): k for k in keys if str(k) not in self.entries}.items())
        for _, key in progress_bar(missing, f"latency table ({self.backend})", progress and len(missing) > 1):
            self.ms(key)

    def save(self) -> None:
        write_json_cache(self.path, machine_identity(self.backend, self.timing.threads), self.entries)


OP_BENCHES_BY_KIND: dict[str, OpBench] = {"linear": OP_BENCHES[aten.linear.default],
                                          "conv2d": OP_BENCHES[aten.conv2d.default],
                                          "sdpa": OP_BENCHES[aten.scaled_dot_product_attention.default]}


# ------------------------------------------------------------------------------------------------ model
@dataclasses.dataclass(frozen=True)
class Prediction:
    """A predicted latency and its parts (ms): overhead + ops + residual = total."""

    total_ms: float
    ops_ms: float
    residual_ms: float
    overhead_ms: float
    per_op: tuple[tuple[str, str, float], ...] = dataclasses.field(repr=False, default=())


class LatencyModel:
    """Whole-model latency from a :class:`LatencyTable`, fitted to end-to-end measurements.

    ``predicted = overhead + scale * sum(table time of each op) + residual``. :meth:`fit` measures one or
    more *anchor* models end to end: with one, ``scale = 1`` and the residual is what the table does not
    explain; with two or more (e.g. the dense model and a uniformly pruned one), ``scale`` and
    ``residual`` are fitted by least squares, which absorbs what a sum of one-op timings gets wrong
    systematically (ONNX Runtime fuses a linear with its neighbours; eager torch pays a per-node cost
    that does not shrink with the widths). :meth:`check` says how far a prediction is from a measurement.
    """

    def __init__(self, table: LatencyTable, scale: float = 1.0, residual_ms: float = 0.0,
                 anchors: tuple[tuple[float, float], ...] = ()) -> None:
        self.table = table
        self.scale = scale
        self.residual_ms = residual_ms
        #: ``(ops_ms, measured_ms)`` of the models it was fitted on
        self.anchors = anchors

    @classmethod
    def fit(cls, table: LatencyTable, anchors: Iterable[Any], inputs: tuple, progress: bool = False,
            measured: Iterable[float] | None = None) -> "LatencyModel":
        """Fit on ``anchors`` (models of one family, e.g. ``[dense, pruned]``), measured end to end
        (or ``measured``: their latencies, ms, when already known)."""
        anchors = list(anchors)
        if not anchors:
            raise ConfigError("LatencyModel.fit needs at least one anchor model")
        if measured is None:
            stats = measure_models({str(i): a for i, a in enumerate(anchors)}, inputs, table.backend, table.timing)
            measured = [stats[str(i)].median_ms for i in range(len(anchors))]
        times = list(measured)
        raw = cls(table)
        over = table.overhead()
        ops = [raw.predict(a, inputs, progress).ops_ms for a in anchors]
        pts = tuple(zip(ops, times))
        if len(pts) == 1 or max(ops) - min(ops) < 1e-3 * max(ops):
            return cls(table, 1.0, sum(t - over - o for o, t in pts) / len(pts), pts)
        n = len(pts)
        mo, mt = sum(ops) / n, sum(times) / n
        scale = sum((o - mo) * (t - mt) for o, t in pts) / sum((o - mo) ** 2 for o in ops)
        scale = min(max(scale, 0.25), 4.0)  # a noisy pair must not give a wild slope
        return cls(table, scale, mt - over - scale * mo, pts)

    def predict(self, model: Any, inputs: tuple, progress: bool = False) -> Prediction:
        ops = model_ops(model, inputs)
        self.table.measure_all((k for _, k in ops), progress)
        per_op = tuple((node, str(k), self.table.ms(k)) for node, k in ops)
        ops_ms = sum(t for _, _, t in per_op)
        over = self.table.overhead()
        return Prediction(over + self.scale * ops_ms + self.residual_ms, ops_ms, self.residual_ms, over, per_op)

    def check(self, model: Any, inputs: tuple, measured_ms: float | None = None) -> dict[str, float]:
        """Predicted vs measured latency of ``model``: ``{"predicted_ms", "measured_ms", "error"}``
        (``error`` = predicted / measured - 1)."""
        pred = self.predict(model, inputs).total_ms
        if measured_ms is None:
            measured_ms = measure_model(model, inputs, self.table.backend, self.table.timing).median_ms
        return {"predicted_ms": pred, "measured_ms": measured_ms, "error": pred / measured_ms - 1.0}


def at_batch(inputs: tuple, batch: int) -> tuple:
    """``inputs`` with dim 0 of every tensor cut (or repeated) to ``batch`` rows."""
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] != batch:
            reps = math.ceil(batch / x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()
        out.append(x)
    return tuple(out)


def captured_at(model: Any, inputs: tuple) -> Captured:
    """``model`` captured at ``inputs`` (a ``Captured`` is returned as is)."""
    return model if isinstance(model, Captured) else capture(model, inputs)


__all__ = ["BACKENDS", "LatencyModel", "LatencyTable", "OP_BENCHES", "OVERHEAD", "OpBench", "OpKey", "Prediction",
           "Timing", "at_batch", "cache_dir", "captured_at", "machine_identity", "measure_model", "measure_models",
           "model_ops",
           "runner", "table_path", "time_call"]
