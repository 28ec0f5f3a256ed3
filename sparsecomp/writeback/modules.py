"""What a module's own code reads of its weights' shapes, keyed by module class.

Write-back replaces a module's parameters by the smaller ones of a compressed graph; most modules also keep
the sizes as plain attributes that their ``forward`` or ``extra_repr`` reads (``nn.Linear.in_features``,
``nn.Conv2d.out_channels``, ``nn.LayerNorm.normalized_shape``, ...). A ``ModuleRule`` recomputes those
attributes from the new tensors. Lookup follows the class's MRO, so subclasses (HF ``Conv1D`` is not one,
but every ``nn.Linear`` subclass is) inherit the rule; a module without a rule only gets its tensors, and
the final verification against the graph catches any size the module keeps elsewhere.

``LowRankLinear`` / ``LowRankConv`` are the eager form of LowRank's factor pair.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

#: ``rule(module) -> {attribute: new value}``, computed from the module's (already replaced) tensors
ModuleRule = Callable[[nn.Module], dict]

MODULE_RULES: dict[type, ModuleRule] = {}


def module_rule(*classes: type) -> Callable[[ModuleRule], ModuleRule]:
    def deco(fn: ModuleRule) -> ModuleRule:
        for cls in classes:
            MODULE_RULES[cls] = fn
        return fn

    return deco


def rule_for(module: nn.Module) -> ModuleRule | None:
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


@module_rule(nn.Linear)
def _linear(m: nn.Linear) -> dict:
    return {"out_features": m.weight.shape[0], "in_features": m.weight.shape[1]}


@module_rule(nn.Embedding)
def _embedding(m: nn.Embedding) -> dict:
    return {"num_embeddings": m.weight.shape[0], "embedding_dim": m.weight.shape[1]}


@module_rule(nn.modules.conv._ConvNd)
def _conv(m: nn.modules.conv._ConvNd) -> dict:
    w = m.weight
    if m.transposed:  # [in, out / groups, *k]
        return {"in_channels": w.shape[0], "out_channels": w.shape[1] * m.groups}
    return {"out_channels": w.shape[0], "in_channels": w.shape[1] * m.groups}


@module_rule(nn.modules.batchnorm._NormBase)
def _batchnorm(m: nn.modules.batchnorm._NormBase) -> dict:
    t = m.weight if m.weight is not None else m.running_mean
    return {} if t is None else {"num_features": t.shape[0]}


@module_rule(nn.LayerNorm)
def _layernorm(m: nn.LayerNorm) -> dict:
    return {} if m.weight is None else {"normalized_shape": tuple(m.weight.shape)}


@module_rule(nn.GroupNorm)
def _groupnorm(m: nn.GroupNorm) -> dict:
    if m.weight is None:
        return {}
    per_group = m.num_channels // m.num_groups  # whole groups are removed: the group width is kept
    return {"num_channels": m.weight.shape[0], "num_groups": m.weight.shape[0] // per_group}


class LowRankLinear(nn.Module):
    """``linear(linear(x, A), B, bias)``: LowRank's factorisation of a linear, in eager form."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.weight_lr_a = nn.Parameter(torch.empty(rank, in_features))
        self.weight_lr_b = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(x, self.weight_lr_a), self.weight_lr_b, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}"


class LowRankConv(nn.Module):
    """``conv_1x1(conv_k(x, A), B, bias)``: LowRank's factorisation of a convolution, in eager form.

    ``conv`` is the original module with its weight replaced by ``A`` (stride, padding, dilation kept);
    the 1x1 part has stride 1 and no padding, as the pass writes it.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd, a: torch.Tensor, b: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv)  # the k x k part keeps the original's stride, padding, dilation
        self.conv.weight = nn.Parameter(a)
        self.conv.bias = None
        self.conv.out_channels, self.conv.in_channels = a.shape[0], a.shape[1]
        self.weight_lr_b = nn.Parameter(b)
        self.bias = None if bias is None else nn.Parameter(bias)
        self._fn = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}[b.dim() - 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self.conv(x), self.weight_lr_b, self.bias)
