"""Low-rank factorization: replace a dense ``linear`` by two thin ones, ``W ~= B @ A``.

For each ``aten.linear`` whose weight ``W`` (``[out, in]``) is a parameter, a rank ``r`` is chosen and the
node is rewritten as ``linear(linear(x, A), B, bias)`` with ``A`` ``[r, in]`` and ``B`` ``[out, r]``; the
layer shrinks from ``out*in`` to ``r*(out+in)`` weights (layers where that is no saving are left dense).

Two factorizations:

* ``"svd"``: truncated SVD of ``W`` (optimal in the Frobenius norm of the weight).
* ``"activation"``: SVD-LLM style *whitening*. With ``G = X^T X`` the Gram matrix of the layer's inputs over
  the calibration batches and ``G + eps*I = L L^T`` (Cholesky), the truncated SVD of ``W L`` gives
  ``W ~= U_r S_r V_r^T L^{-1}``, which minimises the output error ``||X W^T - X (BA)^T||_F`` (since
  ``||X D^T||_F = ||D L||_F``). ``A = V_r^T L^{-1}``, ``B = U_r S_r``.

The pass reports per layer the rank, parameter counts and the relative output error on the calibration
data (computed from the Gram matrix: ``||X D^T||_F^2 = tr(D G D^T)``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..calibration import iter_batches, observe
from ..capture.export import Captured
from ..config import PassConfig, register_config
from ..errors import ConfigError
from ..graph.context import get_attr
from .base import PassResult, matches_pattern, register_pass

METHODS = ("svd", "activation")
_LINEAR = torch.ops.aten.linear.default


@register_config
@dataclasses.dataclass(frozen=True)
class LowRank(PassConfig):
    """Factor every large ``linear`` weight into two low-rank ones.

    Exactly one of ``rank_ratio``, ``energy`` and ``param_ratio`` chooses the rank of each layer
    (``W`` is ``[m, n]``):

    rank_ratio:
        ``r = ceil(rank_ratio * min(m, n))``, in (0, 1].
    energy:
        The smallest ``r`` keeping this fraction of the squared singular values (of ``W``, or of the
        whitened ``W L`` for ``method="activation"``), in (0, 1].
    param_ratio:
        ``r = floor(param_ratio * m*n / (m+n))`` (at least 1): the factored layer keeps about this
        fraction of the weights, in (0, 1).

    Other parameters
    ----------------
    method:
        ``"svd"`` (plain truncated SVD) or ``"activation"`` (whitened by the calibration inputs' Gram
        matrix; minimises the output error rather than the weight error).
    ignore:
        Parameter or module-name patterns (fnmatch, or a module prefix) of layers to leave dense.
    min_features:
        Layers with fewer input or output features than this are left dense.
    damping:
        ``eps`` of the whitening, relative to ``trace(X^T X) / in``.

    A layer is left dense ("no saving") when ``r * (m + n) >= m * n``.
    """

    type_name: ClassVar[str] = "LowRank"

    rank_ratio: float | None = None
    energy: float | None = None
    param_ratio: float | None = None
    method: str = "svd"
    ignore: tuple[str, ...] = ()
    min_features: int = 16
    damping: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        if not isinstance(self.ignore, (tuple, list)) or not all(isinstance(p, str) for p in self.ignore):
            raise ConfigError(f"ignore must be a tuple of name patterns, got {self.ignore!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))
        chosen = [k for k in ("rank_ratio", "energy", "param_ratio") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(
                f"LowRank needs exactly one of rank_ratio, energy, param_ratio; got {chosen or 'none'}"
            )
        if self.rank_ratio is not None:
            _check_number("rank_ratio", self.rank_ratio, upper_inclusive=True)
        if self.energy is not None:
            _check_number("energy", self.energy, upper_inclusive=True)
        if self.param_ratio is not None:
            _check_number("param_ratio", self.param_ratio, upper_inclusive=False)
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.min_features, bool) or not isinstance(self.min_features, int) or self.min_features < 1:
            raise ConfigError(f"min_features must be a positive integer, got {self.min_features!r}")
        d = self.damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ConfigError(f"damping must be a positive number, got {d!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "activation"


def _check_number(name: str, v: Any, *, upper_inclusive: bool) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ok = ok and 0.0 < v and (v <= 1.0 if upper_inclusive else v < 1.0)
    if not ok:
        interval = "(0, 1]" if upper_inclusive else "(0, 1)"
        raise ConfigError(f"{name} must be a number in {interval}, got {v!r}")


# ------------------------------------------------------------------------------------------------ the math
def _whitener(gram: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L^{-1})`` with ``L L^T = gram + eps*I`` (float64); eps grows until Cholesky succeeds."""
    g = gram.double()
    n = g.shape[0]
    scale = float(torch.trace(g)) / n
    if not math.isfinite(scale) or scale <= 0:
        scale = 1.0
    eye = torch.eye(n, dtype=torch.float64)
    eps = damping
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(g + eps * scale * eye)
        if int(info) == 0:
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            return L, Linv
        eps *= 10.0
    raise ConfigError("the calibration Gram matrix could not be factorised (non-finite activations?)")


def decompose(weight: torch.Tensor, gram: torch.Tensor | None = None, damping: float = 1e-6):
    """SVD of ``W`` (``gram=None``) or of the whitened ``W L``: returns ``(U, S, Vh, Linv)`` in float64.

    ``Linv`` is ``None`` without whitening. ``U @ diag(S) @ Vh @ Linv == W`` (up to rounding).
    """
    w = weight.detach().double().cpu()
    if gram is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        return U, S, Vh, None
    L, Linv = _whitener(gram.cpu(), damping)
    U, S, Vh = torch.linalg.svd(w @ L, full_matrices=False)
    return U, S, Vh, Linv


def factors_from(U, S, Vh, Linv, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` (float64) from a ``decompose`` result truncated to ``rank``."""
    r = max(1, min(int(rank), S.shape[0]))
    A = Vh[:r]
    if Linv is not None:
        A = A @ Linv
    B = U[:, :r] * S[:r]
    return A, B


def lowrank_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None,
                    damping: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight`` (``[out, in]``) as ``B @ A`` with ``A`` ``[rank, in]``, ``B`` ``[out, rank]``.

    Plain truncated SVD when ``gram`` is ``None``, else whitened by ``gram = X^T X`` (SVD-LLM). The factors
    have the weight's dtype and device.
    """
    A, B = factors_from(*decompose(weight, gram, damping), rank)
    return A.to(weight.dtype).to(weight.device), B.to(weight.dtype).to(weight.device)


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``sum(S[:r]^2) >= energy * sum(S^2)``."""
    e = S.double() ** 2
    total = float(e.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(e, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return max(1, min(r, S.shape[0]))


def choose_rank(cfg: LowRank, m: int, n: int, S: torch.Tensor | None = None) -> int:
    """The rank for a ``[m, n]`` weight under ``cfg`` (``S``: singular values, needed for ``energy``)."""
    k = min(m, n)
    if cfg.rank_ratio is not None:
        r = int(math.ceil(cfg.rank_ratio * k - 1e-9))
    elif cfg.param_ratio is not None:
        r = int(math.floor(cfg.param_ratio * m * n / (m + n) + 1e-9))
    else:
        assert S is not None
        r = energy_rank(S, cfg.energy)
    return max(1, min(r, k))


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X W^T - X W'^T||_F / ||X W^T||_F`` from the Gram matrix ``X^T X``."""
    w = weight.detach().double().cpu()
    d = w - approx.detach().double().cpu()
    g = gram.double().cpu()
    num = float(torch.einsum("oi,ij,oj->", d, g, d))
    den = float(torch.einsum("oi,ij,oj->", w, g, w))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return math.sqrt(max(num, 0.0) / den)


# ------------------------------------------------------------------------------------------------ selection
def _candidates(gm: fx.GraphModule, cfg: LowRank) -> tuple[list[fx.Node], list[dict]]:
    """Linear nodes to factor, and report rows for the ones left dense."""
    todo: list[fx.Node] = []
    skipped: list[dict] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not _LINEAR or len(node.args) < 2:
            continue
        w = node.args[1]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        try:
            param = get_attr(gm, w.target)
        except AttributeError:
            continue
        if not isinstance(param, torch.Tensor) or param.dim() != 2 or not param.is_floating_point():
            continue
        m, n = param.shape
        row = {"layer": w.target, "node": node.name, "shape": [int(m), int(n)], "params_before": int(m * n)}
        if any(matches_pattern(w.target, p) for p in cfg.ignore):
            skipped.append({**row, "skipped": "ignored"})
        elif min(m, n) < cfg.min_features:
            skipped.append({**row, "skipped": f"fewer than min_features={cfg.min_features} features"})
        elif len(w.users) != 1:
            skipped.append({**row, "skipped": "weight shared with other ops"})
        else:
            todo.append(node)
    return todo, skipped


def _grams(gm: fx.GraphModule, nodes: list[fx.Node], captured: Captured, calibration: Any) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each node's input over the calibration batches."""
    want = {n.name: n.args[0] for n in nodes}
    grams: dict[str, torch.Tensor] = {}

    def hook(node: fx.Node, value: Any, interp: Any) -> None:
        x_node = want.get(node.name)
        if x_node is None:
            return
        x = interp.env[x_node].detach()
        x = x.reshape(-1, x.shape[-1]).double()
        g = x.T @ x
        grams[node.name] = grams[node.name] + g if node.name in grams else g

    for args, kwargs in iter_batches(calibration, captured):
        observe(gm, args, kwargs, hook)
    return grams


def _free_name(module: torch.nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


# ------------------------------------------------------------------------------------------------ the pass
@register_pass(LowRank)
def run_lowrank(captured: Captured, cfg: LowRank, calibration: Any = None) -> PassResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(captured.module)
    todo, report = _candidates(gm, cfg)
    if not todo:
        return PassResult(captured, False, report, "LowRank")
    grams = _grams(gm, todo, captured, calibration)

    modified = False
    for node in todo:
        w_node = node.args[1]
        weight = get_attr(gm, w_node.target)
        m, n = weight.shape
        row: dict[str, Any] = {"layer": w_node.target, "node": node.name, "shape": [int(m), int(n)],
                               "params_before": int(m * n)}
        gram = grams.get(node.name)
        if gram is None:  # the node did not run on the calibration data
            report.append({**row, "skipped": "not reached by the calibration data"})
            continue
        whiten = gram if cfg.method == "activation" else None
        r = choose_rank(cfg, m, n) if cfg.energy is None else None
        if r is not None and r * (m + n) >= m * n:
            report.append({**row, "rank": r, "skipped": "no saving"})
            continue
        dec = decompose(weight, whiten, cfg.damping)
        if r is None:
            r = choose_rank(cfg, m, n, dec[1])
            if r * (m + n) >= m * n:
                report.append({**row, "rank": r, "skipped": "no saving"})
                continue
        A64, B64 = factors_from(*dec, r)
        err = relative_output_error(weight, B64 @ A64, gram)
        A = torch.nn.Parameter(A64.to(weight.dtype).to(weight.device).contiguous(), requires_grad=weight.requires_grad)
        B = torch.nn.Parameter(B64.to(weight.dtype).to(weight.device).contiguous(), requires_grad=weight.requires_grad)

        prefix, _, leaf = w_node.target.rpartition(".")
        owner = gm.get_submodule(prefix) if prefix else gm
        a_name = _free_name(owner, f"{leaf}_lr_a")
        owner.register_parameter(a_name, A)
        b_name = _free_name(owner, f"{leaf}_lr_b")
        owner.register_parameter(b_name, B)
        a_target = f"{prefix}.{a_name}" if prefix else a_name
        b_target = f"{prefix}.{b_name}" if prefix else b_name

        with gm.graph.inserting_before(node):
            a_node = gm.graph.get_attr(a_target)
            b_node = gm.graph.get_attr(b_target)
            inner = gm.graph.call_function(_LINEAR, (node.args[0], a_node))
        node.args = (inner, b_node, *node.args[2:])
        if not w_node.users:
            gm.graph.erase_node(w_node)
            if not any(nd.op == "get_attr" and nd.target == w_node.target for nd in gm.graph.nodes):
                delattr(owner, leaf)
        modified = True
        report.append({**row, "rank": int(r), "params_after": int(r * (m + n)),
                       "relative_error": err, "method": cfg.method})

    order = {nd.name: i for i, nd in enumerate(captured.module.graph.nodes)}
    report.sort(key=lambda row: order.get(row["node"], len(order)))
    if not modified:
        return PassResult(captured, False, report, "LowRank")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(captured.recapture(gm), True, report, "LowRank")
