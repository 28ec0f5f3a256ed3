"""The LowRank pass: find candidate layers, observe their inputs, factor, rewrite the graph."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from ...calibration.data import iter_batches, observe
from ...capture.export import Captured
from ...errors import PassError
from ...graph.macs import linear_macs
from ...graph.attrs import add_tensor, deepcopy, get_attr
from ..base import PassResult, register_pass
from ..candidates import drop_weight, finish, weighted_nodes
from .allocate import _Choice, _cost, _error, allocate_global
from .config import LowRank
from .factor import (_COST, asvd_scale, choose_rank, decompose, error_curve, factored_is_faster, factors_from,
                     max_fast_rank, relative_output_error, whitened_error_curve)

_LINEAR = torch.ops.aten.linear.default
_CONVOLUTION = torch.ops.aten.convolution.default
#: ``conv{d}d`` overloads -> spatial dims (``.padding`` takes ``padding="same"|"valid"``).
_CONV_ND = {
    torch.ops.aten.conv1d.default: 1, torch.ops.aten.conv2d.default: 2, torch.ops.aten.conv3d.default: 3,
    torch.ops.aten.conv1d.padding: 1, torch.ops.aten.conv2d.padding: 2, torch.ops.aten.conv3d.padding: 3,
}
_CONV_PADDING_STR = {torch.ops.aten.conv1d.padding, torch.ops.aten.conv2d.padding, torch.ops.aten.conv3d.padding}
_CONV_DEFAULT = {1: torch.ops.aten.conv1d.default, 2: torch.ops.aten.conv2d.default, 3: torch.ops.aten.conv3d.default}
_TRANSPOSED = (
    torch.ops.aten.conv_transpose1d.default, torch.ops.aten.conv_transpose2d.input,
    torch.ops.aten.conv_transpose3d.input,
)

# ------------------------------------------------------------------------------------------------ layers
@dataclasses.dataclass
class _Layer:
    """A candidate op: its node, weight, and (for convs) the geometry needed to unfold its input."""

    node: fx.Node
    w_node: fx.Node
    kind: str                       # "linear" or "conv{d}d"
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[tuple[int, int], ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def m(self) -> int:
        return int(self.weight_shape[0])

    @property
    def n(self) -> int:
        return int(math.prod(self.weight_shape[1:]))

    @property
    def spatial(self) -> int:
        return len(self.weight_shape) - 2

    def row(self) -> dict[str, Any]:
        return {"layer": self.w_node.target, "node": self.node.name, "op": self.kind,
                "shape": [int(s) for s in self.weight_shape], "params_before": self.m * self.n}


def _ints(v: Any, d: int, name: str, node: fx.Node) -> tuple[int, ...]:
    v = [v] if isinstance(v, int) else list(v)
    if len(v) == 1:
        v = v * d
    if len(v) != d or not all(isinstance(i, int) for i in v):
        raise PassError("LowRank", f"unsupported {name}={v!r} for a {d}d convolution", node.name)
    return tuple(v)


def _conv_args(node: fx.Node) -> tuple[int, Any, Any, Any, Any, int, bool] | None:
    """``(spatial dims, stride, padding, dilation, groups, transposed)`` of a convolution node, or None."""
    t = node.target
    a = list(node.args)
    if t in _CONV_ND:
        d = _CONV_ND[t]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, "valid" if t in _CONV_PADDING_STR else 0, 1, 1)
        vals = [a[i] if i < len(a) else node.kwargs.get(nm, dflt) for i, (nm, dflt) in enumerate(zip(names, defaults))]
        return d, vals[3], vals[4], vals[5], vals[6], False
    if t is _CONVOLUTION:
        w = a[1]
        shape = w.meta["val"].shape if isinstance(w, fx.Node) and "val" in w.meta else None
        d = len(shape) - 2 if shape is not None else len(a[3])
        return d, a[3], a[4], a[5], a[8], bool(a[6])
    return None


def _explicit_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...], node: fx.Node,
                      d: int) -> tuple[tuple[int, int], ...]:
    if padding == "valid":
        return ((0, 0),) * d
    if padding == "same":  # torch pads (total // 2, total - total // 2), total = dilation * (k - 1)
        out = []
        for k, dl in zip(kernel, dilation):
            total = dl * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in _ints(padding, d, "padding", node))


def _candidates(gm: fx.GraphModule, cfg: LowRank) -> tuple[list[_Layer], list[dict]]:
    """Layers to factor, and report rows for the ones left dense."""
    todo: list[_Layer] = []
    skipped: list[dict] = []
    for c in weighted_nodes(gm):
        node, w, param = c.node, c.weight, c.param
        if c.kind == "linear":
            if param.dim() != 2:
                continue
            layer = _Layer(node, w, "linear", tuple(param.shape))
        else:
            layer = _Layer(node, w, f"conv{param.dim() - 2}d", tuple(param.shape))
            if c.kind == "conv_transpose":
                skipped.append({**layer.row(), "skipped": "transposed convolution (not factored)"})
                continue
            d, stride, padding, dilation, groups, _ = _conv_args(node)
            if groups != 1:
                skipped.append({**layer.row(), "skipped": f"grouped convolution (groups={groups}; not factored)"})
                continue
            layer.stride = _ints(stride, d, "stride", node)
            layer.dilation = _ints(dilation, d, "dilation", node)
            layer.padding = _explicit_padding(padding, tuple(param.shape[2:]), layer.dilation, node, d)
        row = layer.row()
        if c.ignored(cfg.ignore):
            skipped.append({**row, "skipped": "ignored"})
        elif min(layer.m, layer.n) < cfg.min_features:
            skipped.append({**row, "skipped": f"fewer than min_features={cfg.min_features} features"})
        elif c.shared:
            skipped.append({**row, "skipped": "weight shared with other ops"})
        else:
            todo.append(layer)
    return todo, skipped


def conv_patches(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...]) -> torch.Tensor:
    """im2col for 1d/2d/3d: ``[N, C, *spatial]`` -> ``[N * L, C * prod(kernel)]``.

    Columns are ordered like a flattened conv weight ``[out, C, *kernel]``, so ``patches @ W.reshape(out,
    -1).T`` is the convolution (without bias) in rows of output positions. Equals ``F.unfold`` in 2d.
    """
    d = len(kernel)
    pad: list[int] = []
    for lo, hi in reversed(padding):
        pad += [lo, hi]
    x = F.pad(x, pad) if any(pad) else x
    for i in range(d):
        x = x.unfold(2 + i, (kernel[i] - 1) * dilation[i] + 1, stride[i])
    if any(dl != 1 for dl in dilation):
        x = x[(Ellipsis, *(slice(None, None, dl) for dl in dilation))]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    return x.permute(perm).reshape(-1, x.shape[1] * math.prod(kernel))


@dataclasses.dataclass
class _Stats:
    gram: torch.Tensor
    abs_sum: torch.Tensor
    rows: int = 0
    calls: int = 0

    @property
    def rows_per_call(self) -> float:
        return self.rows / max(self.calls, 1)


def _observe_inputs(gm: fx.GraphModule, layers: list[_Layer], captured: Captured,
                    calibration: Any) -> dict[str, _Stats]:
    """Gram matrix ``X^T X`` (float64), column sums of ``|X|`` and row counts of each layer's input rows
    (for a convolution: its unfolded input patches) over the calibration batches."""
    want = {layer.node.name: layer for layer in layers}
    stats: dict[str, _Stats] = {}

    def hook(node: fx.Node, value: Any, interp: Any) -> None:
        layer = want.get(node.name)
        if layer is None:
            return
        x = interp.env[layer.node.args[0]].detach()
        if layer.kind == "linear":
            rows = x.reshape(-1, x.shape[-1])
        else:
            if x.dim() == layer.spatial + 1:  # unbatched conv input
                x = x.unsqueeze(0)
            rows = conv_patches(x, layer.weight_shape[2:], layer.stride, layer.padding, layer.dilation)
        st = stats.get(node.name)
        if st is None:
            n = rows.shape[1]
            st = stats[node.name] = _Stats(torch.zeros(n, n, dtype=torch.float64),
                                           torch.zeros(n, dtype=torch.float64))
        for chunk in rows.split(16384):
            c = chunk.double()
            st.gram += c.T @ c
            st.abs_sum += c.abs().sum(0)
        st.rows += rows.shape[0]
        st.calls += 1

    for args, kwargs in iter_batches(calibration, captured):
        observe(gm, args, kwargs, hook)
    return stats


class _Decompositions:
    """``decs[node_name] -> (U, S, Vh, T)`` of the layer under ``cfg.method``, computed on first use (layers
    that the rank rule already leaves dense are never decomposed)."""

    def __init__(self, gm: fx.GraphModule, layers: list[_Layer], stats: dict[str, _Stats], cfg: LowRank) -> None:
        self._gm, self._stats, self._cfg = gm, stats, cfg
        self._layers = {layer.node.name: layer for layer in layers}
        self._cache: dict[str, tuple] = {}

    def __getitem__(self, name: str) -> tuple:
        if name not in self._cache:
            weight = get_attr(self._gm, self._layers[name].w_node.target)
            st, cfg = self._stats[name], self._cfg
            if cfg.method == "activation":
                self._cache[name] = decompose(weight, st.gram, cfg.damping)
            elif cfg.method == "asvd":
                self._cache[name] = decompose(weight, scale=asvd_scale(st.abs_sum / max(st.rows, 1)))
            else:
                self._cache[name] = decompose(weight)
        return self._cache[name]


# ------------------------------------------------------------------------------------------------ rewrite
def _rewrite(gm: fx.GraphModule, layer: _Layer, A64: torch.Tensor, B64: torch.Tensor) -> None:
    """Linear(W) -> Linear(B) . Linear(A);  conv_k(W) -> conv_1x1(B) . conv_k(A), in place on ``gm``."""
    node, w_node = layer.node, layer.w_node
    weight = get_attr(gm, w_node.target)
    r = A64.shape[0]
    A = A64.reshape(r, *layer.weight_shape[1:])
    B = B64.reshape(layer.m, r, *([1] * layer.spatial))
    A = torch.nn.Parameter(A.to(weight.dtype).to(weight.device).contiguous(), requires_grad=weight.requires_grad)
    B = torch.nn.Parameter(B.to(weight.dtype).to(weight.device).contiguous(), requires_grad=weight.requires_grad)

    a_target = add_tensor(gm, w_node.target, "lr_a", A)
    b_target = add_tensor(gm, w_node.target, "lr_b", B)

    args = list(node.args)
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    with gm.graph.inserting_before(node):
        a_node = gm.graph.get_attr(a_target)
        b_node = gm.graph.get_attr(b_target)
        if layer.kind == "linear":
            inner = gm.graph.call_function(_LINEAR, (args[0], a_node))
            node.args, node.kwargs = (inner, b_node, bias), {}
        else:
            d = layer.spatial
            ones, zeros = [1] * d, [0] * d
            if node.target is _CONVOLUTION:
                inner = gm.graph.call_function(_CONVOLUTION, (args[0], a_node, None, *args[3:6], False, zeros, 1))
                node.args, node.kwargs = (inner, b_node, bias, ones, zeros, ones, False, zeros, 1), {}
            else:  # conv{d}d.default / .padding: same op for the k x k part, conv{d}d.default for the 1x1
                first = [args[0], a_node, None, *args[3:]]
                inner = gm.graph.call_function(node.target, tuple(first), {k: v for k, v in node.kwargs.items() if k != "bias"})
                node.target = _CONV_DEFAULT[d]
                node.args, node.kwargs = (inner, b_node, bias, ones, zeros, ones, 1), {}
    drop_weight(gm, w_node)


# ------------------------------------------------------------------------------------------------ the pass
def _not_faster(layer: _Layer, r: int, rows: float) -> str:
    kappa, overhead = _COST["linear" if layer.kind == "linear" else "conv"]
    m, n = layer.m, layer.n
    return (f"not faster: {kappa}*r*(m+n)*rows + {overhead:.3g} >= m*n*rows for r={r}, m={m}, n={n}, "
            f"rows={rows:.0f} per call (cost model)")


@register_pass(LowRank)
def run_lowrank(captured: Captured, cfg: LowRank, calibration: Any = None) -> PassResult:
    gm = deepcopy(captured.module)
    todo, report = _candidates(gm, cfg)
    if not todo:
        return PassResult(captured, False, report, "LowRank")
    stats = _observe_inputs(gm, todo, captured, calibration)

    reached: list[_Layer] = []
    for layer in todo:
        if layer.node.name not in stats:
            report.append({**layer.row(), "skipped": "not reached by the calibration data"})
        else:
            reached.append(layer)

    decs = _Decompositions(gm, reached, stats, cfg)
    if cfg.allocation == "global":
        ranks, dense_reason = _global_ranks(gm, reached, stats, decs, cfg)
    else:
        ranks, dense_reason = _uniform_ranks(reached, stats, decs, cfg)

    modified = False
    for layer in reached:
        name = layer.node.name
        row = layer.row()
        r = ranks[name]
        if r == 0:
            report.append({**row, **dense_reason[name]})
            continue
        weight = get_attr(gm, layer.w_node.target)
        A64, B64 = factors_from(*decs[name], r)
        err = relative_output_error(weight, B64 @ A64, stats[name].gram)
        modified = True
        if cfg.cost_model == "never":  # the rank-r weight, kept in the dense op
            with torch.no_grad():
                weight.copy_((B64 @ A64).reshape(weight.shape).to(weight.dtype))
            report.append({**row, "rank": int(r), "params_after": int(layer.m * layer.n), "relative_error": err,
                           "method": cfg.method, "allocation": cfg.allocation, "reason": "cost_model='never': dense"})
            continue
        _rewrite(gm, layer, A64, B64)
        report.append({**row, "rank": int(r), "params_after": int(r * (layer.m + layer.n)),
                       "relative_error": err, "method": cfg.method, "allocation": cfg.allocation,
                       "rows_per_call": stats[name].rows_per_call})

    return finish(captured, gm, report, modified, "LowRank")


def _uniform_ranks(layers, stats, decs, cfg: LowRank) -> tuple[dict[str, int], dict[str, dict]]:
    """Each layer's rank from the config alone; 0 (dense) where the cost model says it does not pay."""
    ranks: dict[str, int] = {}
    reasons: dict[str, dict] = {}
    for layer in layers:
        name, m, n = layer.node.name, layer.m, layer.n
        r = choose_rank(cfg, m, n, decs[name][1] if cfg.energy is not None else None)
        ranks[name] = r
        if cfg.cost_model != "auto":
            continue
        if r * (m + n) >= m * n:
            ranks[name], reasons[name] = 0, {"rank": r, "skipped": "no saving"}
        elif not factored_is_faster(m, n, r, stats[name].rows_per_call, layer.kind):
            ranks[name] = 0
            reasons[name] = {"rank": r, "skipped": _not_faster(layer, r, stats[name].rows_per_call)}
    return ranks, reasons


def _global_ranks(gm, layers, stats, decs, cfg: LowRank) -> tuple[dict[str, int], dict[str, dict]]:
    """Ranks from one budget over all layers that can be factored (``allocate_global``).

    Layers that the cost model never lets factor (no rank is faster) stay dense and are not part of the
    budget; the budget is ``param_ratio`` times the dense cost of the others.
    """
    ranks: dict[str, int] = {}
    reasons: dict[str, dict] = {}
    choices: list[_Choice] = []
    uniform: list[int] = []
    chosen: list[_Layer] = []
    for layer in layers:
        name, m, n = layer.node.name, layer.m, layer.n
        rows = stats[name].rows_per_call
        max_rank = max_fast_rank(m, n, rows, layer.kind) if cfg.cost_model == "auto" else min(m, n)
        if max_rank < 1:
            ranks[name] = 0
            reasons[name] = {"skipped": _not_faster(layer, 1, rows).replace("for r=1", "even at rank 1")}
            continue
        U, S, Vh, T = decs[name]
        if cfg.method == "activation":
            err = whitened_error_curve(S)
        else:
            err = error_curve(get_attr(gm, layer.w_node.target), U, S, Vh, T, stats[name].gram)
        if cfg.target == "macs":  # a rank is one output of the thin op A and one input of B (graph/macs.py)
            unit, dense = linear_macs(rows, m + n, 1), linear_macs(rows, m, n)
        else:
            unit, dense = m + n, m * n
        choices.append(_Choice(err, unit, dense, max_rank))
        r = choose_rank(cfg, m, n)
        uniform.append(r if r <= max_rank else 0)
        chosen.append(layer)
    if not choices:
        return ranks, reasons
    budget = cfg.param_ratio * sum(c.dense for c in choices)
    alloc = allocate_global(choices, budget)
    # the uniform allocation is a feasible point too whenever it fits: never return a worse one
    if _cost(choices, uniform) <= budget and _error(choices, uniform) < _error(choices, alloc):
        alloc = uniform
    unit = "MACs" if cfg.target == "macs" else "params"
    for layer, r in zip(chosen, alloc):
        ranks[layer.node.name] = r
        if r == 0:
            reasons[layer.node.name] = {"skipped": f"global allocation: dense is the best use of the {unit} budget"}
    return ranks, reasons
