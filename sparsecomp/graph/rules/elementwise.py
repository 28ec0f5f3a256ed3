"""Rules of elementwise ops (broadcasting) and softmax."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..context import Dims, PropagationContext
from ..registry import OpRegistry, OpRule
from .common import _elementwise

aten = torch.ops.aten
RULES = OpRegistry()
register = RULES.register


# ----------------------------------------------------------------------------------------------- elementwise
UNARY = [
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "neg", "exp", "log", "sqrt", "rsqrt", "abs", "erf", "sin", "cos",
    "square", "reciprocal", "clone", "contiguous", "detach", "alias", "dropout", "relu6", "log_sigmoid",
    "logical_not", "bitwise_not", "sign", "floor", "ceil", "round", "clamp", "clamp_min", "clamp_max", "pow",
    "to", "_to_copy", "type_as", "lift_fresh_copy", "gelu_", "silu_", "hardswish_", "hardtanh_", "dropout_",
    "leaky_relu_", "feature_dropout", "alpha_dropout", "exp2", "expm1", "log1p", "tan", "atan", "isnan",
]
BINARY = [
    "add", "sub", "mul", "div", "rsub", "maximum", "minimum", "where", "masked_fill", "eq", "ne", "lt", "le", "gt",
    "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "__and__", "__or__", "pow", "fmod",
    "remainder", "floor_divide", "add_", "mul_", "div_", "sub_", "masked_fill_", "copysign", "atan2", "lerp",
    "addcmul", "addcdiv",
]


def _overloads(names: list[str]):
    out = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for ov in packet.overloads():
            out.append(getattr(packet, ov))
    return out


for _op in dict.fromkeys(_overloads(UNARY) + _overloads(BINARY)):
    RULES.add(_op, OpRule(_elementwise))


@register(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(node: fx.Node, ctx: PropagationContext) -> Dims:
    lab = list(ctx.lab(node.args[0]))
    dim = node.args[1] % len(lab)
    ctx.fix(lab[dim])  # softmax mixes along its dim: removing an entry is not zeroing it
    lab[dim] = None
    return lab
