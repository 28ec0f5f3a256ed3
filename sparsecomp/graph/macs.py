"""The one MAC model: multiply-accumulates of one call of an op, one formula per ATen overload.

``MAC_FORMULAS[op](args, kwargs, out) -> int`` reads the call's tensors (real or fake; only shapes are
used). The same table serves

* :func:`count_macs` (``sparsecomp.app.metrics``, the demo, benchmarks): a dispatch mode that runs a
  model and adds up the formulas of the ops it meets after decomposition (``mm``/``addmm``/``bmm``,
  ``convolution``, CPU / CUDA attention kernels, ``sparsecomp::sparse_linear_*``);
* :func:`node_macs` on captured graphs (``aten.linear``, ``aten.conv*``, ``aten.matmul``,
  ``aten.scaled_dot_product_attention``...): importance's MAC model and LowRank's ``target="macs"``;
* the ``torch.utils.flop_counter`` formulas of the sparse ops (``2 *`` their MACs).

``WEIGHTED`` says which ops carry a weight operand (a ``linear`` or convolution) and where: the passes
find their candidates through it (:mod:`sparsecomp.passes.candidates`).

Element-wise work (activations, norms, softmax) and bias adds are not counted, the usual convention.
An op without a formula counts 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MacFormula = Callable[[tuple, Mapping[str, Any], Any], int]


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _rows(t: Any) -> int:
    """Rows of a ``[..., features]`` tensor: the product of its leading dims."""
    return math.prod(_shape(t)[:-1])


def linear_macs(rows: float, out_features: int, in_features: int) -> float:
    """``rows x in_features`` times ``in_features x out_features`` (``rows`` may be an average)."""
    return rows * (out_features * in_features)


def conv_macs(x: Any, w: Any, out: Any, transposed: bool = False) -> int:
    """One MAC per weight element per output position (per *input* position when transposed): the
    convention of ``torch.utils.flop_counter``."""
    positions = _shape(x if transposed else out)[2:]
    return _shape(x)[0] * math.prod(_shape(w)) * math.prod(positions)


def attention_macs(q: Any, k: Any, v: Any) -> int:
    """``Q K^T`` and ``P V`` over all query heads (GQA: key/value heads shared)."""
    *lead, s_q, d_q = _shape(q)
    s_k, d_v = _shape(k)[-2], _shape(v)[-1]
    return math.prod(lead) * s_q * s_k * (d_q + d_v)


def _matmul(a: Any, b: Any, out: Any) -> int:
    """Any matmul: every output element is one dot product of length ``a.shape[-1]``."""
    return math.prod(_shape(out)) * _shape(a)[-1]


def _arg(args: tuple, kwargs: Mapping[str, Any], i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


MAC_FORMULAS: dict[Any, MacFormula] = {
    aten.linear.default: lambda a, kw, out: linear_macs(_rows(a[0]), _shape(a[1])[0], _shape(a[1])[1]),
    aten.mm.default: lambda a, kw, out: _matmul(a[0], a[1], out),
    aten.matmul.default: lambda a, kw, out: _matmul(a[0], a[1], out),
    aten.bmm.default: lambda a, kw, out: _matmul(a[0], a[1], out),
    aten.addmm.default: lambda a, kw, out: _matmul(a[1], a[2], out),
    aten.baddbmm.default: lambda a, kw, out: _matmul(a[1], a[2], out),
    aten.convolution.default: lambda a, kw, out: conv_macs(a[0], a[1], out, bool(_arg(a, kw, 6, "transposed"))),
    aten._convolution.default: lambda a, kw, out: conv_macs(a[0], a[1], out, bool(_arg(a, kw, 6, "transposed"))),
    aten.scaled_dot_product_attention.default: lambda a, kw, out: attention_macs(a[0], a[1], a[2]),
}
for _d in (1, 2, 3):
    for _ov in ("default", "padding"):
        MAC_FORMULAS[getattr(getattr(aten, f"conv{_d}d"), _ov)] = lambda a, kw, out: conv_macs(a[0], a[1], out)
for _op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
    MAC_FORMULAS[_op] = lambda a, kw, out: conv_macs(a[0], a[1], out, transposed=True)
# the attention kernels a dispatch mode meets (``scaled_dot_product_attention`` itself decomposes)
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        MAC_FORMULAS[_packet.default] = lambda a, kw, out: attention_macs(a[0], a[1], a[2])


def register_macs(op: Any, formula: MacFormula) -> None:
    """Add the MAC formula of ``op`` (an overload, e.g. a ``torch.library`` custom op's ``.default``)."""
    if op in MAC_FORMULAS:
        raise KeyError(f"op {op} already has a MAC formula")
    MAC_FORMULAS[op] = formula


def op_macs(op: Any, args: tuple, kwargs: Mapping[str, Any] | None, out: Any) -> int:
    """MACs of one call of ``op``; 0 for an op without a formula."""
    formula = MAC_FORMULAS.get(op)
    return 0 if formula is None else int(formula(args, kwargs or {}, out))


def node_macs(node: torch.fx.Node, value_of: Callable[[Any], Any]) -> int:
    """MACs of graph node ``node``, its operands' values read through ``value_of(arg)`` (e.g. an
    interpreter's environment at concrete inputs, or ``lambda n: n.meta["val"]``)."""
    if node.op != "call_function" or node.target not in MAC_FORMULAS:
        return 0

    def val(a: Any) -> Any:
        return value_of(a) if isinstance(a, torch.fx.Node) else a

    args = tuple(val(a) for a in node.args)
    kwargs = {k: val(v) for k, v in node.kwargs.items()}
    return op_macs(node.target, args, kwargs, value_of(node))


class MacCounter(TorchDispatchMode):
    """Dispatch mode that adds up :data:`MAC_FORMULAS` of every op run under it (``.total``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += op_macs(func, args, kwargs, out)
        return out


def count_macs(module: Callable[..., Any], args: Any, kwargs: Mapping[str, Any] | None = None) -> int:
    """Multiply-accumulates of one call ``module(*args, **kwargs)`` (run once, under ``no_grad``).

    Matrix products, convolutions, attention and the sparse operators count (:data:`MAC_FORMULAS`);
    element-wise work does not.

    >>> count_macs(torch.nn.Linear(8, 4), torch.randn(2, 8))
    64
    """
    call_args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    counter = MacCounter()
    with torch.no_grad(), counter:
        module(*call_args, **dict(kwargs or {}))
    return counter.total


# ------------------------------------------------------------------------------------------------ weights
@dataclasses.dataclass(frozen=True)
class WeightedOp:
    """Where an op keeps its weight: ``kind`` ``"linear"`` / ``"conv"`` / ``"conv_transpose"``, operand
    positions of the weight and bias, and for ``conv{d}d.padding`` that the padding is a string."""

    kind: str
    weight: int = 1
    bias: int = 2
    padding_str: bool = False


WEIGHTED: dict[Any, WeightedOp] = {
    aten.linear.default: WeightedOp("linear"),
    aten.convolution.default: WeightedOp("conv"),  # transposed when its argument 6 says so
    **{getattr(aten, f"conv{d}d").default: WeightedOp("conv") for d in (1, 2, 3)},
    **{getattr(aten, f"conv{d}d").padding: WeightedOp("conv", padding_str=True) for d in (1, 2, 3)},
    aten.conv_transpose1d.default: WeightedOp("conv_transpose"),
    aten.conv_transpose2d.input: WeightedOp("conv_transpose"),
    aten.conv_transpose3d.input: WeightedOp("conv_transpose"),
}


def is_transposed(node: torch.fx.Node) -> bool:
    """Whether a ``WEIGHTED`` node is a transposed convolution."""
    spec = WEIGHTED[node.target]
    if spec.kind == "conv_transpose":
        return True
    return node.target is aten.convolution.default and bool(_arg(node.args, node.kwargs, 6, "transposed", False))
