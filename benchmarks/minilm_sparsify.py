"""Sparsify fidelity on all-MiniLM-L6-v2: Wanda vs magnitude, per sparsity pattern.

For every (criterion, pattern) the 36 ``linear`` layers of the real MiniLM encoder are sparsified with
``sparsecomp.Sparsify`` (calibrated on ``BUILTIN_SENTENCES``), and the sentence embeddings of the
``HELDOUT_SENTENCES`` are compared with the dense model's:

* ``mean cos`` / ``min cos``: cosine similarity to the dense embedding, mean and worst sentence;
* ``rel. error``: ``||E - E_dense||_F / ||E_dense||_F`` over all held-out embeddings;
* ``mean layer err``: mean over layers of the pass's per-layer relative output error on calibration data.

Fidelity does not depend on the storage format, so the pass runs with ``cost_model="never"`` (masked
dense weights; the sparse operators compute the same values to float rounding, see tests/test_sparsify.py).

Usage::

    python benchmarks/minilm_sparsify.py                                  # ~1-2 min on 2 cores
    python benchmarks/minilm_sparsify.py --patterns 50% 2:4 --seq-len 64 --out bench_out/minilm_sparsify.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp.app.metrics import markdown_table
from sparsecomp.app.evaluate import cosines, embed, load_encoder
from sparsecomp.app.models import BUILTIN_SENTENCES, HELDOUT_SENTENCES

PATTERNS = {
    "50%": dict(sparsity=0.5),
    "70%": dict(sparsity=0.7),
    "2:4": dict(pattern="n:m", n=2, m=4),
    "16x1 50%": dict(sparsity=0.5, pattern="block", block=(16, 1)),
    "4x4 50%": dict(sparsity=0.5, pattern="block", block=(4, 4)),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    p.add_argument("--criteria", nargs="+", default=["magnitude", "wanda"], choices=["magnitude", "wanda"])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib", type=int, default=len(BUILTIN_SENTENCES), help="calibration sentences")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="also write the rows as JSON")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)

    enc = load_encoder()
    encoder = enc.model
    calib_ids, calib_mask = enc.inputs(BUILTIN_SENTENCES[:ns.calib], ns.seq_len)
    ids, mask = enc.inputs(HELDOUT_SENTENCES, ns.seq_len)
    calibration = [(calib_ids[i:i + 16], calib_mask[i:i + 16]) for i in range(0, calib_ids.shape[0], 16)]
    captured = sparsecomp.capture(encoder, (ids[:2], mask[:2]))
    dense = embed(encoder, ids, mask)

    rows = []
    for pattern in ns.patterns:
        for criterion in ns.criteria:
            cfg = sparsecomp.Sparsify(criterion=criterion, cost_model="never", **PATTERNS[pattern])
            t0 = time.perf_counter()
            out = sparsecomp.compress(captured, None, cfg, calibration=calibration)
            seconds = time.perf_counter() - t0
            emb = embed(out, ids, mask)
            cos = cosines(emb, dense)
            layers = [r for r in out.sparsecomp_report[0]["layers"] if "relative_error" in r]
            rows.append({
                "pattern": pattern, "criterion": criterion, "config": cfg.to_dict(),
                "sparsity": sum(r["sparsity"] for r in layers) / len(layers),
                "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                "rel_error": float((emb - dense).norm() / dense.norm()),
                "mean_layer_error": sum(r["relative_error"] for r in layers) / len(layers),
                "compress_s": seconds,
            })
            print(f"{pattern:>9} {criterion:>9}: mean cos {rows[-1]['mean_cos']:.4f} "
                  f"({seconds:.1f} s)", file=sys.stderr)

    print(f"all-MiniLM-L6-v2, {len(calib_ids)} calibration / {len(ids)} held-out sentences, seq {ns.seq_len}; "
          f"torch {torch.__version__}\n")
    header = ["pattern", "criterion", "sparsity", "mean cos", "min cos", "rel. error", "mean layer err"]
    body = [[r["pattern"], r["criterion"], f"{r['sparsity']:.3f}", f"{r['mean_cos']:.4f}", f"{r['min_cos']:.4f}",
             f"{r['rel_error']:.4f}", f"{r['mean_layer_error']:.4f}"] for r in rows]
    print(markdown_table(header, body, text_columns=2))
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        env = {"torch": torch.__version__, "platform": platform.platform(), "threads": ns.threads,
               "seq_len": ns.seq_len, "calibration_sentences": len(calib_ids), "heldout_sentences": len(ids)}
        Path(ns.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
