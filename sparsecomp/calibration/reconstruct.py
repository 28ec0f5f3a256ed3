"""Reconstruction: refit the weights of a compressed op so that it reproduces the dense op's output.

Three layers, usable by any pass (structured pruning, sparsification, low rank):

* :class:`Moments` accumulates the calibration statistics of one op: the input's second moment
  ``X^T X``, its sum, the input/target cross moment ``X^T Y`` and the target's energy, in float64;
* :func:`refit` solves the regularised least-squares problem ``min ||X W^T + b - Y||^2 + damp ||W||^2``
  from those moments (the bias is free, so it absorbs the mean of whatever was removed: FLAP-style
  compensation), and :func:`obs_profile` gives the greedy Optimal-Brain-Surgeon removal order of blocks of
  input columns with the error left after the optimal refit of the others (ZipLM-style);
* :func:`sequential_refit` runs the dense and the compressed graph side by side over the calibration
  batches, op by op in topological order, and refits every chosen ``aten.linear``/``aten.conv2d`` of the
  compressed graph on the *compressed* model's own inputs against the *dense* model's outputs (as
  SparseGPT does), so that errors of earlier layers are corrected instead of compounded.

Padding: rows of an activation whose leading dims equal the shape of a ``token_mask`` (e.g. the
``attention_mask`` input of a transformer) are kept only where the mask is non-zero; other activations use
every row.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .data import progress_bar
from ..errors import PassError
from ..graph.attrs import get_attr, set_tensor

aten = torch.ops.aten
REFITTABLE = (aten.linear.default, aten.conv2d.default)


# ------------------------------------------------------------------------------------------------ moments
@dataclasses.dataclass
class Moments:
    """Running sums over calibration rows: ``xx = X^T X``, ``x = sum X``, ``xy = X^T Y``, ``y``, ``yy``.

    Built with ``diagonal=True``, ``xx`` holds only the diagonal of ``X^T X`` (per-column sums of squares,
    a vector): what weight-times-variance criteria need, at ``d_in`` instead of ``d_in^2`` memory and time.
    """

    xx: torch.Tensor
    x: torch.Tensor
    n: int = 0
    xy: torch.Tensor | None = None
    y: torch.Tensor | None = None
    yy: float = 0.0

    @classmethod
    def zeros(cls, d_in: int, d_out: int | None = None, diagonal: bool = False) -> "Moments":
        z = torch.zeros
        return cls(z(d_in, dtype=torch.float64) if diagonal else z(d_in, d_in, dtype=torch.float64),
                   z(d_in, dtype=torch.float64), 0,
                   None if d_out is None else z(d_in, d_out, dtype=torch.float64),
                   None if d_out is None else z(d_out, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Add rows ``x`` (n, d_in) and, when tracking a target, ``y`` (n, d_out)."""
        x = x.detach().float()
        if self.diagonal:
            self.xx += (x * x).sum(0).double()
        else:
            self.xx += (x.T @ x).double()
        self.x += x.sum(0).double()
        self.n += x.shape[0]
        if y is not None:
            self.add_targets(x, y)

    def add_targets(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add only the target side of rows already counted in ``xx``/``x``/``n`` (shared input statistics)."""
        x, y = x.detach().float(), y.detach()
        if self.xy is None:
            self.xy = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)
            self.y = torch.zeros(y.shape[1], dtype=torch.float64)
        xt = x.T
        for c in _column_chunks(self.xy.shape[0], y.shape[1]):  # a 32k-wide X^T Y: no whole float32 copy
            yc = y[:, c].float()
            self.xy[:, c] += (xt @ yc).double()
            self.y[c] += yc.sum(0).double()
        self.yy += sum_squares(y)

    def with_targets(self) -> "Moments":
        """Moments sharing this object's input statistics (not copied) with empty target sums."""
        return dataclasses.replace(self, xy=None, y=None, yy=0.0)

    @property
    def diagonal(self) -> bool:
        """Whether only the diagonal of ``X^T X`` is kept."""
        return self.xx.dim() == 1

    @property
    def squares(self) -> torch.Tensor:
        """Per input column, the sum of squares over the rows (the diagonal of ``X^T X``)."""
        return self.xx if self.diagonal else torch.diagonal(self.xx)

    @property
    def mean(self) -> torch.Tensor:
        return self.x / max(self.n, 1)

    def covariance(self) -> torch.Tensor:
        """Centered second moment ``sum (x - mean)(x - mean)^T`` (what is left once a bias absorbs means)."""
        if self.diagonal:
            raise ValueError("these moments keep only the diagonal of X^T X (Moments.zeros(diagonal=True))")
        m = self.mean
        return self.xx - self.n * torch.outer(m, m)


def merge(moms: Sequence[Moments]) -> Moments:
    """The moments of the union of the rows of ``moms``."""
    out = dataclasses.replace(moms[0], xx=moms[0].xx.clone(), x=moms[0].x.clone(),
                              xy=None if moms[0].xy is None else moms[0].xy.clone(),
                              y=None if moms[0].y is None else moms[0].y.clone())
    for m in moms[1:]:
        out.xx += m.xx
        out.x += m.x
        out.n += m.n
        out.yy += m.yy
        if out.xy is not None:
            out.xy += m.xy
            out.y += m.y
    return out


def damping(diag: torch.Tensor, damp: float) -> float:
    """The ridge ``lambda``: ``damp`` times the mean diagonal of a second-moment matrix."""
    return float(damp * diag.mean().clamp_min(1e-12))


def refit(mom: Moments, damp: float = 1e-2, bias: bool = True, prior: torch.Tensor | None = None,
          factors: dict | None = None, key: Any = None, with_error: bool = False) -> tuple:
    """Least-squares weights ``(W, b)`` mapping the inputs of ``mom`` to its targets.

    Solves ``min_W,b sum ||W x + b - y||^2 + lambda ||W - W0||^2`` with ``lambda = damp * mean(diag C)``
    (``C``: the input covariance when there is a bias, else ``X^T X``; the bias is not regularised) and
    ``W0 = prior`` (zero when ``None``). Shrinking toward the pruned weights rather than toward zero keeps
    what the dense model learned where the calibration data says little, which is what makes the refit
    generalise beyond the calibration sentences. Returns ``W`` (d_out, d_in) and ``b`` (or ``None``), float64.

    ``factors``/``key``: a cache of the factorised ``C + lambda I`` under ``(key, damp, bias)``, for ops
    that read the same input rows (``key`` names those rows; the solve then costs no new factorisation).

    ``with_error``: also return the solution's output error ``sum ||W x + b - y||^2`` (as
    :func:`output_error`) from the normal equations, ``yy - tr(W Cxy) + lambda (tr(W W0^T) - ||W||^2)``:
    ``d_out x d_in`` work instead of ``d_out x d_in^2``.
    """
    if mom.xy is None or mom.n == 0:
        raise ValueError("refit needs moments with targets (Moments.add(x, y))")
    mx, my = (mom.mean, mom.y / mom.n) if bias else (None, None)
    cache_key = None if factors is None or key is None else (key, damp, bias)
    if cache_key is not None and cache_key in factors:
        factor, lam, is_chol = factors[cache_key]
    else:
        cov = mom.covariance() if bias else mom.xx.clone()
        lam = damping(torch.diagonal(cov), damp)
        cov.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(cov)
        is_chol = int(info) == 0
        if not is_chol:
            factor = cov  # not positive definite: least squares on the matrix itself (as solve_psd)
        if cache_key is not None:
            factors[cache_key] = (factor, lam, is_chol)
    # output columns are independent given the factor: solved in chunks, so that a 32k-wide head holds
    # its float64 X^T Y and W once instead of several float64 copies of that size
    d_in, d_out = mom.xy.shape
    w = torch.empty(d_out, d_in, dtype=torch.float64)
    fit = 0.0  # tr(W^T Cxy), and with a prior lam (tr(W W0^T) - ||W||^2): the normal-equation error terms
    for c in _column_chunks(d_in, d_out):
        cxy = mom.xy[:, c] - mom.n * torch.outer(mx, my[c]) if bias else mom.xy[:, c]
        rhs = cxy if prior is None else cxy + lam * prior[c].double().T
        w_t = torch.cholesky_solve(rhs, factor) if is_chol else torch.linalg.lstsq(factor, rhs).solution
        w[c] = w_t.T
        if with_error and is_chol:
            fit += float(torch.sum(w_t * cxy))
            if prior is not None:
                fit -= lam * (float(torch.sum(w_t.T * prior[c].double())) - float(torch.sum(w_t * w_t)))
        del cxy, rhs, w_t
    b = (my - w @ mx) if bias else None
    if not with_error:
        return w, b
    if not is_chol:  # least squares on a singular matrix: the identity needs the exact solve
        return w, b, output_error(mom, w, b)
    yy = mom.yy - mom.n * float(my @ my) if bias else mom.yy
    return w, b, max(yy - fit, 0.0)


#: Float64 elements per output-column chunk of :func:`refit` and :meth:`Moments.add_targets` (64 MiB).
CHUNK_COLUMNS_ELEMENTS = 1 << 23


def _column_chunks(d_in: int, d_out: int) -> list[slice]:
    step = max(1, CHUNK_COLUMNS_ELEMENTS // max(d_in, 1))
    return [slice(k, min(k + step, d_out)) for k in range(0, d_out, step)]


#: Ridge strengths tried by :func:`cross_validated_damp` (relative to the mean diagonal of the covariance).
CV_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: Folds of the calibration rows for the cross-validation.
CV_FOLDS = 4
#: A refit must lower its op's calibration error by this fraction to be applied (below is float noise).
MIN_GAIN = 1e-4


def add_to_folds(folds: list[Moments], x: torch.Tensor, y: torch.Tensor | None, n_folds: int) -> None:
    """Add the rows of one calibration batch to ``n_folds`` moment folds, in contiguous chunks (rows are
    sample-major, so a sample's tokens or positions mostly land in one fold and the folds stay independent).
    ``y=None``: input statistics only."""
    if not folds:
        folds.extend(Moments.zeros(x.shape[1], None if y is None else y.shape[1]) for _ in range(n_folds))
    ys = [None] * n_folds if y is None else torch.tensor_split(y, n_folds)
    for fold, xs, yc in zip(folds, torch.tensor_split(x, n_folds), ys):
        if xs.shape[0]:
            fold.add(xs, yc)


def cross_validated_damp(folds: Sequence[Moments], prior: torch.Tensor | None, bias: bool = True,
                         grid: Sequence[float] = CV_GRID, factors: dict | None = None, key: Any = None) -> float:
    """The ``damp`` of :func:`refit` (from ``grid``, ascending) with the least held-out output error, summed
    over leave-one-fold-out fits. Falls back to ``0.01`` when fewer than two folds have rows.

    The held-out error of ridge regression is unimodal in the log of its strength, so the search starts
    at the grid value nearest ``0.01`` and walks downhill, stopping where the error rises (on average about
    half the grid is evaluated). ``factors``/``key``: as in :func:`refit`, so that ops reading the same
    input rows (``key``) share the factorisations the validation needs.
    """
    live = [(i, f) for i, f in enumerate(folds) if f.n > 1]
    if len(live) < 2:
        return 1e-2
    total = merge([f for _, f in live])
    errors: dict[int, float] = {}

    def error(k: int) -> float:
        if k not in errors:
            d, err = grid[k], 0.0
            for j, held in live:
                # the training rows of fold j as the total minus fold j: one d_in x d_in matrix at a time
                cached = factors is not None and key is not None and ((key, "cv", j), d, bias) in factors
                train = _without(total, held, gram=not cached)  # refit reads no Gram when its factor is cached
                w, b = refit(train, damp=d, bias=bias, prior=prior, factors=factors,
                             key=None if key is None else (key, "cv", j))
                del train
                err += output_error(held, w, b)
            errors[k] = err
        return errors[k]

    k = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / 1e-2)))
    for step in (-1, 1):
        while 0 <= k + step < len(grid) and error(k + step) < error(k):
            k += step
    return grid[k]


def _without(total: Moments, part: Moments, gram: bool = True) -> Moments:
    """The moments of ``total``'s rows minus ``part``'s (a subset of them); ``gram=False`` shares
    ``total.xx`` instead of forming the difference (for a reader that does not use it)."""
    return Moments(total.xx - part.xx if gram else total.xx, total.x - part.x, total.n - part.n,
                   None if total.xy is None else total.xy - part.xy,
                   None if total.y is None else total.y - part.y, total.yy - part.yy)


def solve_psd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^-1 b`` for a symmetric positive (semi)definite ``a``: Cholesky, least squares if that fails."""
    l, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, l)
    return torch.linalg.lstsq(a, b).solution


def output_error(mom: Moments, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """``sum ||W x + b - y||^2`` over the rows of ``mom`` (needs targets), from the moments alone."""
    w = w.double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
    quad = float(torch.sum((w @ mom.xx) * w)) + 2 * float(b @ (w @ mom.x)) + mom.n * float(b @ b)
    cross = float(torch.sum(w.T * mom.xy)) + float(b @ mom.y)
    return max(quad - 2 * cross + mom.yy, 0.0)


# ------------------------------------------------------------------------------------------------ OBS
@dataclasses.dataclass
class Profile:
    """Greedy removal of input-column blocks of one op: ``order[k]`` is the k-th unit removed and
    ``error[k]`` the output error (sum of squares over calibration rows) once units ``order[:k+1]`` are
    gone and the remaining weights and the bias are optimally refit."""

    order: list[int]
    error: np.ndarray


def obs_profile(weight: torch.Tensor, cov: torch.Tensor, blocks: Mapping[int, Sequence[int]],
                damp: float = 1e-2, max_remove: int | None = None) -> Profile:
    """Greedy Optimal-Brain-Surgeon profile over ``blocks`` (unit -> input-column indices of ``weight``).

    ``cov`` is the centered input covariance (``Moments.covariance()``), so the error accounts for the bias
    absorbing the removed columns' means. At each step the block ``B`` with the least
    ``tr(W_B (H^-1_BB)^-1 W_B^T)`` is removed and ``W`` and ``H^-1`` are updated (one block at a time for up
    to 64-column blocks, in small batches of single columns for wide groups).
    """
    units = list(blocks)
    cols = [np.asarray(blocks[u], dtype=np.int64) for u in units]
    w = weight.detach().double().reshape(weight.shape[0], -1).clone()
    h = cov.double().clone()
    lam = damping(torch.diagonal(h), damp)
    h += lam * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    alive = np.ones(len(units), dtype=bool)
    n_remove = len(units) if max_remove is None else min(max_remove, len(units))
    order: list[int] = []
    errs: list[float] = []
    total = 0.0
    single = all(len(c) == 1 for c in cols)
    step = max(1, int(math.ceil(len(units) / 256))) if single else 1
    while len(order) < n_remove:
        idx = np.flatnonzero(alive)
        if single:
            c = torch.as_tensor(np.concatenate([cols[i] for i in idx]))
            d = torch.diagonal(hinv)[c].clamp_min(1e-30)
            score = (w[:, c] ** 2).sum(0) / d
            take = min(step, n_remove - len(order))
            best = idx[torch.argsort(score)[:take].numpy()]
        else:
            score = torch.empty(len(idx), dtype=torch.float64)
            for j, i in enumerate(idx):
                c = torch.as_tensor(cols[i])
                wb = w[:, c]
                score[j] = torch.sum(wb * torch.linalg.solve(hinv[c][:, c], wb.T).T)
            best = idx[[int(torch.argmin(score))]]
        c = torch.as_tensor(np.concatenate([cols[i] for i in best]))
        hbb_inv = torch.linalg.inv(hinv[c][:, c])
        wb = w[:, c]
        delta = wb @ hbb_inv  # (out, |B|)
        total += float(torch.sum(delta * wb))
        w -= delta @ hinv[c, :]
        hinv -= hinv[:, c] @ hbb_inv @ hinv[c, :]
        w[:, c] = 0
        for i in best:
            alive[i] = False
            order.append(units[i])
            errs.append(total)
    return Profile(order, np.asarray(errs))


# ------------------------------------------------------------------------------------------------ rows
def token_rows(t: torch.Tensor, mask: torch.Tensor | None, feature_dim: int = -1) -> torch.Tensor:
    """Rows ``(n, features)`` of activation ``t`` (features along ``feature_dim``), padding rows dropped.

    When ``mask`` is given and the activation's other dims equal ``mask.shape`` (or flatten to the same
    number of rows), only rows where the mask is non-zero are returned.
    """
    t = t.detach()
    if feature_dim != -1 and feature_dim != t.dim() - 1:
        t = t.movedim(feature_dim, -1)
    lead = t.shape[:-1]
    rows = t.reshape(-1, t.shape[-1])
    if mask is not None and (tuple(lead) == tuple(mask.shape) or math.prod(lead) == mask.numel()):
        rows = rows[mask.reshape(-1) != 0]
    return rows


def conv_rows(x: torch.Tensor, node: fx.Node) -> torch.Tensor:
    """Unfolded input patches ``(n, C_in*kh*kw)`` of a ``conv2d`` node (channel-major, as its weight)."""
    w_shape = node.args[1].meta["val"].shape
    stride, padding, dilation = (_arg(node, i, d) for i, d in ((3, 1), (4, 0), (5, 1)))
    cols = F.unfold(x.detach().float(), w_shape[2:], dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _arg(node: fx.Node, i: int, default: Any) -> Any:
    names = {3: "stride", 4: "padding", 5: "dilation", 6: "groups"}
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(names[i], default)


def refittable(node: fx.Node) -> str | None:
    """Why ``node`` cannot be refit (``None`` when it can): a linear or ungrouped conv2d whose weight
    is a ``get_attr`` (and bias, if any)."""
    if node.op != "call_function" or node.target not in REFITTABLE:
        return "not a linear/conv2d"
    w = node.args[1] if len(node.args) > 1 else None
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return "weight is not a parameter"
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr"):
        return "bias is not a parameter"
    if node.target is aten.conv2d.default and _arg(node, 6, 1) != 1:
        return "grouped convolution"
    if node.target is aten.conv2d.default and isinstance(_arg(node, 4, 0), str):
        return "string padding"
    return None


def format_bytes(n: float) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{int(n)} B"


def gram_bytes(d_in: int, copies: int = 1) -> int:
    """Bytes of ``copies`` float64 ``d_in x d_in`` Gram matrices (the statistics of one refit)."""
    return 8 * d_in * d_in * copies


def weight_target(node: fx.Node) -> str:
    return node.args[1].target


def bias_node(node: fx.Node) -> fx.Node | None:
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return b if isinstance(b, fx.Node) else None


def input_rows(node: fx.Node, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if node.target is aten.conv2d.default:
        return conv_rows(x, node)
    return token_rows(x, mask)


def output_rows(node: fx.Node, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if node.target is aten.conv2d.default:
        return token_rows(y, None, feature_dim=1)
    return token_rows(y, mask)


# ------------------------------------------------------------------------------------------------ stepping
class _Stepper:
    """Runs one graph over several batches node by node (all batches in lockstep), freeing dead values."""

    def __init__(self, gm: fx.GraphModule, batches: list[list[Any]]) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = 0
        self.interps = []
        for flat in batches:
            it = fx.Interpreter(gm, garbage_collect_values=False)
            it.args_iter = iter(flat)
            self.interps.append(it)
        last_use: dict[fx.Node, fx.Node] = {}
        for n in reversed(self.nodes):
            for a in n.all_input_nodes:
                last_use.setdefault(a, n)
        self.free_after: dict[fx.Node, list[fx.Node]] = {}
        for a, n in last_use.items():
            self.free_after.setdefault(n, []).append(a)

    @property
    def done(self) -> bool:
        return self.pos >= len(self.nodes) or self.nodes[self.pos].op == "output"

    @property
    def current(self) -> fx.Node:
        return self.nodes[self.pos]

    def values(self, node: fx.Node) -> list[Any]:
        return [it.env[node] for it in self.interps]

    def set_value(self, node: fx.Node, value: Any) -> None:
        for it in self.interps:
            if node in it.env:
                it.env[node] = value

    def step(self) -> list[Any]:
        n = self.nodes[self.pos]
        outs = []
        with torch.no_grad():
            for it in self.interps:
                it.env[n] = out = it.run_node(n)
                outs.append(out)
                for a in self.free_after.get(n, ()):
                    it.env.pop(a, None)
        self.pos += 1
        return outs


@dataclasses.dataclass
class RefitRecord:
    """What :func:`sequential_refit` did to one op (errors are sums of squares over calibration rows)."""

    weight: str
    rows: int
    error_before: float
    error_after: float
    refit: bool
    reason: str = ""
    damp: float | None = None
    damp_from: str = ""  # the role whose earlier blocks' cross-validation chose ``damp`` (see CV_PER_ROLE)


_PASSTHROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default}


def residual_add(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, other)`` when ``node``'s only use, through dropout/clone, is ``aten.add.Tensor(.., other)``."""
    cur = node
    while len(cur.users) == 1:
        (user,) = cur.users
        if user.op != "call_function":
            return None
        if user.target in _PASSTHROUGH and user.args[0] is cur:
            cur = user
            continue
        if user.target is aten.add.Tensor and len(user.args) == 2 and user.kwargs.get("alpha", 1) == 1:
            other = user.args[1] if user.args[0] is cur else user.args[0]
            return (user, other) if isinstance(other, fx.Node) else None
        return None
    return None


def sequential_refit(
    dense: fx.GraphModule,
    compressed: fx.GraphModule,
    batches: Sequence[list[Any]],
    out_keep: Mapping[str, np.ndarray | None],
    select: Callable[[fx.Node], bool],
    masks: Sequence[torch.Tensor | None] | None = None,
    damp: float | str = "cv",
    progress: bool = False,
    residual: bool = False,
    n_folds: int = CV_FOLDS,
    memory_budget: int | None = None,
) -> list[RefitRecord]:
    """Refit, in place and in topological order, the selected ops of ``compressed`` against ``dense``.

    ``batches`` are the flat placeholder values of each calibration batch (both graphs take the same
    inputs). An op of ``compressed`` and its dense twin are matched by weight name; the target of the fit
    is the dense op's output restricted to the kept output indices ``out_keep[weight]`` (``None``: all).
    Each fit is a ridge regression toward the op's current (pruned) weights; ``damp`` is its strength, or
    ``"cv"`` to choose it per op by ``n_folds``-fold cross-validation over the calibration rows
    (:func:`cross_validated_damp`). An op is refit only when the solution lowers its calibration output
    error (it never makes an op worse). Returns one record per selected op.

    With ``residual``, an op whose output only feeds a residual ``add(op(x), r)`` (and keeps all its
    output indices) is fit to ``dense add output - compressed r`` instead: it then also absorbs the error
    that earlier layers left in the residual stream.

    ``memory_budget`` (bytes): an op whose float64 statistics (one ``d_in x d_in`` Gram matrix per fold
    and their sum, :func:`gram_bytes`) would exceed it is left as it is, with the reason in its record.
    """
    masks = list(masks) if masks is not None else [None] * len(batches)
    d_run, c_run = _Stepper(dense, list(batches)), _Stepper(compressed, list(batches))
    dense_ops: dict[str, fx.Node] = {}
    counts: dict[str, int] = {}
    for n in dense.graph.nodes:
        if refittable(n) is None:
            counts[weight_target(n)] = counts.get(weight_target(n), 0) + 1
            dense_ops[weight_target(n)] = n
    todo = [n for n in compressed.graph.nodes if select(n)]
    wanted = {weight_target(n) for n in todo if refittable(n) is None}
    shared: dict[tuple, _SharedInput] = {}
    readers: dict[tuple, int] = {}
    for n in todo:
        if refittable(n) is None:
            readers[input_key(n)] = readers.get(input_key(n), 0) + 1
    cv_chosen: dict[str, list[float]] = {}
    dense_out: dict[str, list[torch.Tensor]] = {}
    dense_add: dict[str, Any] = {}
    d_index = {n: i for i, n in enumerate(d_run.nodes)}
    records: list[RefitRecord] = []
    for node in progress_bar(todo, "reconstruction", progress):
        why = refittable(node)
        wt = weight_target(node) if why is None else str(node.args[1])
        if why is None and (wt not in dense_ops or counts.get(wt, 0) != 1):
            why = "weight is shared or has no dense twin"
        while c_run.current is not node:
            if c_run.done:
                raise PassError("reconstruction", f"node {node.name} not reached in the compressed graph")
            c_run.step()
        if why is None and memory_budget is not None:
            w_shape = get_attr(compressed, wt).shape
            need = gram_bytes(int(np.prod(w_shape[1:])) + 1, (n_folds if damp == "cv" else 1) + 1)
            if need > memory_budget:
                why = (f"over memory_budget: its {int(np.prod(w_shape[1:]))}-input Gram matrices need "
                       f"{format_bytes(need)} (budget {format_bytes(memory_budget)})")
        if why is not None:
            records.append(RefitRecord(wt, 0, 0.0, 0.0, False, why))
            if refittable(node) is None:
                _release(shared, readers, input_key(node))
            continue
        while wt not in dense_out:
            if d_run.done:
                raise PassError("reconstruction", f"dense twin of {node.name} ({wt}) not reached")
            dn = d_run.current
            outs = d_run.step()
            if dn.op == "call_function" and refittable(dn) is None and weight_target(dn) in wanted:
                dense_out[weight_target(dn)] = outs
                dense_add[weight_target(dn)] = residual_add(dn)
        ys = dense_out.pop(wt)
        keep = out_keep.get(wt)
        c_add, d_add = residual_add(node), dense_add.pop(wt, None)
        if (residual and keep is None and c_add is not None and d_add is not None
                and c_add[1] in c_run.interps[0].env and d_index[d_add[0]] >= d_run.pos):
            sums = None
            while sums is None:
                dn = d_run.current
                outs = d_run.step()
                if dn is d_add[0]:
                    sums = outs
            ys = [s - r for s, r in zip(sums, c_run.values(c_add[1]))]
        keep_t = None if keep is None else torch.as_tensor(np.asarray(keep), dtype=torch.long)
        w_param = get_attr(compressed, wt)
        b_node = bias_node(node)
        b_param = None if b_node is None else get_attr(compressed, b_node.target)
        w_old = w_param.detach().reshape(w_param.shape[0], -1)
        key = input_key(node)
        if key not in shared:
            shared[key] = _SharedInput(_input_folds(node, c_run.values(node.args[0]), masks, n_folds))
        inp = shared[key]
        cache = inp.factors if readers[key] > 1 else None  # factorisations are kept for the input's later readers
        # targets: per fold when the cross-validation reads every output column (narrow ops), else one
        # accumulator for the refit plus per-fold sums over CV_OUTPUTS columns (a vocabulary projection's
        # X^T Y is then held once, not once per fold)
        cols = _cv_columns(w_old.shape[0]) if damp == "cv" else None
        whole = damp != "cv" or cols is not None
        mom = inp.merged().with_targets() if whole else None
        cv_folds = [f.with_targets() for f in inp.folds] if damp == "cv" else []
        before = 0.0
        for x, y, m in zip(c_run.values(node.args[0]), ys, masks):
            xr = input_rows(node, x, m)
            yr = output_rows(dense_ops[wt], y, m)
            if keep_t is not None:
                yr = yr.index_select(1, keep_t)
            before += _rows_error(xr, yr, w_old, b_param)
            if mom is not None:
                mom.add_targets(xr, yr)
            for fold, xs, ts in zip(cv_folds, torch.tensor_split(xr, n_folds), torch.tensor_split(yr, n_folds)):
                if xs.shape[0]:
                    fold.add_targets(xs, ts if cols is None else ts[:, cols])
        if mom is None:
            mom = merge(cv_folds)
        bias = b_param is not None
        damp_from = ""
        if damp != "cv":
            d_use = damp
        else:
            role = weight_role(wt)
            earlier = cv_chosen.setdefault(role, [])
            if len(earlier) >= CV_PER_ROLE and w_old.shape[1] >= CV_SHARED_MIN_INPUTS:
                d_use, damp_from = sorted(earlier)[len(earlier) // 2], role
            else:
                prior = w_old if cols is None else w_old[torch.as_tensor(cols)]
                d_use = cross_validated_damp(cv_folds, prior, bias, factors=cache, key=key)
                earlier.append(d_use)
        w_new, b_new, after = refit(mom, damp=d_use, bias=bias, prior=w_old, factors=cache, key=key,
                                    with_error=True)
        _release(shared, readers, key)
        n_rows = mom.n
        # drop this op's statistics and rows before the graphs step on (a vocabulary head's are gigabytes)
        del inp, cache, cv_folds, mom
        ys = sums = outs = x = y = xr = yr = None
        if after < before * (1 - MIN_GAIN) and all(torch.isfinite(t).all() for t in (w_new, b_new) if t is not None):
            new_w = set_tensor(compressed, wt, w_new)
            c_run.set_value(node.args[1], new_w)
            if b_param is not None:
                c_run.set_value(b_node, set_tensor(compressed, b_node.target, b_new))
            records.append(RefitRecord(wt, n_rows, before, after, True, damp=d_use, damp_from=damp_from))
        else:
            records.append(RefitRecord(wt, n_rows, before, before, False, "no improvement", d_use, damp_from))
    return records


#: Output columns (evenly spaced) on which the cross-validation of ``damp`` measures held-out error:
#: the choice of a grid value needs a sample of the outputs, not all of a 32k-wide vocabulary projection.
CV_OUTPUTS = 256
#: In a model whose blocks repeat, ops of the same role (weight name up to the block index) with at least
#: ``CV_SHARED_MIN_INPUTS`` inputs cross-validate ``damp`` in their first ``CV_PER_ROLE`` blocks; later
#: blocks use the median of those choices (each validation costs ``len(CV_GRID) x CV_FOLDS`` Cholesky
#: factorisations of a ``d_in``-square matrix: minutes per block at d_in = 4096 on 2 cores).
CV_PER_ROLE = 2
CV_SHARED_MIN_INPUTS = 1024


def weight_role(target: str) -> str:
    """``target`` with its block indices replaced by ``#`` (``layers.3.mlp.w`` -> ``layers.#.mlp.w``)."""
    return re.sub(r"(?<=[._])\d+(?=[._])", "#", target)


def input_key(node: fx.Node) -> tuple:
    """What determines a linear/conv op's input rows: ops with equal keys share input statistics."""
    if node.target is aten.conv2d.default:
        return (node.args[0], node.target, tuple(node.args[1].meta["val"].shape[2:]),
                *(str(_arg(node, i, d)) for i, d in ((3, 1), (4, 0), (5, 1))))
    return (node.args[0], node.target)


@dataclasses.dataclass
class _SharedInput:
    """Input-side fold statistics of one input of the compressed graph, and the ridge factorisations
    built on them, kept while some selected op still reads that input."""

    folds: list[Moments]
    factors: dict = dataclasses.field(default_factory=dict)
    _merged: Moments | None = None

    def merged(self) -> Moments:
        """The input-side moments of every row (the folds summed once)."""
        if self._merged is None:
            self._merged = merge(self.folds)
        return self._merged


def _release(shared: dict, readers: dict, key: tuple) -> None:
    """One selected reader of ``key`` is done: drop its statistics once no other one is left."""
    readers[key] -= 1
    if readers[key] <= 0:
        shared.pop(key, None)


def _input_folds(node: fx.Node, xs: Sequence[torch.Tensor], masks: Sequence[Any], n_folds: int) -> list[Moments]:
    """``n_folds`` input-side moments over every batch (split as :func:`add_to_folds` splits them)."""
    folds: list[Moments] = []
    for x, m in zip(xs, masks):
        add_to_folds(folds, input_rows(node, x, m), None, n_folds)
    return folds


def _rows_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    """``sum ||W x + b - y||^2`` over the rows of ``x`` (n, d_in) and ``y`` (n, d_out), in row chunks."""
    total = 0.0
    w32 = w.detach().float()
    b32 = None if b is None else b.detach().float()
    chunk = max(1, CHUNK_ELEMENTS // max(y.shape[1], 1))
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        total += sum_squares(torch.nn.functional.linear(xs.float(), w32, b32) - ys.float())
    return total


#: Elements per chunk when a float64 reduction walks a large activation (a 32k-vocabulary logit matrix
#: of 8k rows is 1 GiB in float32: reduced whole in float64 it would need twice that again).
CHUNK_ELEMENTS = 1 << 22


def sum_squares(t: torch.Tensor) -> float:
    """``sum t^2`` accumulated in float64, over bounded chunks of ``t``."""
    flat = t.detach().reshape(-1)
    return sum(float(c.double().square().sum()) for c in flat.split(CHUNK_ELEMENTS))


def _cv_columns(d_out: int) -> list[int] | None:
    if d_out <= CV_OUTPUTS:
        return None
    return sorted(set(np.linspace(0, d_out - 1, CV_OUTPUTS).round().astype(int).tolist()))
