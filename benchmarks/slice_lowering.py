"""Sliced models lowered to ONNX Runtime and TVM: latency of dense vs sliced per backend (1 thread,
batch 1; one interleaved run, so the ratios within a backend are what counts).

    python benchmarks/slice_lowering.py --ratios 0.25 0.5 --backends torch ort        # bytelm, seq 128
    python benchmarks/slice_lowering.py --model llama --backends torch ort tvm        # a zoo model

(The HF Llama graph of bytelm does not build in TVM's pipeline, dense or sliced: a ``strided_slice`` with
axis -1 in its legalizer; the zoo's hand-written Llama does.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

try:
    import sparsecomp
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import sparsecomp

from sparsecomp import Slice
from sparsecomp.app.metrics import markdown_table, measure_latencies
from sparsecomp.testing import bytelm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(bytelm.SIZES))
    ap.add_argument("--model", default="bytelm", help="'bytelm' or a zoo model name (calibrated on its example)")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5])
    ap.add_argument("--backends", nargs="*", default=["torch", "ort", "tvm"])
    ap.add_argument("--rounds", type=int, default=3)
    ns = ap.parse_args()
    torch.set_num_threads(1)
    seq = 128
    if ns.model == "bytelm":
        model = bytelm.Logits(bytelm.load_or_train(ns.size)).eval()
        example = bytelm.calibration_batches(1, seq, batch=1, seed=99)[0]
        calib = bytelm.calibration_batches(32, seq, batch=4)
    else:
        from sparsecomp.testing import zoo

        model, example, kwargs = zoo.build(ns.model)
        assert not kwargs, "zoo models with keyword inputs are not supported here"
        example, calib = tuple(t[:1] for t in example), [example]
    captured = sparsecomp.capture(model, example)
    graphs = {"dense": captured.module}
    for r in ns.ratios:
        graphs[f"slice {r:.2f}"] = sparsecomp.compress(captured, example, Slice(ratio=r), calibration=calib)
    fns, ppl = {}, {}
    for name, gm in graphs.items():
        for backend in ns.backends:
            t0 = time.time()
            fns[(name, backend)] = gm if backend == "torch" else sparsecomp.lower(gm, example, backend, num_threads=1)
            print(f"{name} -> {backend}: {time.time() - t0:.0f} s", flush=True)
    lat = measure_latencies({f"{n}|{b}": f for (n, b), f in fns.items()}, example, threads=1, rounds=ns.rounds)
    rows = []
    for (name, backend), f in fns.items():
        ms, base = lat[f"{name}|{backend}"].median_ms, lat[f"dense|{backend}"].median_ms
        with torch.no_grad():
            ref, got = graphs[name](*example), f(*example)
        got = got[0] if isinstance(got, (tuple, list)) else got
        err = float((got - ref).abs().max() / ref.abs().max())
        rows.append([name, backend, f"{ms:.2f}", f"{base / ms:.2f}x", f"{err:.1e}"])
    print(f"\n{ns.model} sliced, lowered (1 thread, batch 1)\n")
    print(markdown_table(["variant", "backend", "ms", "speedup vs dense on the same backend",
                          "max err vs torch graph"], rows, text_columns=2))


if __name__ == "__main__":
    main()
