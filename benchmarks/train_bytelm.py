"""Train (or load from the cache) the byte-level Llama LM of sparsecomp.testing.bytelm and print its
held-out perplexity.

    python benchmarks/train_bytelm.py --size small --threads 2
"""

import argparse
import time

import torch

from sparsecomp.testing import bytelm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=sorted(bytelm.SIZES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = bytelm.SIZES[args.size]
    print(f"corpus: train {len(bytelm.corpus('train'))} bytes, held-out {len(bytelm.corpus('heldout'))} bytes")
    t0 = time.time()
    model = bytelm.load_or_train(args.size, args.cache_dir, log=lambda m: print(m, flush=True))
    n = sum(p.numel() for p in model.parameters())
    print(f"model {args.size}: {n / 1e6:.2f}M parameters, ready in {time.time() - t0:.0f} s "
          f"(cache key {bytelm.cache_key(args.size)})")
    for split in ("train", "heldout"):
        print(f"{split} perplexity (seq {s.seq_len}): {bytelm.perplexity(model, split, seq_len=s.seq_len):.3f}")


if __name__ == "__main__":
    main()
