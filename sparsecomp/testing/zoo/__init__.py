"""Shared model zoo for sparsecomp tests and benchmarks.

Every entry in :data:`ZOO` is a :class:`ZooEntry` whose ``build()`` returns
``(model.eval(), example_args, example_kwargs)``.  Building is deterministic:
each builder seeds the global RNG with ``torch.manual_seed`` before creating
parameters and inputs, so two calls give bit-identical weights and inputs.

The models are small but *realistic* architectures, written the way users
write them, so that pruning / graph passes meet the constructs they will meet
in the wild:

==============  ===========  ==================================================
name            family       what it exercises
==============  ===========  ==================================================
resnet          cnn          BasicBlock + Bottleneck, BN, strided projection
                             shortcuts, maxpool, adaptive avgpool, flatten, fc
mobilenet       cnn          inverted residuals, depthwise conv, squeeze-excite
                             (conv and linear flavours), hardswish/hardsigmoid
densenet        cnn          dense blocks (torch.cat on channels), BN-ReLU-conv,
                             transitions with avg pool
unet_small      cnn          ConvTranspose2d, GroupNorm, grouped conv (g=2, 4),
                             U-Net skip concatenation
conv1d_net      cnn          Conv1d, BatchNorm1d, grouped Conv1d, GroupNorm
conv3d_net      cnn          Conv3d, BatchNorm3d, grouped Conv3d, residual
vit             transformer  patch-embedding conv, class token, learned position
                             embedding, nn.MultiheadAttention, LayerNorm, GELU
gpt             transformer  fused qkv, hand-written causal attention with a
                             mask buffer, weight tying (wte <-> lm_head)
llama           transformer  RMSNorm, GQA (expand+reshape repeat_kv), RoPE,
                             SwiGLU, F.scaled_dot_product_attention(is_causal)
hf_bert         transformer  transformers BertModel (sdpa) with attention_mask
hf_gpt2         transformer  transformers GPT2LMHeadModel (tied lm_head)
hf_llama        transformer  transformers LlamaModel with GQA
hf_vit          transformer  transformers ViTForImageClassification
resnet50        cnn          full-size ResNet-50 (heavy: benchmarks only)
==============  ===========  ==================================================

All non-heavy entries use batch size 2 in their example inputs, run in a few
milliseconds on CPU, and can be captured with ``torch.export.export(...,
strict=False)`` with the batch dimension of every input tensor marked dynamic
(see :func:`batch_dynamic_shapes`); the exported program reproduces eager
outputs at batch 2 and 3 (see ``tests/test_zoo.py``).  HF models are wrapped in
thin modules whose ``forward`` returns a tuple of plain tensors.

Norm layers (BatchNorm running statistics and affine parameters of
BatchNorm / GroupNorm / LayerNorm / RMSNorm) are randomised after
construction so that they are not the identity; otherwise passes that fold or
reorder them could be wrong without any test noticing.
"""

from __future__ import annotations

from .cnn import (build_conv1d_net, build_conv3d_net, build_densenet, build_mobilenet, build_resnet, build_resnet50,
                  build_unet_small)
from .common import BuildResult, ZooEntry, batch_dynamic_shapes, count_params, with_batch
from .hf import build_hf_bert, build_hf_gpt2, build_hf_llama, build_hf_vit
from .transformers import build_gpt, build_llama, build_vit

__all__ = [
    "ZooEntry",
    "ZOO",
    "get",
    "names",
    "build",
    "count_params",
    "with_batch",
    "batch_dynamic_shapes",
]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("resnet", "cnn", build_resnet),
        ZooEntry("mobilenet", "cnn", build_mobilenet),
        ZooEntry("densenet", "cnn", build_densenet),
        ZooEntry("unet_small", "cnn", build_unet_small),
        ZooEntry("conv1d_net", "cnn", build_conv1d_net),
        ZooEntry("conv3d_net", "cnn", build_conv3d_net),
        ZooEntry("vit", "transformer", build_vit),
        ZooEntry("gpt", "transformer", build_gpt),
        ZooEntry("llama", "transformer", build_llama),
        ZooEntry("hf_bert", "transformer", build_hf_bert),
        ZooEntry("hf_gpt2", "transformer", build_hf_gpt2),
        ZooEntry("hf_llama", "transformer", build_hf_llama),
        ZooEntry("hf_vit", "transformer", build_hf_vit),
        ZooEntry("resnet50", "cnn", build_resnet50, heavy=True),
    ]
}


def get(name: str) -> ZooEntry:
    """Look up a zoo entry; ``KeyError`` lists the valid names."""
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; valid names: {', '.join(sorted(ZOO))}") from None


def names(family: str | None = None, include_heavy: bool = True) -> list[str]:
    """Entry names, optionally filtered by family ("cnn" / "transformer");
    ``include_heavy=False`` drops benchmark-only entries."""
    return [
        n for n, e in ZOO.items()
        if (family is None or e.family == family) and (include_heavy or not e.heavy)
    ]


def build(name: str) -> BuildResult:
    """Shorthand for ``get(name).build()``."""
    return get(name).build()
