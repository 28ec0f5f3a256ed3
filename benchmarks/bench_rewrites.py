"""Latency of rewritten models in torch: Sparsify and LowRank against the dense model, as ratios.

Targets:

* ``linear`` -- one ``nn.Linear(768, 3072)`` (the BERT-base FFN up-projection, weight 3072x768): the
  per-layer cost of each rewrite; input ``[batch, 768]``.
* ``minilm`` -- all-MiniLM-L6-v2 (bundled, offline), input ``[batch, 128]`` tokens: the whole model with
  all 36 linears rewritten (rows per linear call = batch x 128).

Variants (every rewrite is forced, ``cost_model="always"`` / ``cost_model="always"``, so the table shows what
each kernel costs; the ``auto`` column counts the layers the Sparsify cost model would have rewritten at
that batch size -- the others it keeps dense-with-zeros):

* ``csr 90%``            Sparsify(sparsity=0.9)                            -> sparse_linear_csr
* ``bsr 16x1 70%/90%``   Sparsify(pattern="block", block=(16, 1), ...)     -> sparse_linear_bsr
* ``nm 2:4``             Sparsify(pattern="n:m", n=2, m=4)                 -> sparse_linear_nm
* ``lowrank 0.25``       LowRank(rank_ratio=0.25, method="activation")     -> two thin linears

All candidates of a target and batch size are timed interleaved in one run
(``sparsecomp.app.metrics.measure_latencies``: rounds, each timing every candidate once) with one intra-op
thread, and the table shows ``median ms`` and ``x dense`` = median / dense median (below 1 is faster).
The dense baseline is the captured dense graph (same execution path as the rewrites).

Usage::

    python benchmarks/bench_rewrites.py                         # both targets, batch 1 and 8
    python benchmarks/bench_rewrites.py --targets linear --batch 1 8 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp.passes.sparsify import cost_model
from sparsecomp.app.metrics import count_params, markdown_table, measure_latencies
from sparsecomp.passes.sparsify import SPARSE_OPS

_FORCE_LOWRANK = {"cost_model": "always"} if "cost_model" in sparsecomp.LowRank.__dataclass_fields__ else {}

VARIANTS: dict[str, Callable[..., Any]] = {
    "csr 90%": lambda **kw: sparsecomp.Sparsify(sparsity=0.9, **kw),
    "bsr 16x1 70%": lambda **kw: sparsecomp.Sparsify(sparsity=0.7, pattern="block", block=(16, 1), **kw),
    "bsr 16x1 90%": lambda **kw: sparsecomp.Sparsify(sparsity=0.9, pattern="block", block=(16, 1), **kw),
    "nm 2:4": lambda **kw: sparsecomp.Sparsify(pattern="n:m", n=2, m=4, **kw),
    "lowrank 0.25": lambda **kw: sparsecomp.LowRank(rank_ratio=0.25, method="activation", **_FORCE_LOWRANK),
}


def _linear_target():
    torch.manual_seed(0)
    model = nn.Linear(768, 3072).eval()
    calib = [torch.randn(64, 768) for _ in range(2)]
    return model, (torch.randn(2, 768),), calib, lambda b: (torch.randn(b, 768),)


def _minilm_target(seq_len: int = 128):
    from sparsecomp.app.evaluate import load_encoder
    from sparsecomp.app.models import BUILTIN_SENTENCES

    encoder = load_encoder()
    model = encoder.model
    ids, mask = encoder.inputs(BUILTIN_SENTENCES[:16], seq_len)
    calib = [(ids[i:i + 8], mask[i:i + 8]) for i in (0, 8)]

    def inputs(b: int):
        reps = (b + ids.shape[0] - 1) // ids.shape[0]
        return ids.repeat(reps, 1)[:b], mask.repeat(reps, 1)[:b]

    return model, (ids[:2], mask[:2]), calib, inputs


TARGETS = {"linear": _linear_target, "minilm": _minilm_target}


def _n_rewritten(gm: torch.fx.GraphModule) -> int:
    sparse = set(SPARSE_OPS.values())
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in sparse)


def _auto_count(gm: torch.fx.GraphModule, batch: int) -> int:
    """Layers that ``cost_model="auto"`` would make sparse at ``batch`` (the report's rows are per batch 1)."""
    rep = gm.sparsecomp_report[-1]
    cfg = sparsecomp.config_from_dict(rep["config"])
    return sum(
        cost_model.decide(cfg.format, r["sparsity"], r["rows"] * batch, block=cfg.block, n=cfg.n, m=cfg.m).sparse
        for r in rep["layers"] if "sparsity" in r
    )


def run_target(name: str, batches: list[int], variants: list[str], rounds: int, min_time: float) -> list[dict]:
    model, example, calib, make_inputs = TARGETS[name]()
    captured = sparsecomp.capture(model, example)
    built: dict[str, torch.nn.Module] = {"dense": captured.module}
    info: dict[str, dict] = {"dense": {"params": count_params(captured.module), "rewritten": 0}}
    for v in variants:
        t0 = time.perf_counter()
        cfg = VARIANTS[v](cost_model="always")
        gm = sparsecomp.compress(captured, None, cfg, calibration=calib)
        built[v] = gm
        rows = gm.sparsecomp_report[-1]["layers"]
        info[v] = {"params": count_params(gm), "compress_s": time.perf_counter() - t0,
                   "rewritten": _n_rewritten(gm) if v.startswith(("csr", "bsr", "nm")) else
                   sum(1 for r in rows if "rank" in r and "skipped" not in r),
                   "layers": len(rows)}
        print(f"[{name}] built {v} in {info[v]['compress_s']:.1f} s", file=sys.stderr)

    results = []
    for b in batches:
        args = make_inputs(b)
        stats = measure_latencies(built, args, threads=1, rounds=rounds, min_time=min_time)
        dense = stats["dense"].median_ms
        for v, st in stats.items():
            row = {"target": name, "batch": b, "variant": v, "median_ms": st.median_ms,
                   "p10_ms": st.p10_ms, "p90_ms": st.p90_ms, "x_dense": st.median_ms / dense, **info[v]}
            if v != "dense" and v.startswith(("csr", "bsr", "nm")):
                row["auto_rewritten"] = _auto_count(built[v], b)
            results.append(row)
        print(f"[{name}] timed batch {b}", file=sys.stderr)
    return results


def format_tables(results: list[dict], batches: list[int]) -> str:
    out = []
    for target in dict.fromkeys(r["target"] for r in results):
        rows = [r for r in results if r["target"] == target]
        header = ["variant", "params", "rewritten"]
        for b in batches:
            header += [f"B={b} ms", f"B={b} x dense", f"B={b} auto"]
        body = []
        for v in dict.fromkeys(r["variant"] for r in rows):
            vr = {r["batch"]: r for r in rows if r["variant"] == v}
            first = vr[batches[0]]
            line = [v, f"{first['params'] / 1e6:.2f}M", f"{first['rewritten']}/{first.get('layers', '-')}"]
            for b in batches:
                r = vr[b]
                auto = r.get("auto_rewritten")
                line += [f"{r['median_ms']:.2f}", f"{r['x_dense']:.2f}", "-" if auto is None else str(auto)]
            body.append(line)
        title = {"linear": "nn.Linear(768, 3072) (weight 3072x768)",
                 "minilm": "all-MiniLM-L6-v2, seq 128 (36 linears)"}[target]
        out.append(f"### {title}\n\n" + markdown_table(header, body, text_columns=1))
    return "\n\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.3, help="timed seconds per candidate per round")
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    ns = p.parse_args(argv)

    results = []
    for target in ns.targets:
        results += run_target(target, ns.batch, ns.variants, ns.rounds, ns.min_time)
    print(f"torch {torch.__version__}, 1 thread, {platform.machine()}; `rewritten` = layers rewritten "
          "(sparse op or factored) / layers seen; `auto` = layers the Sparsify cost model would make sparse "
          "at that batch size\n")
    print(format_tables(results, ns.batch))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "platform": platform.platform(), "threads": 1}
        Path(ns.out).write_text(json.dumps({"environment": env, "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
