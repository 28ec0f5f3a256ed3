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

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

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

BuildResult = tuple[nn.Module, tuple, dict]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    ``build()`` returns ``(model.eval(), example_args, example_kwargs)`` with
    deterministic weights and example inputs (batch 2, except heavy entries).
    ``heavy`` entries are large (benchmark-sized) and skipped by the tests.
    """

    name: str
    family: str  # "cnn" or "transformer"
    build: Callable[[], BuildResult]
    heavy: bool = False


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
    return out


def batch_dynamic_shapes(args: tuple, kwargs: dict | None = None, name: str = "batch") -> torch.export.ShapesCollection:
    """A ``ShapesCollection`` marking dim 0 of every input tensor as one shared
    dynamic ``Dim(name)``.  Use as::

        ep = torch.export.export(model, args, kwargs,
                                 dynamic_shapes=batch_dynamic_shapes(args, kwargs),
                                 strict=False)
    """
    kwargs = kwargs or {}
    batch = torch.export.Dim(name)
    sc = torch.export.ShapesCollection()
    for t in _tensors(args, kwargs):
        if t.dim() == 0 or t.shape[0] < 2:
            # export 0/1-specialises size-1 dims, so Dim("batch") would raise a
            # ConstraintViolationError; say so up front.
            raise ValueError(
                f"cannot mark dim 0 dynamic on an input of shape {tuple(t.shape)}: example batch must be >= 2 "
                "(use with_batch(args, kwargs, 2) first)"
            )
        sc[t] = {0: batch}
    return sc


def with_batch(args: tuple, kwargs: dict | None, batch: int) -> tuple[tuple, dict]:
    """Return ``(args, kwargs)`` with every tensor's dim 0 resized to ``batch``
    by cycling (concatenating) the existing rows, e.g. rows [0, 1, 0] for
    batch 3 from batch 2.  Non-tensor leaves are left unchanged."""
    kwargs = kwargs or {}

    def resize(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        n = x.shape[0]
        reps = -(-batch // n)
        return torch.cat([x] * reps, dim=0)[:batch].clone()

    return torch.utils._pytree.tree_map(resize, (args, kwargs))


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    """Give every norm layer non-trivial affine params / running statistics
    (uses the current RNG state, so stays deterministic)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            if m.track_running_stats:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0.0, 0.1)
        elif type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor):
            m.weight.uniform_(0.5, 1.5)  # ours and HF's (LlamaRMSNorm, ...)


@torch.no_grad()
def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics to the batch statistics of one
    train-mode forward on ``x`` (affine params untouched), as a trained
    network's would be.  Keeps deep random-init nets numerically tame."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one step == batch statistics
    model.train()
    model(x)
    model.eval()
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom


# --------------------------------------------------------------------------
# ResNet (small and ResNet-50)
# --------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; identity or strided 1x1-conv+BN shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), torchvision v1.5 style."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Generic ResNet: stem conv+BN+ReLU+maxpool, stages of blocks, pool, fc.

    ``stages`` is a list of ``(block_cls, num_blocks, planes, stride)``.
    """

    def __init__(
        self, stages, stem_width: int = 64, stem_kernel: int = 7, stem_stride: int = 2, num_classes: int = 1000
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, stem_kernel, stem_stride, stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = stem_width
        layers = []
        for block, n, planes, stride in stages:
            blocks = []
            for i in range(n):
                blocks.append(block(cin, planes, stride if i == 0 else 1))
                cin = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_resnet() -> BuildResult:
    """Small CIFAR-size ResNet mixing BasicBlock and Bottleneck stages (2x3x32x32)."""
    torch.manual_seed(0)
    model = ResNet(
        [
            (BasicBlock, 2, 16, 1),
            (BasicBlock, 1, 32, 2),
            (Bottleneck, 2, 16, 2),  # 32 -> 64 channels, projection shortcut
            (Bottleneck, 1, 32, 2),  # 64 -> 128 channels
        ],
        stem_width=16,
        stem_kernel=3,
        stem_stride=1,
        num_classes=10,
    )
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,), {}


def build_resnet50() -> BuildResult:
    """Full ResNet-50 (Bottleneck [3, 4, 6, 3], 1000 classes, ~25.6M params), 1x3x224x224.

    Heavy, benchmark-only.  The example batch is 1, which torch.export
    specialises; for a dynamic-batch export use ``with_batch(args, kwargs, 2)``.
    """
    torch.manual_seed(0)
    model = ResNet(
        [(Bottleneck, 3, 64, 1), (Bottleneck, 4, 128, 2), (Bottleneck, 6, 256, 2), (Bottleneck, 3, 512, 2)],
        stem_width=64,
        stem_kernel=7,
        stem_stride=2,
        num_classes=1000,
    )
    _randomize_norms(model)
    # 16 un-normalised residual blocks blow activations up to ~1e3 with random
    # running stats; calibrate them on random images instead (~0.5 s).
    _calibrate_batchnorm(model, torch.randn(4, 3, 224, 224))
    x = torch.randn(1, 3, 224, 224)
    return model.eval(), (x,), {}


# --------------------------------------------------------------------------
# MobileNetV3-style
# --------------------------------------------------------------------------


class SqueezeExcite(nn.Module):
    """SE block.  ``linear=False``: pool -> 1x1 conv -> ReLU -> 1x1 conv ->
    hardsigmoid (MobileNetV3).  ``linear=True``: mean -> Linear -> ReLU ->
    Linear -> sigmoid (SENet / EfficientNet flavour)."""

    def __init__(self, channels: int, squeeze: int, linear: bool = False):
        super().__init__()
        self.linear = linear
        if linear:
            self.fc1 = nn.Linear(channels, squeeze)
            self.fc2 = nn.Linear(squeeze, channels)
        else:
            self.fc1 = nn.Conv2d(channels, squeeze, 1)
            self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.linear:
            s = x.mean(dim=(2, 3))
            s = torch.sigmoid(self.fc2(self.relu(self.fc1(s))))
            return x * s[:, :, None, None]
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(self.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise kxk -> (SE) -> project 1x1, residual if shapes match."""

    def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, se: str | None, act: type[nn.Module]):
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if exp != cin:
            layers += [nn.Conv2d(cin, exp, 1, bias=False), nn.BatchNorm2d(exp), act()]
        layers += [nn.Conv2d(exp, exp, k, stride, k // 2, groups=exp, bias=False), nn.BatchNorm2d(exp), act()]
        if se is not None:
            squeeze = max(8, (exp // 4 + 7) // 8 * 8)
            layers.append(SqueezeExcite(exp, squeeze, linear=(se == "linear")))
        layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNet(nn.Module):
    """Small MobileNetV3-style classifier."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        R, H = nn.ReLU, nn.Hardswish
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        cfg = [
            # cin, exp, cout, k, stride, se, act
            (16, 16, 16, 3, 1, "conv", R),
            (16, 64, 24, 3, 2, None, R),
            (24, 72, 24, 3, 1, None, R),
            (24, 96, 40, 5, 2, "linear", H),
            (40, 120, 40, 5, 1, "conv", H),
            (40, 120, 48, 3, 1, "conv", H),
        ]
        self.blocks = nn.Sequential(*[InvertedResidual(*c) for c in cfg])
        self.last = nn.Sequential(nn.Conv2d(48, 192, 1, bias=False), nn.BatchNorm2d(192), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(192, 256), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(256, num_classes)
        )

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x)


def build_mobilenet() -> BuildResult:
    """MobileNetV3-style net: depthwise convs, SE (conv+hardsigmoid, linear+sigmoid), hardswish (2x3x32x32)."""
    torch.manual_seed(0)
    model = MobileNet()
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,), {}


# --------------------------------------------------------------------------
# DenseNet-BC-style
# --------------------------------------------------------------------------


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bottleneck) -> BN-ReLU-conv3x3 producing ``growth`` channels."""

    def __init__(self, cin: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.Module):
    """Each layer sees the channel-concatenation of all previous outputs."""

    def __init__(self, n: int, cin: int, growth: int):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth) for i in range(n))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1 (compression) -> 2x2 avg pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2, 2)
        )


class DenseNet(nn.Module):
    """Small DenseNet-BC for 32x32 inputs."""

    def __init__(self, growth: int = 12, blocks=(3, 3, 3), stem: int = 24, num_classes: int = 10):
        super().__init__()
        feats: list[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False)]
        c = stem
        for i, n in enumerate(blocks):
            feats.append(DenseBlock(n, c, growth))
            c += n * growth
            if i != len(blocks) - 1:
                feats.append(Transition(c, c // 2))
                c //= 2
        feats.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x))
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.classifier(x)


def build_densenet() -> BuildResult:
    """DenseNet-BC (growth 12, blocks 3-3-3) with cat-based dense blocks and transitions (2x3x32x32)."""
    torch.manual_seed(0)
    model = DenseNet()
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,), {}


# --------------------------------------------------------------------------
# Mixed conv flavours: U-Net (ConvTranspose2d, GroupNorm, grouped conv),
# Conv1d and Conv3d nets
# --------------------------------------------------------------------------


def _gn_block(cin: int, cout: int, groups: int = 1, gn_groups: int = 4) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, groups=groups, bias=False), nn.GroupNorm(gn_groups, cout), nn.ReLU(inplace=True)
    )


class UNetSmall(nn.Module):
    """Two-level U-Net with GroupNorm, grouped 3x3 convs, ConvTranspose2d upsampling and skip concat."""

    def __init__(self, cin: int = 3, num_classes: int = 4):
        super().__init__()
        self.enc1 = nn.Sequential(_gn_block(cin, 16), _gn_block(16, 16, groups=4))
        self.enc2 = nn.Sequential(_gn_block(16, 32, gn_groups=8), _gn_block(32, 32, groups=2, gn_groups=8))
        self.pool = nn.MaxPool2d(2)
        self.mid = _gn_block(32, 64, gn_groups=8)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = _gn_block(64, 32, gn_groups=8)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = _gn_block(32, 16)
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        m = self.mid(self.pool(s2))
        d2 = self.dec2(torch.cat([self.up2(m), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), s1], dim=1))
        return self.head(d1)


def build_unet_small() -> BuildResult:
    """U-Net segmenter: ConvTranspose2d + GroupNorm + grouped conv + skip concat (2x3x32x32 -> 2x4x32x32)."""
    torch.manual_seed(0)
    model = UNetSmall()
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,), {}


class Conv1dNet(nn.Module):
    """1-D signal classifier: Conv1d/BN1d stem, residual block with grouped conv + GroupNorm, strided grouped conv."""

    def __init__(self, cin: int = 8, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(cin, 32, 5, padding=2, bias=False), nn.BatchNorm1d(32), nn.ReLU())
        self.res = nn.Sequential(
            nn.Conv1d(32, 32, 3, padding=1, groups=4, bias=False),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.Conv1d(32, 32, 1, bias=False),
            nn.GroupNorm(8, 32),
        )
        self.pool = nn.MaxPool1d(2)
        self.down = nn.Sequential(nn.Conv1d(32, 64, 3, stride=2, padding=1, groups=2), nn.BatchNorm1d(64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.res(x))
        x = self.down(self.pool(x))
        x = F.adaptive_avg_pool1d(x, 1).squeeze(-1)
        return self.head(x)


def build_conv1d_net() -> BuildResult:
    """Conv1d network with BatchNorm1d, grouped Conv1d (g=4, g=2) and GroupNorm (2x8x64)."""
    torch.manual_seed(0)
    model = Conv1dNet()
    _randomize_norms(model)
    x = torch.randn(2, 8, 64)
    return model.eval(), (x,), {}


class Conv3dNet(nn.Module):
    """Tiny video classifier: Conv3d/BN3d stem, residual block with grouped Conv3d, pool, fc."""

    def __init__(self, num_classes: int = 6):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(3, 16, 3, stride=(1, 2, 2), padding=1, bias=False), nn.BatchNorm3d(16), nn.ReLU()
        )
        self.conv_a = nn.Conv3d(16, 32, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn_a = nn.BatchNorm3d(32)
        self.conv_b = nn.Conv3d(32, 32, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn_b = nn.BatchNorm3d(32)
        self.short = nn.Sequential(nn.Conv3d(16, 32, 1, stride=2, bias=False), nn.BatchNorm3d(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn_a(self.conv_a(x)))
        y = self.bn_b(self.conv_b(y))
        x = F.relu(y + self.short(x))
        x = F.adaptive_avg_pool3d(x, 1).flatten(1)
        return self.fc(x)


def build_conv3d_net() -> BuildResult:
    """Conv3d network with BatchNorm3d, grouped Conv3d and a projection residual (2x3x4x16x16)."""
    torch.manual_seed(0)
    model = Conv3dNet()
    _randomize_norms(model)
    x = torch.randn(2, 3, 4, 16, 16)
    return model.eval(), (x,), {}


# --------------------------------------------------------------------------
# ViT (hand-written, nn.MultiheadAttention)
# --------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-LN transformer block: LN -> MHA -> residual, LN -> GELU MLP -> residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT: patch-embedding conv, class token, learned position embedding, head on class token."""

    def __init__(
        self, img: int = 32, patch: int = 4, dim: int = 64, depth: int = 2, heads: int = 4, num_classes: int = 10
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # B, N, D
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def build_vit() -> BuildResult:
    """Hand-written ViT with nn.MultiheadAttention(batch_first=True) (2x3x32x32)."""
    torch.manual_seed(0)
    model = ViT()
    _randomize_norms(model)
    x = torch.randn(2, 3, 32, 32)
    return model.eval(), (x,), {}


# --------------------------------------------------------------------------
# GPT (nanoGPT-style)
# --------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Fused qkv projection, hand-written masked softmax attention."""

    def __init__(self, d: int, n_head: int, block_size: int):
        super().__init__()
        self.n_head = n_head
        self.d = d
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(0.1)
        self.resid_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.d, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class GPTBlock(nn.Module):
    def __init__(self, d: int, n_head: int, block_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head, block_size)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder LM with tied token embedding / lm_head."""

    def __init__(self, vocab: int = 512, block_size: int = 32, d: int = 64, n_head: int = 4, n_layer: int = 4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.drop = nn.Dropout(0.1)
        self.h = nn.ModuleList(GPTBlock(d, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj") or name.endswith("mlp.2") else 0.02
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.02)

    def forward(self, idx):
        T = idx.size(1)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_gpt() -> BuildResult:
    """nanoGPT-style LM: fused qkv, causal mask buffer + masked_fill, tied lm_head (ids 2x16)."""
    torch.manual_seed(0)
    model = GPT()
    _randomize_norms(model)
    idx = torch.randint(0, 512, (2, 16))
    return model.eval(), (idx,), {}


# --------------------------------------------------------------------------
# Llama (hand-written)
# --------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd) via expand + reshape."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None, :, :].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


class LlamaAttention(nn.Module):
    """GQA attention with RoPE and SDPA (is_causal=True)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        n_rep = self.n_heads // self.n_kv_heads
        k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama-style decoder LM: RMSNorm, GQA, RoPE (cos/sin buffers), SwiGLU, untied lm_head."""

    def __init__(self, vocab: int = 512, dim: int = 64, n_layers: int = 4, n_heads: int = 4, n_kv_heads: int = 2,
                 hidden: int = 176, max_seq: int = 64, rope_theta: float = 10000.0):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // n_heads
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def build_llama() -> BuildResult:
    """Hand-written Llama: RMSNorm, GQA 4/2 heads, RoPE, SwiGLU, SDPA is_causal (ids 2x16)."""
    torch.manual_seed(0)
    model = Llama()
    _randomize_norms(model)
    ids = torch.randint(0, 512, (2, 16))
    return model.eval(), (ids,), {}


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


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

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
