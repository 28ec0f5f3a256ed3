"""Hugging Face Llama shapes at real size with random weights, built fast, for scale tests and benchmarks.

``build("1.1b")`` is a TinyLlama-shaped ``LlamaForCausalLM`` (22 layers, hidden 2048, GQA 32/4, MLP 5632,
vocabulary 32k); the parameters are allocated once (on the meta device first) and drawn from N(0, 0.02)
with norms at one, which skips transformers' per-module initialisation (minutes at 1B parameters).
:class:`PeakRSS` samples the process's resident memory in a thread: the peak of one block of code, which
``resource``'s lifetime peak cannot give.
"""

from __future__ import annotations

import os
import threading

import torch

SHAPES = {
    "mid": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, vocab_size=8192),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048, vocab_size=32000),
    "160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=3072, vocab_size=32000),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000),
}


def build(shape: str, seed: int = 0) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` of the named shape (see ``SHAPES``) in eval mode, random weights, untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():  # rotary tables: to_empty left them uninitialised; build them again
            if type(module).__name__.endswith("RotaryEmbedding"):
                fresh = type(module)(config=cfg)
                for name, buf in fresh.named_buffers(recurse=False):
                    getattr(module, name).copy_(buf)
    return model.eval()


def rss_bytes() -> int:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """``with PeakRSS() as peak: ...``; then ``peak.peak`` is the largest resident memory seen (bytes),
    sampled every ``period`` seconds, and ``peak.start`` the resident memory on entry."""

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
