"""Plot fidelity (mean cosine of MiniLM sentence embeddings) against measured speedup: docs/fidelity.png.

    python benchmarks/plot_fidelity.py                       # the recorded numbers, docs/fidelity_minilm.json
    python benchmarks/plot_fidelity.py --rows run.json       # plus a fresh fidelity_minilm.py --out run.json

The recorded points are the ones docs/BENCHMARKS.md reports (see the JSON's "about"); a fresh run's rows
(``config``, ``speedup``, ``cosine``) are drawn as one more series. Needs matplotlib (``sparsecomp[bench]``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_series(recorded: Path, rows: Path | None = None) -> dict[str, list[tuple[float, float]]]:
    series = {name: [tuple(p) for p in pts] for name, pts in json.loads(recorded.read_text())["series"].items()}
    if rows is not None:
        run = json.loads(rows.read_text())
        series[f"this run ({rows.name})"] = sorted((float(r["speedup"]), float(r["cosine"])) for r in run)
    return series


def plot(series: dict[str, list[tuple[float, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, pts in series.items():
        xs, ys = zip(*sorted(pts))
        style = "--" if "Torch-Pruning" in name or "without" in name else "-"
        ax.plot(xs, ys, style, marker="o", label=name)
    ax.set_xlabel("measured speedup over dense (torch, 1 thread, batch 1, seq 128)")
    ax.set_ylabel("mean cosine to dense embeddings (held-out)")
    ax.set_title("all-MiniLM-L6-v2: fidelity vs speedup")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recorded", type=Path, default=DOCS / "fidelity_minilm.json")
    ap.add_argument("--rows", type=Path, default=None, help="rows written by fidelity_minilm.py --out")
    ap.add_argument("--out", type=Path, default=DOCS / "fidelity.png")
    ns = ap.parse_args(argv)
    plot(load_series(ns.recorded, ns.rows), ns.out)
    print(f"wrote {ns.out}")
    return ns.out


if __name__ == "__main__":
    main()
