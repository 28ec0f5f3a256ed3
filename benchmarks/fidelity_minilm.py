"""Fidelity vs measured speedup of structured pruning on all-MiniLM-L6-v2, without retraining.

For each target (the global fraction of MACs removed), the dense captured encoder is compressed twice with
calibration-driven selection (FLAP fluctuation criterion, sensitivity-scaled global allocation over heads
and MLP neurons, hidden size kept): once without reconstruction and once with sequential least-squares
reconstruction of every linear (residual-stream targets). Calibration: the packaged corpus
(``sparsecomp.app.models.calibration_corpus()``, ~1200 sentences) in length-bucketed batches on a graph captured
with a dynamic sequence length (padding only up to each batch's longest sentence, masked out).
Fidelity is measured on ``HELDOUT_SENTENCES`` (disjoint from the calibration corpus): mean cosine of the
sentence embeddings to the dense model's, and the Spearman correlation of the pairwise-similarity matrix
(upper triangle). All models are timed side by side in one interleaved run (torch, 1 thread, batch 1,
seq 128), so only the ratios are meaningful on a shared machine.

The Torch-Pruning reference (global Taylor on heads + MLP neurons, hidden kept, no retraining; the issue's
measurement, same setting) is printed next to the table.

Usage::

    python benchmarks/fidelity_minilm.py                       # default targets
    python benchmarks/fidelity_minilm.py --ratios 0.3 0.5 --out bench_out/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import Slice, StructuredPruning
from sparsecomp.app.metrics import count_macs, count_params, markdown_table, measure_latencies
from sparsecomp.app.evaluate import load_encoder
from sparsecomp.app.models import HELDOUT_SENTENCES, load_minilm, sentence_embeddings

#: (measured speedup, cosine) of Torch-Pruning's best setting on the same model (from the issue).
TORCH_PRUNING = ((1.04, 0.955), (1.13, 0.942), (1.25, 0.870), (1.58, 0.673), (1.83, 0.564))


def config(ratio: float, reconstruct: bool, round_to: int = 16) -> StructuredPruning:
    return StructuredPruning(mac_ratio=ratio, criterion="fluctuation", allocation="sensitivity",
                             reconstruct="all" if reconstruct else False, residual=reconstruct,
                             round_to=round_to)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).correlation)


def torch_pruning_at(speedup: float) -> float | None:
    """Torch-Pruning's cosine at ``speedup``, linearly interpolated (``None`` outside its curve)."""
    xs, ys = zip(*TORCH_PRUNING)
    if speedup > xs[-1]:
        return None
    return float(np.interp(speedup, xs, ys))


def load(model_dir: str | None) -> tuple[Any, Any]:
    if model_dir is None:
        return load_minilm()
    import transformers

    model = transformers.AutoModel.from_pretrained(model_dir, add_pooling_layer=False,
                                                   attn_implementation="sdpa", dtype=torch.float32)
    return model.float().eval(), transformers.AutoTokenizer.from_pretrained(model_dir)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.15, 0.25, 0.35, 0.45, 0.55])
    ap.add_argument("--calibration", type=int, default=0, help="use the first N corpus sentences (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="threads for the latency measurement")
    ap.add_argument("--compress-threads", type=int, default=0, help="threads while compressing (0: torch default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--recon-only", action="store_true", help="skip the no-reconstruction baselines")
    ap.add_argument("--model-dir", default=None, help="load a local HF copy instead of the bundled package")
    ap.add_argument("--slice", type=float, nargs="*", default=[],
                    help="also run Slice(ratio, reconstruct=True) alone and before each pruning ratio")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ns = ap.parse_args(argv)
    if ns.compress_threads:
        torch.set_num_threads(ns.compress_threads)

    encoder = load_encoder(lambda: load(ns.model_dir))
    enc = encoder.model
    example = encoder.inputs(HELDOUT_SENTENCES[0], seq_len=128)
    # dynamic batch and sequence length, so that calibration runs on length-bucketed batches; MAC budgets
    # are counted at 128 tokens
    captured = encoder.capture(seq_len=128)
    calibration = encoder.calibration(ns.calibration)
    n_sentences = sum(int(ids.shape[0]) for ids, _ in calibration)
    mask = torch.cat([m.flatten() for _, m in calibration])
    ev_ids, ev_mask = encoder.inputs(HELDOUT_SENTENCES, seq_len=128)
    with torch.no_grad():
        ref = sentence_embeddings(enc(ev_ids, ev_mask), ev_mask)
    iu = np.triu_indices(len(HELDOUT_SENTENCES), 1)
    ref_sim = (ref @ ref.T).numpy()[iu]

    models: dict[str, torch.nn.Module] = {"dense": captured.module}
    info: dict[str, dict[str, Any]] = {"dense": {"ratio": 0.0, "reconstruct": None, "seconds": 0.0}}
    plans = [(f"{r:.2f} {'recon' if rec else 'no-recon'}", r, rec, [config(r, rec)])
             for r in ns.ratios for rec in ((True,) if ns.recon_only else (False, True))]
    for s in ns.slice:
        plans.append((f"slice {s:.2f} + refit", 0.0, True, [Slice(ratio=s, reconstruct=True, post_norm=True)]))
        plans += [(f"slice {s:.2f} + refit + {r:.2f} recon", r, True, [Slice(ratio=s, reconstruct=True, post_norm=True), config(r, True)])
                  for r in ns.ratios]
    for name, r, rec, cfgs in plans:
        t0 = time.perf_counter()
        models[name] = sparsecomp.compress(captured, example, cfgs, calibration=calibration)
        info[name] = {"ratio": r, "reconstruct": rec, "seconds": time.perf_counter() - t0}
        print(f"compressed {name} in {info[name]['seconds']:.0f}s", file=sys.stderr, flush=True)
    lat = measure_latencies(models, example, threads=ns.threads, rounds=ns.rounds, min_time=0.5)
    dense_ms, dense_macs = lat["dense"].median_ms, count_macs(captured.module, example)

    rows = []
    for name, module in models.items():
        with torch.no_grad():
            emb = sentence_embeddings(module(ev_ids, ev_mask), ev_mask)
        cos = (emb * ref).sum(1)
        speedup = dense_ms / lat[name].median_ms
        tp = torch_pruning_at(speedup)
        rows.append({"config": name, **info[name], "params": count_params(module),
                     "mac_reduction": dense_macs / count_macs(module, example), "latency_ms": lat[name].median_ms,
                     "speedup": speedup, "cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                     "spearman": spearman(ref_sim, (emb @ emb.T).numpy()[iu]), "torch_pruning_cosine": tp})
    header = ["config (global MAC fraction removed)", "params (M)", "MAC reduction",
              f"speedup (torch, {ns.threads} thread, batch 1, seq 128)", "cosine (mean / min)", "Spearman",
              "Torch-Pruning cosine at this speedup"]
    body = [[r["config"], f"{r['params'] / 1e6:.2f}", f"{r['mac_reduction']:.2f}x", f"{r['speedup']:.2f}x",
             f"{r['cosine']:.4f} / {r['min_cosine']:.3f}", f"{r['spearman']:.4f}",
             "-" if r["torch_pruning_cosine"] is None or r["config"] == "dense" else f"{r['torch_pruning_cosine']:.3f}"]
            for r in rows]
    print(markdown_table(header, body, text_columns=1))
    print(f"\ncalibration: {n_sentences} sentences ({int(mask.sum())} tokens); evaluation: "
          f"{len(HELDOUT_SENTENCES)} held-out sentences; Torch-Pruning reference: "
          + ", ".join(f"{c:.3f} at {s:.2f}x" for s, c in TORCH_PRUNING))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
