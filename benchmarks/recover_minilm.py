"""Recovery by distillation (``Recover``) after calibrated structured pruning on all-MiniLM-L6-v2.

For each target (global fraction of MACs removed) the dense encoder, captured with a dynamic batch and
sequence length, is compressed with the refit recipe
``StructuredPruning(ratio=r, criterion="fluctuation", allocation="sensitivity", reconstruct="all",
residual=True, round_to=16)`` and then recovered with ``Recover`` (the original graph is the teacher;
calibration: the packaged corpus, length-bucketed). Fidelity is measured on ``HELDOUT_SENTENCES`` (disjoint
from the corpus): mean / min cosine of the mean-pooled sentence embeddings to the dense model's. Speed:
torch eager, 1 thread, batch 1, seq 128, every model timed interleaved in one run (ratios only).

Usage::

    python benchmarks/recover_minilm.py --ratios 0.57 0.72 --budget 540
    python benchmarks/recover_minilm.py --ratios 0.57 --save-pruned bench_out/pruned   # keep the refits
    python benchmarks/recover_minilm.py --ratios 0.57 --pruned bench_out/pruned --variants block e2e both
    python benchmarks/recover_minilm.py --ratios 0.57 --pruned bench_out/pruned --variants naive both --budget 600

Variant ``naive`` is the issue's baseline, run here side by side with the same budget: plain end-to-end
distillation of the refit model (token-state MSE + pooled-embedding cosine, AdamW at ``--naive-lr``, cosine
schedule on the clock, batches of 16 shuffled corpus sentences, no validation split, no early stopping).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import Recover, StructuredPruning
from sparsecomp.capture.export import Captured
from sparsecomp.passes.base import PassContext, run_pass

try:  # the MiniLM helpers move to sparsecomp.app in the relayout
    from sparsecomp.app.metrics import count_macs, markdown_table, measure_latencies
    from sparsecomp.app.models import (HELDOUT_SENTENCES, SentenceEncoder, calibration_corpus, encode_batch,
                                       encoder_dynamic_shapes, length_batches, load_minilm, sentence_embeddings)
except ImportError:
    from sparsecomp.metrics import count_macs, markdown_table, measure_latencies
    from sparsecomp.models import (HELDOUT_SENTENCES, SentenceEncoder, calibration_corpus, encode_batch,
                                   encoder_dynamic_shapes, length_batches, load_minilm, sentence_embeddings)


def recipe(ratio: float) -> StructuredPruning:
    return StructuredPruning(mac_ratio=ratio, criterion="fluctuation", allocation="sensitivity", reconstruct="all",
                             residual=True, round_to=16)


VARIANTS = {"block": dict(epochs=0), "e2e": dict(block_epochs=0), "both": {}}


def naive_distill(student: torch.nn.Module, teacher: torch.nn.Module, tok: Any, sentences: list[str],
                  budget_s: float, lr: float, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """The issue's naive loop: every float parameter but the embeddings trained end to end for
    ``budget_s`` seconds on token-state MSE + pooled-embedding cosine. Returns (student, steps)."""
    import copy
    import math
    import random
    student = copy.deepcopy(student)
    params = [p for n, p in student.named_parameters() if not n.endswith("_embeddings.weight")]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        enc = tok(rng.sample(sentences, 16), return_tensors="pt", padding=True, truncation=True, max_length=128)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            target = teacher(ids, mask)
        got = student(ids, mask)
        w = mask.unsqueeze(-1).float()
        loss = ((got - target) ** 2 * w).sum() / w.sum() / got.shape[-1]
        loss = loss + (1 - (sentence_embeddings(got, mask) * sentence_embeddings(target, mask)).sum(1)).mean()
        frac = (time.perf_counter() - t0) / budget_s
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, frac / 0.05) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    for p in student.parameters():
        p.requires_grad_(False)
    return student, steps


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.57, 0.72])
    ap.add_argument("--budget", type=float, default=540.0, help="Recover budget_s (wall seconds; 0: none, the epochs bound it)")
    ap.add_argument("--recover", default="{}", help="JSON of extra Recover fields")
    ap.add_argument("--variants", nargs="+", default=["both"], choices=sorted([*VARIANTS, "naive"]))
    ap.add_argument("--naive-lr", type=float, default=3e-4, help="learning rate of the naive baseline loop")
    ap.add_argument("--pruned", default=None, help="load the refit models saved by --save-pruned from this folder")
    ap.add_argument("--save-pruned", default=None, help="save the refit models (.pt2) in this folder")
    ap.add_argument("--threads", type=int, default=1, help="threads for the latency measurement")
    ap.add_argument("--train-threads", type=int, default=0, help="torch threads while compressing and recovering (0: default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ns = ap.parse_args(argv)
    if ns.train_threads:
        torch.set_num_threads(ns.train_threads)

    hf, tok = load_minilm()
    enc = SentenceEncoder(hf).eval()
    example = encode_batch(tok, HELDOUT_SENTENCES[0], seq_len=128)
    captured = sparsecomp.capture(enc, (example[0].repeat(2, 1), example[1].repeat(2, 1)),
                                  dynamic_shapes=encoder_dynamic_shapes(max_seq=512))
    calibration = length_batches(tok, list(calibration_corpus()), batch_size=32, max_len=128)
    ev_ids, ev_mask = encode_batch(tok, HELDOUT_SENTENCES, seq_len=128)
    with torch.no_grad():
        ref = sentence_embeddings(enc(ev_ids, ev_mask), ev_mask)

    def cosine(module: torch.nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            emb = sentence_embeddings(module(ev_ids, ev_mask), ev_mask)
        cos = (emb * ref).sum(1)
        return float(cos.mean()), float(cos.min())

    models: dict[str, torch.nn.Module] = {"dense": captured.module}
    rows: list[dict[str, Any]] = [{"config": "dense", "cosine": 1.0, "min_cosine": 1.0}]
    extra = json.loads(ns.recover)
    for r in ns.ratios:
        path = Path(ns.pruned or ".") / f"pruned_{r:.2f}.pt2"
        t0 = time.perf_counter()
        if ns.pruned:
            ep = torch.export.load(str(path))
            refit = Captured(ep.module(), ep, captured.example_args, captured.example_kwargs, captured.dynamic_shapes)
        else:
            refit = run_pass(captured, recipe(r), calibration).captured
            if ns.save_pruned:
                Path(ns.save_pruned).mkdir(parents=True, exist_ok=True)
                torch.export.save(refit.exported, str(Path(ns.save_pruned) / path.name))
        name = f"{r:.2f} refit"
        models[name] = refit.module
        rows.append({"config": name, "ratio": r, "seconds": time.perf_counter() - t0, **dict(zip(("cosine", "min_cosine"), cosine(refit.module)))})
        print(f"{name}: cosine {rows[-1]['cosine']:.4f}", file=sys.stderr, flush=True)
        for variant in ns.variants:
            if variant == "naive":
                t0, c0 = time.perf_counter(), time.process_time()
                module, steps = naive_distill(refit.module, captured.module, tok, list(calibration_corpus()),
                                              ns.budget or 600.0, ns.naive_lr)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                vname = f"{r:.2f} naive loop"
                models[vname] = module
                mean, lo = cosine(module)
                rows.append({"config": vname, "ratio": r, "seconds": wall, "cpu_seconds": cpu, "steps": steps,
                             "cosine": mean, "min_cosine": lo})
                print(f"{vname}: cosine {mean:.4f} (min {lo:.3f}) in {wall:.0f} s wall / {cpu:.0f} s CPU, {steps} steps",
                      file=sys.stderr, flush=True)
                continue
            cfg = Recover(**{"budget_s": ns.budget or None, "progress": True, **VARIANTS[variant], **extra})
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_pass(refit, cfg, calibration, PassContext(original=captured))
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            vname = f"{r:.2f} recover {variant}"
            models[vname] = res.captured.module
            mean, lo = cosine(res.captured.module)
            rows.append({"config": vname, "ratio": r, "recover": cfg.to_dict(), "seconds": wall, "cpu_seconds": cpu,
                         "cosine": mean, "min_cosine": lo, "phases": res.report})
            print(f"{vname}: cosine {mean:.4f} (min {lo:.3f}) in {wall:.0f} s wall / {cpu:.0f} s CPU; "
                  + "; ".join(f"{p['phase']}: {p.get('val_loss', p.get('skipped'))}" for p in res.report),
                  file=sys.stderr, flush=True)
    if not ns.no_latency:
        lat = measure_latencies(models, example, threads=ns.threads, rounds=ns.rounds, min_time=0.5)
        dense_ms, dense_macs = lat["dense"].median_ms, count_macs(captured.module, example)
        for row in rows:
            row["speedup"] = dense_ms / lat[row["config"]].median_ms
            row["mac_reduction"] = dense_macs / count_macs(models[row["config"]], example)
    header = ["model", "MAC reduction", f"speedup (torch, {ns.threads} thread, batch 1, seq 128)",
              "held-out cosine (mean / min)", "recovery wall / CPU s"]
    body = [[row["config"], f"{row.get('mac_reduction', float('nan')):.2f}x", f"{row.get('speedup', float('nan')):.2f}x",
             f"{row['cosine']:.4f} / {row['min_cosine']:.3f}",
             f"{row['seconds']:.0f} / {row['cpu_seconds']:.0f}" if "cpu_seconds" in row else "-"] for row in rows]
    print(markdown_table(header, body, text_columns=1))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(rows, indent=2, default=str))
    return rows


if __name__ == "__main__":
    main()
