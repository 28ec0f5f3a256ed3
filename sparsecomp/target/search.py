"""``compress_to_target``: the most faithful pruned model that meets a speedup *as measured* on a backend.

What runs, in order (``Target`` says what to reach; see docs/ARCHITECTURE.md, "Compress to a target"):

1. capture the model; time the dense model end to end on the backend at ``Target.batch`` rows;
2. ``round_to``: measured for the backend (:func:`sparsecomp.target.widths.suitable_round_to`) unless given;
3. a latency model (:class:`~sparsecomp.target.latency.LatencyModel`: ``scale x`` per-op table + residual),
   fitted on the dense model and a cheap data-free probe (uniform l2 pruning, ``PROBE_RATIO``) measured
   end to end, then refitted on every model measured, gives the first fraction of MACs to remove: the
   latency the target asks to save, taken from the ops the table times;
4. each try compresses with the calibrated ``StructuredPruning`` (per-group error profiles and the
   sensitivity-scaled global allocation pick *which* heads / neurons / channels go, at
   ``mac_ratio``; least-squares reconstruction), predicts its latency from the table, then measures it
   end to end interleaved with the dense model. A point that meets the target is re-measured (its
   reported speedup is the re-measurement);
5. the next ``mac_ratio`` interpolates the measured (ratio, latency) points: tighter while the target is
   missed, looser (more faithful) while the best model found is more than ``RELAX`` above it;
6. the most faithful met point is returned; with none, :class:`~sparsecomp.errors.TargetUnreachableError`
   names the fastest point found.

The user's model is never modified (capture copies it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..app.metrics import measure_latencies
from ..capture.export import Captured
from ..errors import ConfigError, TargetUnreachableError
from .config import Target
from .latency import LatencyModel, LatencyTable, Timing, at_batch, captured_at, runner
from .widths import WidthChoice, representative_op, suitable_round_to

#: aim this far above the target speedup when choosing the next ratio (measurement noise)
MARGIN = 0.03
#: keep looking for a more faithful model while the best met one is this far above the target
RELAX = 0.06
#: the first try never removes less than this fraction of the MACs
MIN_RATIO = 0.05
#: the latency model's second anchor: data-free uniform pruning of this fraction of every group
PROBE_RATIO = 0.5


@dataclasses.dataclass
class Point:
    """One explored model: how it was made, its predicted and measured latency, its fidelity.

    ``predicted_ms`` is the dense latency of the same interleaved run divided by the predicted speedup;
    ``prediction_error`` = predicted / measured latency - 1.
    """

    mac_ratio: float
    round_to: int
    predicted_ms: float
    measured_ms: float
    dense_ms: float
    speedup: float
    prediction_error: float
    output_error: float | None
    fidelity: float | None
    met: bool
    compress_s: float
    remeasured_speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TargetResult:
    """What ``compress_to_target`` returns: the chosen ``module`` and everything it measured."""

    module: torch.nn.Module
    target: Target
    chosen: Point
    points: list[Point]
    layers: list[dict]
    report: dict

    def table(self) -> str:
        """The explored points as a markdown table (the chosen one marked)."""
        fid = any(p.fidelity is not None for p in self.points)
        head = ["mac_ratio", "round_to", "predicted ms", "measured ms", "dense ms", "measured speedup",
                "prediction error", "output error"] + (["fidelity"] if fid else []) + ["met"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in self.points:
            row = [f"{p.mac_ratio:.3f}", str(p.round_to), f"{p.predicted_ms:.2f}", f"{p.measured_ms:.2f}",
                   f"{p.dense_ms:.2f}", f"{p.speedup:.2f}x", f"{100 * p.prediction_error:+.1f} %",
                   "-" if p.output_error is None else f"{p.output_error:.4f}"]
            row += ([("-" if p.fidelity is None else f"{p.fidelity:.4f}")] if fid else [])
            row += [("**chosen**" if p is self.chosen else "yes") if p.met else "no"]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)

    def layer_table(self) -> str:
        """Per layer whose weight changed: dense shape -> chosen shape, as markdown."""
        lines = ["| weight | dense | chosen | kept |", "|---|---|---|---|"]
        for row in self.layers:
            lines.append(f"| {row['weight']} | {row['dense']} | {row['chosen']} | {100 * row['kept']:.0f} % |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Fidelity (or output error) vs measured speedup of every explored point, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        use_fid = all(p.fidelity is not None for p in self.points)
        ys = [p.fidelity if use_fid else (p.output_error or 0.0) for p in self.points]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.scatter([1.0], [1.0 if use_fid else 0.0], marker="s", color="gray", label="dense")
        for p, y in zip(self.points, ys):
            color = "tab:green" if p.met else "tab:red"
            ax.scatter([p.speedup], [y], color=color, marker="*" if p is self.chosen else "o",
                       s=160 if p is self.chosen else 40)
            ax.annotate(f"{p.mac_ratio:.2f}", (p.speedup, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.axvline(self.target.speedup, color="gray", linestyle="--", label=f"target {self.target.speedup:g}x")
        ax.set_xlabel(f"measured speedup ({self.target.backend}, batch {self.target.batch}, "
                      f"{self.target.threads} thread(s))")
        ax.set_ylabel("fidelity" if use_fid else "relative output error")
        ax.set_title("compress_to_target: explored points (green: met, star: chosen)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save_report(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.report, indent=1, default=str))
        return path


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[compress_to_target] {msg}", file=sys.stderr, flush=True)


def _base_config(template: Any, calibration: Any):
    from ..passes.structured import StructuredPruning

    if template is None:
        return StructuredPruning(mac_ratio=0.1, residual=calibration is not None)
    if not isinstance(template, StructuredPruning):
        raise ConfigError(f"compress_to_target: template must be a StructuredPruning config, got "
                          f"{type(template).__name__}")
    return template


def _probe_config(base: Any, round_to: int):
    from ..passes.structured import StructuredPruning

    return StructuredPruning(ratio=PROBE_RATIO, criterion="l2", allocation="uniform", reconstruct=False,
                             round_to=round_to, granularity=base.granularity, ignore=base.ignore)


def _compress(captured: Captured, cfg: Any, calibration: Any, cache: dict) -> tuple[torch.nn.Module, float]:
    """``sparsecomp.compress`` once per config (``cache``: config JSON -> (module, seconds))."""
    import sparsecomp

    key = cfg.to_json() + ("" if calibration is None else "|calibrated")
    if key not in cache:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the drift warning: reported per point instead
            out = sparsecomp.compress(captured, captured.example_args, cfg, calibration=calibration)
        cache[key] = (out, time.perf_counter() - t0)
    return cache[key]


def _layers(dense: torch.nn.Module, chosen: torch.nn.Module) -> list[dict]:
    before = {n: tuple(p.shape) for n, p in dense.named_parameters() if p.dim() >= 2}
    rows = []
    for name, p in chosen.named_parameters():
        if name in before and tuple(p.shape) != before[name]:
            rows.append({"weight": name, "dense": list(before[name]), "chosen": list(p.shape),
                         "kept": p.numel() / max(1, torch.Size(before[name]).numel())})
    return rows


def _next_ratio(points: list[Point], want: float, max_ratio: float) -> float:
    """The ratio whose latency fraction (1 / speedup) is ``want``, interpolated on the measured points
    (and the dense model at ratio 0); extrapolated from the two largest ratios when all are slower."""
    pts = sorted({(0.0, 1.0), *((p.mac_ratio, 1.0 / p.speedup) for p in points)})
    for (r0, f0), (r1, f1) in zip(pts, pts[1:]):
        if f0 >= want >= f1 and f0 != f1:
            return r0 + (r1 - r0) * (f0 - want) / (f0 - f1)
    (r0, f0), (r1, f1) = pts[-2], pts[-1]
    slope = (f1 - f0) / (r1 - r0) if r1 != r0 else -1.0
    if slope >= -1e-6:  # no progress measured (noise or a slower model): take a bigger step
        return min(max_ratio, r1 + 0.1)
    return min(max_ratio, r1 + (want - f1) / slope)


def compress_to_target(model: Any, example_inputs: Any, target: Target, calibration: Any = None, *,
                       template: Any = None, fidelity: Callable[[torch.nn.Module], float] | None = None,
                       progress: bool = True, candidates: dict | None = None,
                       recover: Any = None) -> TargetResult:
    """The most faithful ``StructuredPruning`` of ``model`` whose speedup over the dense model, measured
    end to end on ``target.backend``, is at least ``target.speedup``.

    Parameters
    ----------
    model, example_inputs:
        As for :func:`sparsecomp.compress` (positional inputs; a ``Captured`` is used as is).
    target:
        A :class:`~sparsecomp.target.config.Target`.
    calibration:
        Calibration batches: the pruning is then data-driven (fluctuation criterion, sensitivity-scaled
        global allocation, least-squares reconstruction); without, data-free (l2, uniform).
    template:
        A ``StructuredPruning`` whose settings are kept (``mac_ratio`` and ``round_to`` are set by the search).
    fidelity:
        ``module -> float``, higher is better (e.g. held-out cosine), used to choose among met points and
        reported; by default the relative output error on the calibration data decides.
    candidates:
        A dict shared between calls (e.g. several targets on one model) that caches compressed models
        by config; compression is the expensive step.
    recover:
        A :class:`sparsecomp.Recover` config (needs ``calibration``): the chosen model is then distilled
        from the dense one (same widths, so the same speed), measured again end to end, and returned
        instead if it still meets the target and its fidelity (``fidelity``, else Recover's validation)
        did not fall; ``report["recover"]`` says what it bought.

    Raises
    ------
    TargetUnreachableError
        When no explored model meets the target; ``.best`` is the fastest one measured.

    Examples
    --------
    >>> res = compress_to_target(model, (x,), Target(speedup=1.5, backend="ort"), calibration=batches)  # doctest: +SKIP
    >>> res.chosen.speedup, res.plot("target.png")                                                       # doctest: +SKIP
    """
    import sparsecomp

    if not isinstance(target, Target):
        raise ConfigError(f"compress_to_target needs a sparsecomp.Target, got {type(target).__name__}")
    if recover is not None:
        if not isinstance(recover, sparsecomp.Recover):
            raise ConfigError(f"compress_to_target(recover=...) needs a sparsecomp.Recover, got {type(recover).__name__}")
        if calibration is None:
            raise ConfigError("compress_to_target(recover=...) needs calibration data: the teacher labels it")
    base = _base_config(template, calibration)
    start = time.perf_counter()
    captured = captured_at(model, tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
                           else (example_inputs,))
    if captured.example_kwargs:
        raise ConfigError("compress_to_target times positional inputs only; pass every input positionally")
    inputs = at_batch(tuple(captured.example_args), target.batch)
    timing = Timing(threads=target.threads, rounds=target.rounds, repeats=10, min_time=0.3)
    table = LatencyTable(target.backend, timing)
    dense_run = runner(captured, inputs, target.backend, target.threads)
    dense_ms = measure_latencies({"dense": dense_run}, inputs, threads=target.threads, rounds=target.rounds,
                                 repeats=10, min_time=0.3)["dense"].median_ms
    _say(progress, f"dense: {dense_ms:.2f} ms on {target.backend} (batch {target.batch}, {target.threads} thread(s))")

    width: WidthChoice | None = None
    if target.round_to == "auto":
        width = suitable_round_to(table, representative_op(captured, inputs), progress=progress)
        round_to = width.round_to
        _say(progress, width.summary())
    else:
        round_to = int(target.round_to)

    # the latency model: the table, fitted on the dense model and a cheap data-free probe (uniform l2
    # pruning of PROBE_RATIO of every group), measured interleaved; it prices the first try
    cache = candidates if candidates is not None else {}
    probe = _compress(captured, _probe_config(base, round_to), None, cache)[0]
    probe_stats = measure_latencies({"dense": dense_run, "probe": runner(probe, inputs, target.backend, target.threads)},
                                    inputs, threads=target.threads, rounds=target.rounds, repeats=10, min_time=0.3)
    anchors: list[Any] = [captured, probe]
    anchor_ms: list[float] = [dense_ms, probe_stats["probe"].median_ms * dense_ms / probe_stats["dense"].median_ms]
    lat = LatencyModel.fit(table, anchors, inputs, progress, measured=anchor_ms)
    dense_pred = lat.predict(captured, inputs)
    # timed ops shrink with the MACs removed, the residual does not: solve for the latency the target asks
    want_ms = dense_pred.total_ms / (target.speedup * (1 + MARGIN))
    ratio = (dense_pred.total_ms - want_ms) / max(lat.scale * dense_pred.ops_ms, 1e-9)
    ratio = min(target.max_ratio, max(MIN_RATIO, ratio))
    _say(progress, f"latency model: {lat.scale:.2f} x timed ops ({dense_pred.ops_ms:.2f} ms) + "
                   f"{lat.residual_ms + dense_pred.overhead_ms:.2f} ms (probe at ratio {PROBE_RATIO}: measured "
                   f"{probe_stats['dense'].median_ms / probe_stats['probe'].median_ms:.2f}x); first try removes "
                   f"{ratio:.3f} of the MACs")

    points: list[Point] = []
    modules: dict[int, torch.nn.Module] = {}
    notes: list[str] = []
    stop = f"Target.max_tries={target.max_tries} used"
    for attempt in range(target.max_tries):
        cfg = dataclasses.replace(base, mac_ratio=round(ratio, 4), round_to=round_to, progress=progress)
        _say(progress, f"try {attempt + 1}/{target.max_tries}: StructuredPruning(mac_ratio={cfg.mac_ratio:.3f}, "
                       f"round_to={round_to})")
        cand, seconds = _compress(captured, cfg, calibration, cache)
        pred = lat.predict(cand, inputs, progress)
        cand_run = runner(cand, inputs, target.backend, target.threads)
        stats = measure_latencies({"dense": dense_run, "cand": cand_run}, inputs, threads=target.threads,
                                  rounds=target.rounds, repeats=10, min_time=0.3)
        d_ms, c_ms = stats["dense"].median_ms, stats["cand"].median_ms
        speedup = d_ms / c_ms
        # the load of a shared machine drifts between measurements: the model predicts the speedup over
        # dense (a ratio), which is compared with the speedup measured against dense in one interleaved run
        pred_speedup = lat.predict(captured, inputs).total_ms / pred.total_ms
        pred_ms = d_ms / pred_speedup
        point = Point(cfg.mac_ratio, round_to, pred_ms, c_ms, d_ms, speedup, speedup / pred_speedup - 1.0,
                      cand.sparsecomp_report[-1].get("output_error"), fidelity(cand) if fidelity else None,
                      speedup >= target.threshold, seconds)
        if point.met:  # re-measured: only a model that is fast twice counts
            again = measure_latencies({"dense": dense_run, "cand": cand_run}, inputs, threads=target.threads,
                                      rounds=target.rounds, repeats=10, min_time=0.3)
            point.remeasured_speedup = again["dense"].median_ms / again["cand"].median_ms
            point.met = point.remeasured_speedup >= target.threshold
        if speedup < 1.0:
            msg = (f"the model at mac_ratio {cfg.mac_ratio:.3f} runs slower than its dense twin on {target.backend} "
                   f"({speedup:.2f}x); it is not shipped")
            notes.append(msg)
            warnings.warn(f"compress_to_target: {msg}", stacklevel=2)
        points.append(point)
        modules[id(point)] = cand
        _say(progress, f"  measured {speedup:.2f}x{'' if point.remeasured_speedup is None else f' (re-measured {point.remeasured_speedup:.2f}x)'}"
                       f", predicted {pred_speedup:.2f}x (latency {100 * point.prediction_error:+.1f} %), "
                       f"output error {point.output_error}, fidelity {point.fidelity}, "
                       f"{'met' if point.met else 'not met'}")
        anchors.append(cand)
        anchor_ms.append(c_ms * dense_ms / d_ms)
        lat = LatencyModel.fit(table, anchors, inputs, measured=anchor_ms)

        met = [p for p in points if p.met]
        want = 1.0 / (target.speedup * (1 + MARGIN))
        if met and min(p.speedup for p in met) <= target.speedup * (1 + RELAX):
            break  # close enough above the target: a looser model would likely miss it
        nxt = _next_ratio(points, want, target.max_ratio)
        if met:  # never looser than a missed point, never tighter than the loosest met one
            loosest = min(p.mac_ratio for p in met)
            missed = [p.mac_ratio for p in points if not p.met and p.mac_ratio < loosest]
            nxt = min(nxt, loosest - 0.01)
            if missed:
                nxt = max(nxt, max(missed) + 0.01)
        if any(abs(nxt - p.mac_ratio) < 0.005 for p in points) or nxt <= 0 or nxt >= 1:
            stop = (f"the next ratio ({nxt:.3f}) was already measured"
                    + (f" (Target.max_ratio={target.max_ratio:g} reached)" if nxt >= target.max_ratio - 0.005 else ""))
            break
        ratio = nxt

    met = [p for p in points if p.met]
    record = {"target": target.to_dict(), "dense_ms": dense_ms, "round_to": round_to,
              "round_to_measurement": None if width is None else {"summary": width.summary(),
                                                                  "widths": [list(w) for w in width.widths]},
              "latency_model": {"scale": lat.scale, "residual_ms": lat.residual_ms, "table": str(table.path),
                                "table_hits": table.hits, "table_misses": table.misses},
              "template": base.to_dict(), "points": [p.to_dict() for p in points], "notes": notes, "stopped": stop,
              "seconds": time.perf_counter() - start}
    if not met:
        best = max(points, key=lambda p: p.speedup)
        raise TargetUnreachableError(
            f"compress_to_target: {target.speedup:g}x on {target.backend} was not reached after {len(points)} "
            f"compression(s) ({stop}); the fastest model measured {best.speedup:.2f}x (mac_ratio {best.mac_ratio:.3f}, output error "
            f"{best.output_error}). Lower the target, raise Target.max_ratio / max_tries, or try another backend.",
            best.to_dict(), [p.to_dict() for p in points])
    key = (lambda p: p.fidelity) if fidelity is not None else (lambda p: -(p.output_error or 0.0))
    chosen = max(met, key=key)
    module = modules[id(chosen)]
    layers = _layers(captured.module, module)
    record.update({"chosen": chosen.to_dict(), "layers": layers, "met": True})
    _say(progress, f"chosen: mac_ratio {chosen.mac_ratio:.3f}, measured {chosen.speedup:.2f}x "
                   f"(re-measured {chosen.remeasured_speedup:.2f}x) in {record['seconds']:.0f} s")
    if recover is not None:
        module = _recover_chosen(captured, base, chosen, recover, calibration, dense_run, inputs, target,
                                 fidelity, progress, module, record)
        record["seconds"] = time.perf_counter() - start
    return TargetResult(module, target, chosen, points, layers, record)


def _recover_chosen(captured: Captured, base: Any, chosen: Point, recover: Any, calibration: Any, dense_run: Any,
                    inputs: tuple, target: Target, fidelity: Callable | None, progress: bool,
                    module: torch.nn.Module, record: dict) -> torch.nn.Module:
    """The chosen pruning compressed again with ``recover`` after it (deterministic: the same widths),
    measured end to end; returned when it still meets the target and is not less faithful."""
    import sparsecomp

    _say(progress, f"recovery of the chosen model: {recover.to_json()}")
    cfg = dataclasses.replace(base, mac_ratio=chosen.mac_ratio, round_to=chosen.round_to, progress=progress)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rec = sparsecomp.compress(captured, captured.example_args, [cfg, recover], calibration=calibration)
    seconds = time.perf_counter() - t0
    stats = measure_latencies({"dense": dense_run, "rec": runner(rec, inputs, target.backend, target.threads)},
                              inputs, threads=target.threads, rounds=target.rounds, repeats=10, min_time=0.3)
    speedup = stats["dense"].median_ms / stats["rec"].median_ms
    phases = next(r for r in rec.sparsecomp_report if r.get("pass") == "Recover")["layers"]
    result = phases[-1]
    before_fid, after_fid = chosen.fidelity, (fidelity(rec) if fidelity else None)
    better = (after_fid >= before_fid) if fidelity else result["val_loss"] <= result["val_loss_start"]
    kept = speedup >= target.threshold and better
    record["recover"] = {"config": recover.to_dict(), "seconds": seconds, "measured_speedup": speedup,
                         "fidelity_before": before_fid, "fidelity_after": after_fid,
                         "val_loss_before": result["val_loss_start"], "val_loss_after": result["val_loss"],
                         "phases": phases, "kept": kept}
    _say(progress, f"recovered in {seconds:.0f} s: measured {speedup:.2f}x, validation loss "
                   f"{result['val_loss_start']:.4g} -> {result['val_loss']:.4g}"
                   + ("" if after_fid is None else f", fidelity {before_fid:.4f} -> {after_fid:.4f}")
                   + ("" if kept else " (not kept: " + ("slower than the target" if speedup < target.threshold
                                                       else "less faithful") + ")"))
    if not kept:
        warnings.warn(f"compress_to_target: the recovered model was not kept ({record['recover']})", stacklevel=3)
    return rec if kept else module


__all__ = ["MARGIN", "Point", "RELAX", "TargetResult", "compress_to_target"]
