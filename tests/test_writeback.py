"""Write-back onto the user's eager module, generate() with a KV cache, save/load, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.export import Dim

import sparsecomp
from sparsecomp.errors import UnsupportedError, VerificationError
from sparsecomp.writeback import LowRankConv, LowRankLinear

transformers = pytest.importorskip("transformers")


def _tiny_llama(tie: bool = True) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model


def _compress_llama(model, configs):
    ids = torch.randint(0, 128, (2, 12))
    cap = sparsecomp.capture(model, (ids,), dynamic_shapes=({0: Dim("batch", min=1, max=16),
                                                              1: Dim("seq", min=2, max=64)},))
    return sparsecomp.compress(cap, None, configs), ids


def _greedy_with_graph(gm, prompt, steps):
    cur = prompt
    for _ in range(steps):
        logits = gm(cur).logits
        cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return cur


def test_llama_prune_lowrank_write_back_generate_save_load(tmp_path):
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, ids = _compress_llama(model, [sparsecomp.StructuredPruning(ratio=0.5),
                                         sparsecomp.LowRank(rank_ratio=0.25, cost_model="always")])
    wb = sparsecomp.write_back(model, small, (ids,))
    # the user's model is untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    attn = wb.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LowRankLinear) and attn.q_proj.out_features == 32  # 4 of 8 heads
    assert wb.model.layers[0].self_attn.k_proj.out_features == 8  # 1 of 2 kv heads
    assert wb.model.layers[0].mlp.gate_proj.out_features == 64
    assert sum(p.numel() for p in wb.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    # the eager model with its KV cache generates exactly what greedy decoding with the graph gives
    wb.config.use_cache = True
    prompt = ids[:1, :5]
    gen = wb.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(gen, _greedy_with_graph(small, prompt, 12))
    # save -> load: the same class, bit-identical logits
    sparsecomp.save_compressed(wb, tmp_path / "m")
    again = sparsecomp.load_compressed(tmp_path / "m")
    assert type(again) is type(wb)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, wb(ids).logits)


class _HardCodedHeads(nn.Module):
    """Attention whose forward reads a head count it keeps as an attribute (not inferred from shapes)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_size = heads, d // heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, self.num_heads, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_size))


def test_write_back_refuses_hard_coded_head_count_and_leaves_model_intact():
    torch.manual_seed(0)
    model = nn.Sequential(_HardCodedHeads(), nn.Linear(32, 8)).eval()
    x = torch.randn(2, 6, 32)
    small = sparsecomp.compress(model, (x,), sparsecomp.StructuredPruning(ratio=0.5, granularity="head"))
    assert small.get_parameter("0.qkv.weight").shape[0] < 96  # heads were removed in the graph
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(VerificationError, match="num_heads=4"):
        sparsecomp.write_back(model, small, (x,), inplace=True)
    # in place, but refused: every change undone
    assert model[0].qkv.weight.shape == (96, 32) and model[0].qkv.out_features == 96
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_write_back_cnn_with_batchnorm_and_user_built_model_reload(tmp_path):
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    model = build().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 12, 12)
    small = sparsecomp.compress(model, (x,), [sparsecomp.StructuredPruning(ratio=0.5),
                                             sparsecomp.LowRank(rank_ratio=0.5, cost_model="always")])
    wb = sparsecomp.write_back(model, small, (x,))
    assert wb[1].num_features == 8 and wb[4].num_groups == 4 and wb[4].num_channels == 16
    assert isinstance(wb[3], LowRankConv) and wb[3].conv.in_channels == 8 and wb[3].conv.out_channels == 8
    assert wb[0].out_channels == 8 and wb[8].in_features == 16
    with torch.no_grad():
        torch.testing.assert_close(wb(x), small(x), rtol=1e-5, atol=1e-5)
    sparsecomp.save_compressed(wb, tmp_path / "cnn")
    again = sparsecomp.load_compressed(tmp_path / "cnn", build())
    with torch.no_grad():
        assert torch.equal(again(x), wb(x))


def test_write_back_refuses_sparse_ops_naming_the_node():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    x = torch.randn(4, 64)
    small = sparsecomp.compress(model, (x,), sparsecomp.Sparsify(sparsity=0.9, cost_model="always"))
    with pytest.raises(UnsupportedError, match="sparse_linear"):
        sparsecomp.write_back(model, small, (x,))


def test_write_back_of_unchanged_graph_is_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    small = sparsecomp.compress(model, (x,), sparsecomp.StructuredPruning(ratio=0.0))
    wb = sparsecomp.write_back(model, small, (x,))
    assert wb.sparsecomp_layout == {}
    assert all(torch.equal(a, b) for a, b in zip(wb.parameters(), model.parameters()))


def test_compressed_decoder_exports_to_onnx_for_prefill(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = _tiny_llama()
    small, ids = _compress_llama(model, sparsecomp.StructuredPruning(ratio=0.5))
    cap = sparsecomp.capture(small, (ids,), dynamic_shapes=({0: Dim("batch", min=1, max=16),
                                                              1: Dim("seq", min=2, max=64)},))
    exp = sparsecomp.export_onnx(cap, (ids,), tmp_path / "decoder.onnx")
    sess = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 128, (3, 21))  # another batch and prompt length than captured
    got = sess.run(None, {exp.input_names[0]: x.numpy()})[0]
    with torch.no_grad():
        want = small(x).logits
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)
