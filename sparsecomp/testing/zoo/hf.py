"""Zoo models from Hugging Face transformers (random init from small configs), wrapped to return tensors."""

from __future__ import annotations

import torch
from torch import nn

from .common import BuildResult, _randomize_norms


# --------------------------------------------------------------------------
# HuggingFace transformers models (random init from small configs)
# --------------------------------------------------------------------------


def _hf_model(model_cls, config, attn: str = "sdpa") -> nn.Module:
    config._attn_implementation = attn
    model = model_cls(config)
    _randomize_norms(model)
    return model


class HFBert(nn.Module):
    """BertModel wrapper returning ``(last_hidden_state, pooler_output)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True
        )
        return out.last_hidden_state, out.pooler_output


class HFLastHidden(nn.Module):
    """Wrapper returning ``(last_hidden_state,)`` of a HF base model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        return (out.last_hidden_state,)


class HFLogits(nn.Module):
    """Wrapper returning ``(logits,)`` of a HF head model."""

    def __init__(self, model: nn.Module, input_name: str = "input_ids", **call_kwargs):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.call_kwargs = call_kwargs

    def forward(self, x, attention_mask=None):
        kw = dict(self.call_kwargs)
        if attention_mask is not None:
            kw["attention_mask"] = attention_mask
        out = self.model(**{self.input_name: x}, **kw, return_dict=True)
        return (out.logits,)


def _padded_mask(batch: int, seq: int, pad: int) -> torch.Tensor:
    """Attention mask with the last ``pad`` positions of the last row padded out."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - pad:] = 0
    return mask


def build_hf_bert() -> BuildResult:
    """transformers BertModel (vocab 1000, hidden 64, 4 layers, 4 heads, ffn 256, sdpa) with attention_mask."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    )
    model = HFBert(_hf_model(BertModel, cfg))
    ids = torch.randint(0, 1000, (2, 16))
    kwargs = {"attention_mask": _padded_mask(2, 16, 4), "token_type_ids": torch.zeros(2, 16, dtype=torch.long)}
    return model.eval(), (ids,), kwargs


def build_hf_gpt2() -> BuildResult:
    """transformers GPT2LMHeadModel (vocab 1000, 64 dim, 4 layers, 4 heads, tied lm_head, sdpa) with attention_mask."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=1000, n_positions=64, n_embd=64, n_layer=4, n_head=4, use_cache=False,
        bos_token_id=999, eos_token_id=999,
    )
    model = HFLogits(_hf_model(GPT2LMHeadModel, cfg), use_cache=False)
    ids = torch.randint(0, 1000, (2, 16))
    return model.eval(), (ids,), {"attention_mask": torch.ones(2, 16, dtype=torch.long)}


def build_hf_llama() -> BuildResult:
    """transformers LlamaModel (vocab 1000, hidden 64, 4 layers, GQA 4/2 heads, ffn 176, sdpa) with attention_mask."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )
    model = HFLastHidden(_hf_model(LlamaModel, cfg))
    ids = torch.randint(0, 1000, (2, 16))
    return model.eval(), (ids,), {"attention_mask": torch.ones(2, 16, dtype=torch.long)}


def build_hf_vit() -> BuildResult:
    """transformers ViTForImageClassification (image 32, patch 8, hidden 64, 2 layers, 4 heads, 10 labels, sdpa)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=10,
    )
    model = HFLogits(_hf_model(ViTForImageClassification, cfg), input_name="pixel_values")
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,), {}
