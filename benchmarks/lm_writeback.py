"""Compress the trained byte-level Llama, write the result back onto the HF module, generate, save, load.

    python benchmarks/lm_writeback.py [--ratio 0.5] [--tokens 64] [--out bench_out/lm_writeback.json]

The model is ``sparsecomp.testing.bytelm`` ("small": an HF ``LlamaForCausalLM`` with GQA, RoPE, RMSNorm and
SwiGLU trained on the standard library's documentation; trained once and cached). Per step it prints the
wall time; at the end held-out perplexity (dense, compressed graph, written-back module, reloaded module),
whether greedy ``generate()`` with the KV cache gives exactly the tokens of greedy decoding with the graph
(full recompute, no cache) on held-out prompts, whether save -> load gives bit-identical logits, and the
torch speedups (1 thread, batch 1, 128 tokens) of the graph and of the written-back module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.export import Dim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import sparsecomp  # noqa: E402
from sparsecomp.testing import bytelm  # noqa: E402


def _median_ms(fn, x, rounds: int = 30) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        ts = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return 1e3 * sorted(ts)[len(ts) // 2]


def _greedy_graph(gm, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    cur = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = bytelm._logits_of(gm(cur))
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return cur


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of each head / neuron group removed")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences of 128 tokens")
    ap.add_argument("--out", default="bench_out/lm_writeback.json")
    args = ap.parse_args(argv)
    t_start = time.time()
    say = lambda msg: print(f"[{time.time() - t_start:6.1f} s] {msg}", flush=True)  # noqa: E731

    model = bytelm.load_or_train(args.size, log=say)
    say(f"bytelm[{args.size}]: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    ids = bytelm.calibration_batches(1, 128, batch=2, seed=1)[0][0]
    model.config.use_cache = False
    cap = sparsecomp.capture(model, (ids,), dynamic_shapes=({0: Dim("batch", min=1, max=64),
                                                             1: Dim("seq", min=2, max=512)},))
    say("captured (dynamic batch and sequence length)")
    cfg = sparsecomp.StructuredPruning(ratio=args.ratio, criterion="fluctuation", allocation="uniform",
                                       reconstruct="all", token_mask=None)
    small = sparsecomp.compress(cap, None, cfg, calibration=bytelm.calibration_batches(args.calib, 128))
    say("compressed")
    wb = sparsecomp.write_back(model, small, (ids,))
    say("written back onto the HF module (verified against the graph)")

    rows = {"dense": bytelm.perplexity(model), "graph": bytelm.perplexity(small),
            "written_back": bytelm.perplexity(wb)}
    with tempfile.TemporaryDirectory() as d:
        sparsecomp.save_compressed(wb, d)
        again = sparsecomp.load_compressed(d)
        rows["reloaded"] = bytelm.perplexity(again)
        with torch.no_grad():
            x = bytelm.heldout_windows(128, 4)[:, :-1]
            bit_identical = bool(torch.equal(again(input_ids=x).logits, wb(input_ids=x).logits))
    say(f"saved and reloaded: bit-identical logits {bit_identical}")

    wb.config.use_cache = True
    prompts = bytelm.heldout_windows(32, args.prompts)[:, :32]
    same = 0
    for p in prompts:
        p = p[None]
        gen = wb.generate(p, max_new_tokens=args.tokens, do_sample=False, use_cache=True, pad_token_id=0)
        ref = _greedy_graph(small, p, args.tokens)
        same += int(torch.equal(gen, ref))
    say(f"generate() with KV cache == greedy with the graph: {same}/{len(prompts)} prompts")
    sample = bytelm.decode(wb.generate(prompts[:1], max_new_tokens=args.tokens, do_sample=False,
                                       pad_token_id=0)[0, 32:])

    torch.set_num_threads(1)
    x = bytelm.heldout_windows(128, 1)[:, :-1]
    dense_fn = lambda t: model(input_ids=t, use_cache=False)  # noqa: E731
    wb_fn = lambda t: wb(input_ids=t, use_cache=False)  # noqa: E731
    t_dense, t_graph, t_wb = (_median_ms(f, x) for f in (dense_fn, small, wb_fn))
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    result = {
        "size": args.size, "ratio": args.ratio, "params_dense": params(model), "params_small": params(wb),
        "perplexity": rows, "generate_matches_graph": f"{same}/{len(prompts)}", "save_load_bit_identical":
        bit_identical, "ms": {"dense": t_dense, "graph": t_graph, "written_back": t_wb},
        "speedup": {"graph": t_dense / t_graph, "written_back": t_dense / t_wb}, "sample": sample,
        "wall_s": time.time() - t_start,
    }
    print(json.dumps(result, indent=1))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
