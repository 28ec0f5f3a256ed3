"""Capture: every input dim dynamic where the model allows it, a clear error outside what was captured,
Hugging Face causal LMs captured with their default config."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp.capture.export import capture
from sparsecomp.errors import ShapeError


class TokensAndImage(nn.Module):
    """Token ids + mask (any length, equal), an image whose channels a conv pins (spatial dims free)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 8)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, ids, mask, img):
        return self.fc(self.emb(ids)) * mask[..., None], self.conv(img).amax((2, 3))


def _inputs(batch=1, seq=12, hw=(8, 8)):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return (torch.randint(0, 50, (batch, seq), generator=g), torch.ones(batch, seq),
            torch.randn(batch, 3, *hw, generator=g))


def test_every_input_dim_is_dynamic_unless_the_model_pins_it():
    cap = capture(TokensAndImage(), _inputs())
    dims = dict(cap.input_dims())
    assert all(isinstance(s, str) for s in dims["ids"]) and dims["mask"] == dims["ids"]
    assert dims["img"][1] == 3 and all(isinstance(dims["img"][d], str) for d in (0, 2, 3))
    model = TokensAndImage().eval()
    x = _inputs(batch=3, seq=40, hw=(11, 7))
    for got, want in zip(cap.module(*x), model(*x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compressed_model_runs_at_another_sequence_length():
    """The issue's case: compress at length 32, call at length 128 (was a guard AssertionError)."""
    model = TokensAndImage().eval()
    small = sparsecomp.compress(model, _inputs(seq=32), sparsecomp.StructuredPruning(ratio=0.5))
    assert small.fc.weight.shape[1] == 8  # the embedding width, halved
    out = small(*_inputs(batch=2, seq=128))
    assert out[0].shape == (2, 128, 8)


@pytest.mark.parametrize("bad, match", [
    (lambda: (torch.randint(0, 50, (2, 12)), torch.ones(2, 13), torch.randn(2, 3, 8, 8)),
     "input 'mask' dim 1 is 13 but input 'ids' dim 1 is 12"),
    (lambda: (torch.randint(0, 50, (2, 12)), torch.ones(2, 12), torch.randn(2, 4, 8, 8)),
     "input 'img' dim 1 is 4, .* static at 3"),
    (lambda: (torch.randint(0, 50, (2, 12)), torch.ones(2, 12), torch.randn(2, 3, 2, 8)),
     "input 'img' dim 2 is 2, outside the range"),
    (lambda: (torch.randint(0, 50, (2, 12)), torch.ones(2, 12), torch.randn(3, 8, 8)),
     "input 'img' has 3 dims"),
])
def test_a_shape_outside_the_capture_is_a_clear_error(bad, match):
    small = sparsecomp.compress(TokensAndImage(), _inputs(), sparsecomp.StructuredPruning(ratio=0.5))
    with pytest.raises(ShapeError, match=match):
        small(*bad())


class PinnedLength(nn.Module):
    """A linear over the flattened sequence pins the sequence length."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(6 * 4, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids).flatten(1))


def test_a_pinned_token_dim_is_captured_static_with_a_warning():
    with pytest.warns(UserWarning, match=r"pins ids dim 1 \(= 6\)"):
        cap = capture(PinnedLength(), (torch.randint(0, 10, (2, 6)),))
    assert dict(cap.input_dims())["ids"][1] == 6 and isinstance(dict(cap.input_dims())["ids"][0], str)
    assert any("ids[1]=6" in n for n in cap.notes)
    assert cap.module(torch.randint(0, 10, (5, 6))).shape == (5, 2)


def test_hf_encoder_compressed_at_32_runs_at_128():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=256), add_pooling_layer=False).eval()
    ids, mask = torch.randint(0, 64, (2, 32)), torch.ones(2, 32, dtype=torch.long)
    small = sparsecomp.compress(hf, (ids, mask), sparsecomp.StructuredPruning(ratio=0.0, criterion="l2"))
    ids, mask = torch.randint(0, 64, (3, 128)), torch.ones(3, 128, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(small(ids, mask).last_hidden_state, hf(ids, mask).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_hf_causal_lm_with_default_config_captures():
    """LlamaForCausalLM returns a DynamicCache unless use_cache is off: capture turns it off (and back)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)).eval()
    assert lm.config.use_cache is True
    ids = torch.randint(0, 64, (2, 16))
    small = sparsecomp.compress(lm, (ids,), sparsecomp.StructuredPruning(ratio=0.5, criterion="l2"))
    assert lm.config.use_cache is True  # restored
    assert small.model.layers.get_submodule("0").mlp.up_proj.weight.shape[0] == 32
    longer = torch.randint(0, 64, (1, 40))
    assert small(longer).logits.shape == (1, 40, 64)
    cap = capture(lm, (ids,))
    assert any("use_cache=False" in n for n in cap.notes)
    with torch.no_grad():
        torch.testing.assert_close(cap.module(longer).logits, lm(longer, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
