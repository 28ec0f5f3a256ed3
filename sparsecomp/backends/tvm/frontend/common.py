"""Small helpers shared by the converters."""

from __future__ import annotations

import torch
from torch import fx

import tvm


def _constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor for every parameter, buffer and lifted constant of ``ep``."""
    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(ep.constants)
    out = {}
    for spec in sig.input_specs:
        target = getattr(spec, "target", None)
        if target is not None and target in state and isinstance(state[target], torch.Tensor):
            out[spec.arg.name] = state[target]
    return out


def _op(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _prod(dims: list):
    """Product of shape dimensions: a Python int when all are static, else a ``PrimExpr``."""
    static, symbolic = 1, []
    for d in dims:
        if isinstance(d, tvm.tirx.IntImm):
            static *= int(d.value)
        else:
            symbolic.append(d)
    out = tvm.tirx.IntImm("int64", static)
    for d in symbolic:
        out = out * d
    return out
