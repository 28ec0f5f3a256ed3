"""A small byte-level Llama language model trained on English text that ships with Python.

Random weights have no structure for data-driven passes (PCA, activation statistics) to find, and no
trained decoder LM ships as a Python package, so this module builds one: a pre-norm Hugging Face
``LlamaForCausalLM`` (GQA, RoPE, RMSNorm, SwiGLU) over the 256 byte values, trained on the standard
library's documentation (``pydoc_data.topics`` and the docstrings of the stdlib's source files, read with
``ast``, never imported). Documents are deduplicated and split into train / held-out by a hash of their
text, so the split is deterministic and no text is in both.

Trained weights are cached under ``$SPARSECOMP_CACHE_DIR/bytelm`` (else ``~/.cache/sparsecomp/bytelm``),
keyed by the size and a hash of the model config, the training settings and the corpus.

Example
-------
>>> from sparsecomp.testing import bytelm
>>> model = bytelm.load_or_train("tiny")                     # doctest: +SKIP
>>> bytelm.perplexity(model, "heldout")                      # doctest: +SKIP
>>> batches = bytelm.calibration_batches(16, 128)            # [(ids,), ...] of shape [1, 128]  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

VOCAB = 256
SPLITS = ("train", "heldout")
_HELDOUT_EVERY = 10  # one document in ten (by name hash) is held out


@dataclasses.dataclass(frozen=True)
class Size:
    """Model shape and training settings of one named size."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    batch: int
    steps: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.1
    seed: int = 0


SIZES: dict[str, Size] = {
    # the tests' model: trains in ~15 s on one core
    "tiny": Size(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, seq_len=64, batch=16,
                 steps=300, lr=3e-3, warmup=30),
    # the benchmarks' model: 1.7M parameters, ~10 min of one free core
    "small": Size(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512, seq_len=128, batch=8,
                  steps=500, lr=3e-3, warmup=40),
}


# --------------------------------------------------------------------------
# corpus
# --------------------------------------------------------------------------


def _stdlib_docstrings() -> dict[str, str]:
    """``{"module:qualname": docstring}`` for the stdlib's .py files (tests, idlelib and site-packages skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
    docs: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in skip for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        mod = ".".join(rel.with_suffix("").parts)
        stack: list[tuple[ast.AST, str]] = [(tree, mod)]
        while stack:
            node, name = stack.pop()
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 80:
                docs[name] = doc
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    stack.append((child, f"{name}.{child.name}"))
    return docs


@functools.lru_cache(maxsize=None)
def _documents() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    docs = {f"topic:{k}": v.strip() for k, v in topics.items()}
    docs.update({f"doc:{k}": v.strip() for k, v in _stdlib_docstrings().items()})
    seen: set[str] = set()
    unique = []
    for name, text in sorted(docs.items()):  # a text repeated under several names is kept once
        if text not in seen:
            seen.add(text)
            unique.append((name, text))
    return tuple(unique)


def _split_of(text: str) -> str:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    return "heldout" if h % _HELDOUT_EVERY == 0 else "train"


@functools.lru_cache(maxsize=None)
def corpus(split: str) -> bytes:
    """The UTF-8 bytes of one split (``"train"`` or ``"heldout"``): its documents, sorted by name, joined by
    blank lines. The two splits share no document."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {SPLITS}")
    parts = [text for name, text in _documents() if _split_of(text) == split]
    return "\n\n".join(parts).encode("utf-8")


@functools.lru_cache(maxsize=None)
def _tokens(split: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(corpus(split)), dtype=torch.uint8).long()


def corpus_hash() -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(corpus(split))
    return h.hexdigest()[:16]


def encode(text: str) -> torch.Tensor:
    """``[1, len]`` token ids of ``text`` (its UTF-8 bytes)."""
    return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(int(i) for i in ids.reshape(-1).tolist()).decode("utf-8", errors="replace")


def calibration_batches(n: int, seq_len: int, batch: int = 1, seed: int = 0,
                        split: str = "train") -> list[tuple[torch.Tensor]]:
    """``n`` batches ``(ids,)`` of shape ``[batch, seq_len]``: windows of ``split`` at seeded random offsets."""
    toks = _tokens(split)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(toks) - seq_len, (n, batch), generator=g)
    return [(torch.stack([toks[s:s + seq_len] for s in row.tolist()]),) for row in starts]


def heldout_windows(seq_len: int, max_windows: int | None = 64) -> torch.Tensor:
    """``[w, seq_len + 1]`` non-overlapping windows of the held-out split, evenly spread over it."""
    toks = _tokens("heldout")
    total = (len(toks) - 1) // seq_len
    idx = range(total) if max_windows is None or max_windows >= total else \
        [int(i * total / max_windows) for i in range(max_windows)]
    return torch.stack([toks[i * seq_len:i * seq_len + seq_len + 1] for i in idx])


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


def config(size: str = "small"):
    """The ``LlamaConfig`` of a named size (byte vocabulary, GQA, RoPE, RMSNorm, SwiGLU, SDPA attention)."""
    from transformers import LlamaConfig

    s = _size(size)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=max(s.seq_len, 512),
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build(size: str = "small") -> nn.Module:
    """A freshly initialised (seeded) ``LlamaForCausalLM`` of a named size."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(_size(size).seed)
    return LlamaForCausalLM(config(size)).eval()


class Logits(nn.Module):
    """``ids -> logits`` view of a causal LM (``use_cache=False``): what sparsecomp captures and compresses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def _size(size: str) -> Size:
    if size not in SIZES:
        raise ValueError(f"unknown bytelm size {size!r}; valid: {sorted(SIZES)}")
    return SIZES[size]


def cache_key(size: str) -> str:
    import transformers

    payload = json.dumps({
        "size": size, "settings": dataclasses.asdict(_size(size)), "config": config(size).to_dict(),
        "corpus": corpus_hash(), "transformers": transformers.__version__.split(".")[0],
    }, sort_keys=True, default=str)
    return f"{size}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("SPARSECOMP_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "sparsecomp") / "bytelm"


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return _logits_of(out[0])
    raise TypeError(f"cannot find logits in an output of type {type(out).__name__}")


def _call(model: Callable, ids: torch.Tensor) -> torch.Tensor:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model(input_ids=ids, use_cache=False, return_dict=True).logits
    return _logits_of(model(ids))


def train(size: str = "small", log: Callable[[str], None] | None = None) -> nn.Module:
    """Train a model of a named size from scratch (seeded; AdamW, warm-up then cosine decay)."""
    s = _size(size)
    model = build(size).train()
    toks = _tokens("train")
    g = torch.Generator().manual_seed(s.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=s.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        t = (step - s.warmup) / max(1, s.steps - s.warmup)
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    t0 = time.time()
    for step in range(s.steps):
        starts = torch.randint(0, len(toks) - s.seq_len - 1, (s.batch,), generator=g).tolist()
        win = torch.stack([toks[i:i + s.seq_len + 1] for i in starts])
        logits = model(input_ids=win[:, :-1], use_cache=False, return_dict=True).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), win[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log is not None and (step % 25 == 0 or step == s.steps - 1):
            log(f"bytelm[{size}] step {step + 1}/{s.steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return model.eval()


def load_or_train(size: str = "small", cache_dir: str | os.PathLike | None = None,
                  log: Callable[[str], None] | None = None) -> nn.Module:
    """The trained ``LlamaForCausalLM`` of a named size: from the cache, else trained now and cached.

    The cache file is ``<cache_dir>/<size>-<hash>.pt`` (the hash covers the config, the training settings
    and the corpus); writes are atomic, so concurrent callers at worst train twice.
    """
    path = globals()["cache_dir"](cache_dir) / f"{cache_key(size)}.pt"
    model = build(size)
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception as exc:  # a corrupt or foreign file: retrain, say so
            print(f"bytelm: ignoring unreadable cache file {path} ({exc})", file=sys.stderr)
    model = train(size, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model


@torch.no_grad()
def perplexity(model: Callable, split: str = "heldout", seq_len: int = 128, max_windows: int | None = 64,
               batch: int = 8) -> float:
    """Per-byte perplexity of ``model`` (a HF causal LM, or any callable ``ids -> logits`` such as a
    compressed graph) on non-overlapping ``seq_len`` windows of ``split`` (held-out by default).

    A graph captured at a fixed sequence length needs ``seq_len`` to match it.
    """
    if split == "heldout":
        windows = heldout_windows(seq_len, max_windows)
    else:
        windows = torch.cat([b[0] for b in calibration_batches(max_windows or 64, seq_len + 1, split=split)])
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = _call(model, w[:, :-1]).float()
        nll += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                           reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(nll / count)
