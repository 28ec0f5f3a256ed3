"""The trained byte-level LM of sparsecomp.testing.bytelm: corpus split, determinism, quality, caching."""

import torch

from sparsecomp.testing import bytelm


def test_corpus_splits_are_disjoint_and_deterministic():
    train, held = bytelm.corpus("train"), bytelm.corpus("heldout")
    assert len(train) > 1_000_000 and len(held) > 100_000
    docs = bytelm._documents()
    texts = [t for _, t in docs]
    assert len(set(texts)) == len(texts)  # every text once, so no text is in both splits
    held_docs = [t for t in texts if bytelm._split_of(t) == "heldout"]
    assert 0.05 < len(held_docs) / len(texts) < 0.15
    assert held == "\n\n".join(held_docs).encode()
    a = bytelm.calibration_batches(3, 32, batch=2, seed=5)
    b = bytelm.calibration_batches(3, 32, batch=2, seed=5)
    assert all(torch.equal(x[0], y[0]) and x[0].shape == (2, 32) for x, y in zip(a, b))


def test_tiny_lm_learned_the_text(bytelm_tiny):
    ppl = bytelm.perplexity(bytelm_tiny, "heldout", seq_len=64, max_windows=32)
    fresh = bytelm.perplexity(bytelm.build("tiny"), "heldout", seq_len=64, max_windows=32)
    assert ppl < 14 < 200 < fresh  # a uniform guess over bytes is 256


def test_cache_roundtrip(bytelm_tiny, tmp_path):
    path = tmp_path / f"{bytelm.cache_key('tiny')}.pt"
    torch.save(bytelm_tiny.state_dict(), path)
    again = bytelm.load_or_train("tiny", tmp_path)
    ids = bytelm.encode("The quick brown fox")
    with torch.no_grad():
        assert torch.equal(bytelm.Logits(again)(ids), bytelm.Logits(bytelm_tiny)(ids))
