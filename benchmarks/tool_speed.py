"""How long the tool itself takes: default pruning vs one ``torch.export`` of the same model.

For each model: the time of one ``torch.export.export`` (what capture costs at least), of
``sparsecomp.capture``, and of ``sparsecomp.compress(captured, StructuredPruning(ratio=0.5))`` (data-free
default: dependency graph, selection, pruning, shape refresh, interface check), measured in one process,
and their ratio. The goal (issue 25) is default pruning within 3x one export.

    python benchmarks/tool_speed.py                         # zoo resnet50, densenet, hf_bert, hf_llama
    python benchmarks/tool_speed.py --models resnet50 --out docs/tool_speed.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import sparsecomp
from sparsecomp.testing import zoo


def measure(name: str) -> dict:
    built = zoo.build(name)
    model, args = built[0], built[1]
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        torch.export.export(model, args, strict=False)
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    cap = sparsecomp.capture(model, args)
    capture_s = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sparsecomp.compress(cap, None, sparsecomp.StructuredPruning(ratio=0.5))
    prune_s = time.perf_counter() - t
    return {"model": name, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "nodes": len(cap.module.graph.nodes), "export_s": round(export_s, 2), "capture_s": round(capture_s, 2),
            "prune_s": round(prune_s, 2), "prune_over_export": round(prune_s / export_s, 2),
            "phases": out.sparsecomp_report[0]["time"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "densenet", "hf_bert", "hf_llama"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name in args.models:
        row = measure(name)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
