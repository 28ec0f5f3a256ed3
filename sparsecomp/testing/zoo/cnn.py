"""Zoo CNNs: ResNet (small, ResNet-50), MobileNetV3-style, DenseNet-BC-style, U-Net, Conv1d and Conv3d nets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import BuildResult, _calibrate_batchnorm, _randomize_norms, seeded


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
    return seeded(MobileNet, lambda: (torch.randn(2, 3, 32, 32),))


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
    return seeded(DenseNet, lambda: (torch.randn(2, 3, 32, 32),))


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
    return seeded(UNetSmall, lambda: (torch.randn(2, 3, 32, 32),))


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
    return seeded(Conv1dNet, lambda: (torch.randn(2, 8, 64),))


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
    return seeded(Conv3dNet, lambda: (torch.randn(2, 3, 4, 16, 16),))


# --------------------------------------------------------------------------
