"""One evaluation helper for the real encoder (all-MiniLM-L6-v2): load it, tokenise, embed, compare.

Used by the demo, the tests and the benchmarks, so that they measure fidelity the same way: mean-pooled,
L2-normalised sentence embeddings of the compressed model against the dense one's, by cosine.

>>> enc = load_encoder()                                   # doctest: +SKIP
>>> ids, mask = enc.inputs(BUILTIN_SENTENCES[:8], seq_len=32)  # doctest: +SKIP
>>> cosines(embed(compressed, ids, mask), embed(enc.model, ids, mask)).mean()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from ..calibration.data import progress_bar
from .models import (BUILTIN_SENTENCES, HELDOUT_SENTENCES, SentenceEncoder, calibration_corpus, encode_batch,
                     encoder_dynamic_shapes, length_batches, load_minilm, sentence_embeddings)


@dataclasses.dataclass
class Encoder:
    """The encoder as a tensor-in, tensor-out module (``model(ids, mask) -> hidden states``) and its tokenizer."""

    model: SentenceEncoder
    tokenizer: Any

    def inputs(self, sentences: Sequence[str] | str = BUILTIN_SENTENCES[:2],
               seq_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of ``sentences``, padded / truncated to ``seq_len`` tokens."""
        return encode_batch(self.tokenizer, list(sentences) if not isinstance(sentences, str) else sentences,
                            seq_len=seq_len)

    def capture(self, seq_len: int = 128, max_seq: int = 512) -> Any:
        """The encoder captured with a dynamic batch and sequence length (up to ``max_seq``), traced on two
        copies of a held-out sentence at ``seq_len`` tokens (export specialises size-1 dims)."""
        import sparsecomp

        ids, mask = self.inputs(HELDOUT_SENTENCES[0], seq_len=seq_len)
        return sparsecomp.capture(self.model, (ids.repeat(2, 1), mask.repeat(2, 1)),
                                  dynamic_shapes=encoder_dynamic_shapes(max_seq=max_seq))

    def calibration(self, n: int = 0, batch_size: int = 32, max_len: int = 128) -> list:
        """The packaged calibration corpus (its first ``n`` sentences; 0: all) in length-bucketed batches."""
        corpus = list(calibration_corpus())
        return length_batches(self.tokenizer, corpus[:n] if n else corpus, batch_size=batch_size, max_len=max_len)


def load_encoder(loader: Callable[[], tuple[Any, Any]] | None = None) -> Encoder:
    """all-MiniLM-L6-v2 offline (``loader``: another ``() -> (hf_model, tokenizer)``, e.g. a tiny model in
    tests). Raises :class:`~sparsecomp.errors.MissingDependencyError` without ``sparsecomp[transformers]``."""
    hf_model, tokenizer = (loader or load_minilm)()
    return Encoder(SentenceEncoder(hf_model).eval(), tokenizer)


def embed(module: Callable[..., torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor,
          chunk: int = 16, desc: str = "embeddings", progress: bool = False) -> torch.Tensor:
    """Sentence embeddings of every row, computed in chunks of ``chunk`` sentences.

    Captured graphs have a dynamic batch dimension, so chunks run as batches. A graph that was captured
    with static shapes (batch 1) refuses a larger batch; it is then run one sentence at a time, which
    gives the same embeddings.
    """
    starts = list(range(0, input_ids.shape[0], chunk))
    rows = []
    with torch.inference_mode():
        for i in progress_bar(starts, desc, progress):
            ids, mask = input_ids[i : i + chunk], attention_mask[i : i + chunk]
            try:
                hidden = module(ids, mask)
            except Exception:
                if ids.shape[0] == 1:
                    raise
                hidden = torch.cat([module(ids[j : j + 1], mask[j : j + 1]) for j in range(ids.shape[0])])
            rows.append(sentence_embeddings(hidden, mask))
    return torch.cat(rows)


def cosines(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sentence cosine similarity of two sets of embeddings."""
    return torch.nn.functional.cosine_similarity(embeddings, reference, dim=1)
