"""Dense vs structurally pruned models: size, MACs and single-thread CPU latency.

Measures, side by side in one run, the dense captured model and
``sparsecomp.compress(..., StructuredPruning(ratio=r))`` for each ratio on:

* ``minilm``   -- all-MiniLM-L6-v2 (bundled, offline), batch 1, seq 128;
* ``resnet50`` -- the zoo's full-size ResNet-50, batch 1, 3x224x224.

All models run in torch eager mode (the fx GraphModule that ``torch.export``
produces) with ``--threads`` intra-op threads. The dense baseline is the
*captured* dense graph, so dense and pruned models run through the same
execution path. Latencies are measured in interleaved rounds (see
``sparsecomp.app.metrics.measure_latencies``) so that a noisy period of a shared
machine does not bias one candidate.

Usage::

    python benchmarks/bench_structured.py                      # both models
    python benchmarks/bench_structured.py --models minilm --ratios 0.5
    python benchmarks/bench_structured.py --out bench_out/structured.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp.app.metrics import count_macs, count_params, markdown_table, measure_latencies

BuildResult = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class BenchRow:
    """One line of the benchmark table."""

    model: str
    ratio: float
    params: int
    macs: int
    mac_reduction: float
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    speedup: float
    speedup_per_mac_reduction: float
    compress_s: float


def build_minilm(seq_len: int = 128) -> BuildResult:
    """all-MiniLM-L6-v2 wrapped as ``SentenceEncoder``, batch 1, ``seq_len`` tokens."""
    from sparsecomp.app.evaluate import load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES

    encoder = load_encoder()
    return encoder.model, encoder.inputs(BUILTIN_SENTENCES[0], seq_len=seq_len), {}


def build_resnet50() -> BuildResult:
    """The zoo's ResNet-50, batch 1, 3x224x224."""
    from sparsecomp.testing import zoo

    model, args, kwargs = zoo.get("resnet50").build()
    return model.eval(), tuple(args), dict(kwargs)


BUILDERS: dict[str, Callable[[argparse.Namespace], BuildResult]] = {
    "minilm": lambda ns: build_minilm(ns.seq_len),
    "resnet50": lambda ns: build_resnet50(),
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bench_model(
    name: str,
    build: Callable[[], BuildResult],
    ratios: Sequence[float],
    threads: int,
    rounds: int,
    min_time: float,
) -> list[BenchRow]:
    """Capture, compress and measure one model at every ratio.

    Returns
    -------
    list of BenchRow
        The dense row (ratio 0) followed by one row per ratio.
    """
    _log(f"[{name}] building")
    model, args, kwargs = build()
    kw = kwargs or None
    _log(f"[{name}] capturing dense")
    t0 = time.perf_counter()
    modules: dict[float, nn.Module] = {0.0: sparsecomp.capture(model, args, kw).module}
    compress_s: dict[float, float] = {0.0: time.perf_counter() - t0}
    for r in ratios:
        _log(f"[{name}] compressing ratio={r:g}")
        t0 = time.perf_counter()
        modules[r] = sparsecomp.compress(
            model, args, sparsecomp.StructuredPruning(ratio=r), example_kwargs=kw
        )
        compress_s[r] = time.perf_counter() - t0
    _log(f"[{name}] measuring latency ({threads} thread(s), {rounds} interleaved rounds)")
    lat = measure_latencies(
        {str(r): m for r, m in modules.items()},
        args,
        kwargs,
        threads=threads,
        rounds=rounds,
        min_time=min_time,
    )
    dense_macs = count_macs(modules[0.0], args, kwargs)
    dense_ms = lat["0.0"].median_ms
    rows = []
    for r, module in modules.items():
        macs = count_macs(module, args, kwargs)
        stats = lat[str(r)]
        mac_red = dense_macs / macs if macs else float("inf")
        speedup = dense_ms / stats.median_ms
        rows.append(
            BenchRow(
                model=name,
                ratio=r,
                params=count_params(module),
                macs=macs,
                mac_reduction=mac_red,
                latency_ms=stats.median_ms,
                latency_p10_ms=stats.p10_ms,
                latency_p90_ms=stats.p90_ms,
                speedup=speedup,
                speedup_per_mac_reduction=speedup / mac_red,
                compress_s=compress_s[r],
            )
        )
    return rows


def format_markdown(rows: Sequence[BenchRow]) -> str:
    """Render rows as a markdown table."""
    header = [
        "model", "ratio", "params", "MACs", "MAC reduction x",
        "latency ms", "speedup x", "speedup / MAC-reduction",
    ]
    body = [
        [
            r.model,
            f"{r.ratio:.2f}",
            f"{r.params / 1e6:.2f}M",
            f"{r.macs / 1e9:.3f}G",
            f"{r.mac_reduction:.2f}",
            f"{r.latency_ms:.2f} ({r.latency_p10_ms:.2f}-{r.latency_p90_ms:.2f})",
            f"{r.speedup:.2f}",
            f"{r.speedup_per_mac_reduction:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(header, body, text_columns=1)


def environment(ns: argparse.Namespace) -> dict[str, Any]:
    """Facts about the run that a reader needs to compare numbers."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": ns.threads,
        "rounds": ns.rounds,
        "min_time_s": ns.min_time,
        "seq_len": ns.seq_len,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(BUILDERS), default=["minilm", "resnet50"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (default 3)")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="minimum timed seconds per model per round (default 0.5)")
    p.add_argument("--seq-len", type=int, default=128, help="MiniLM tokens (default 128)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    ns = p.parse_args(argv)
    for r in ns.ratios:
        if not 0.0 < r < 1.0:
            p.error(f"ratios must be in (0, 1), got {r}")
    if ns.threads < 1 or ns.rounds < 1:
        p.error("--threads and --rounds must be >= 1")
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    rows: list[BenchRow] = []
    for name in ns.models:
        build = functools.partial(BUILDERS[name], ns)
        rows.extend(bench_model(name, build, ns.ratios, ns.threads, ns.rounds, ns.min_time))
    table = format_markdown(rows)
    print(table)
    if ns.out:
        out = Path(ns.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": environment(ns), "rows": [asdict(r) for r in rows]}
        out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        _log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
