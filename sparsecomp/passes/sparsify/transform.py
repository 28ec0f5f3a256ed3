"""Sparsify: prune individual weights of every ``linear`` and run it with a sparse operator where that pays.

Runs on a captured graph (after ``capture``, and after any earlier pass of a ``compress`` list). For each
``aten.linear`` whose weight ``W`` (``[out, in]``) is a parameter used by that op only:

1. **score** every weight: ``"magnitude"`` ``|W|``, or ``"wanda"`` ``|W| * ||X_col||_2`` with ``X`` the
   layer's inputs over the calibration batches (Wanda, Sun et al. 2023);
2. **mask** to the pattern: ``"unstructured"`` keeps the best ``in - floor(sparsity*in)`` weights of every
   output row; ``"block"`` scores ``(r, c)`` blocks by the sum of their scores and keeps the best blocks of
   every block row (``r`` output rows); ``"n:m"`` keeps the best ``n`` of every group of ``m`` consecutive
   inputs of every row. Both criteria use the same comparison groups, so they differ only by the score;
3. **decide** with :mod:`sparsecomp.passes.sparsify.cost_model` whether the sparse operator beats dense for this format,
   block, actual sparsity and rows per call (``batch_size`` x the other leading dims of the input);
4. **rewrite**: the masked weight is packed (``sparsecomp.ops.pack_csr`` / ``pack_bsr`` / ``pack_nm``) into
   buffers of the graph module (read by ``get_attr`` nodes) and the node becomes
   ``torch.ops.sparsecomp.sparse_linear_{csr,bsr,nm}``; otherwise the node stays ``aten.linear`` with the
   masked ("dense-with-zeros") weight. The graph is re-exported (the postcondition).

Per layer the report holds shapes, actual sparsity, format (or ``"dense-with-zeros"`` and why), rows per
call, MACs and weight bytes before/after, and, when the pass ran the model on calibration data (always for
``"wanda"``; for ``"magnitude"`` when calibration is given), the relative output error
``||X (W - W_masked)^T||_F / ||X W^T||_F`` of the layer on its (dense-model) inputs.

The sparse operators are inference kernels (no autograd); the packed tensors are buffers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.fx as fx

from . import cost_model
from ...calibration.data import iter_batches, observe
from ...capture.export import Captured
from ...config import PassConfig, check_choice, check_positive_int, is_int, is_number, name_patterns, register_config
from ...errors import ConfigError
from ...graph.attrs import add_tensor, deepcopy, get_attr, owner_of, replace_tensor
from ...ops import pack_bsr, pack_csr, pack_nm
from ..base import PassResult, register_pass
from ..candidates import drop_weight, finish, weighted_nodes
from ...target.latency import BACKENDS

PATTERNS = ("unstructured", "block", "n:m")
CRITERIA = ("magnitude", "wanda")
SPARSE_OPS = {
    "csr": torch.ops.sparsecomp.sparse_linear_csr.default,
    "bsr": torch.ops.sparsecomp.sparse_linear_bsr.default,
    "nm": torch.ops.sparsecomp.sparse_linear_nm.default,
}


@register_config
@dataclasses.dataclass(frozen=True)
class Sparsify(PassConfig):
    """Zero a fraction of every ``linear`` weight; store it compressed where a sparse kernel is faster.

    Parameters
    ----------
    sparsity:
        Fraction of weights zeroed in every layer, in [0, 1) (``"unstructured"`` and ``"block"``; for
        ``"block"`` the fraction of blocks). Omit it for ``"n:m"``, whose sparsity is ``1 - n/m``.
    pattern:
        ``"unstructured"`` (CSR), ``"block"`` (BSR with ``block`` = ``(r, c)``) or ``"n:m"`` (N:M along the
        input dim).
    block:
        ``(r, c)`` block shape for ``"block"``; must divide every sparsified weight's ``[out, in]``.
    n, m:
        Keep ``n`` of every ``m`` consecutive inputs (``"n:m"``); ``1 <= n < m <= 256``.
    criterion:
        ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W| * ||X_col||_2`` from calibration batches).
    ignore:
        Parameter or module-name patterns (fnmatch, or a module prefix) of layers to leave untouched.
    cost_model:
        ``"auto"`` (a layer uses the sparse operator only where :mod:`sparsecomp.passes.sparsify.cost_model` says it beats
        dense, else it is kept dense-with-zeros), ``"always"`` (sparse operator everywhere) or ``"never"``
        (dense-with-zeros everywhere: the accuracy of the pattern without the kernels).
    batch_size:
        Batch size the cost model assumes (the dynamic batch dim of the capture is set to it).
    backend, threads:
        Where the model will run (``"torch"``, ``"ort"`` or ``"tvm"``, with ``threads`` intra-op threads):
        the cost model uses the break-even table measured for it on this machine
        (:func:`sparsecomp.target.breakeven.measure_break_even`), else the documented ``BREAK_EVEN``; each
        layer's ``reason`` names the table used.

    Examples
    --------
    >>> Sparsify(sparsity=0.9, pattern="block", block=(16, 1), criterion="wanda")  # doctest: +SKIP
    >>> Sparsify(pattern="n:m", n=2, m=4, cost_model="always")  # doctest: +SKIP
    """

    type_name: ClassVar[str] = "Sparsify"

    sparsity: float | None = None
    pattern: str = "unstructured"
    block: tuple[int, int] = (16, 1)
    n: int = 2
    m: int = 4
    criterion: str = "magnitude"
    ignore: tuple[str, ...] = ()
    cost_model: str = "auto"
    batch_size: int = 1
    backend: str = "torch"
    threads: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "ignore", name_patterns("ignore", self.ignore))
        check_choice("pattern", self.pattern, PATTERNS)
        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("cost_model", self.cost_model, cost_model.POLICIES)
        check_positive_int("batch_size", self.batch_size)
        check_choice("backend", self.backend, BACKENDS)
        check_positive_int("threads", self.threads)
        block = self.block
        if not isinstance(block, (tuple, list)) or len(block) != 2 or not all(is_int(b) and b >= 1 for b in block):
            raise ConfigError(f"block must be a pair of positive integers (r, c), got {block!r}")
        object.__setattr__(self, "block", (int(block[0]), int(block[1])))
        if not (is_int(self.n) and is_int(self.m)) or not 1 <= self.n < self.m <= 256:
            raise ConfigError(f"n:m needs integers 1 <= n < m <= 256, got n={self.n!r}, m={self.m!r}")
        s = self.sparsity
        if self.pattern == "n:m":
            if s is not None and not (is_number(s) and math.isclose(s, 1 - self.n / self.m, abs_tol=1e-9)):
                raise ConfigError(
                    f"pattern 'n:m' fixes the sparsity at 1 - n/m = {1 - self.n / self.m:g}; "
                    f"omit sparsity (got {s!r})"
                )
        elif s is None:
            raise ConfigError(f"pattern {self.pattern!r} needs a sparsity in [0, 1)")
        elif not (is_number(s) and 0.0 <= s < 1.0):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {s!r}")

    @property
    def target_sparsity(self) -> float:
        """The configured fraction of zeros (``1 - n/m`` for ``"n:m"``)."""
        return 1 - self.n / self.m if self.pattern == "n:m" else float(self.sparsity)

    @property
    def needs_calibration(self) -> bool:
        return self.criterion == "wanda"

    @property
    def format(self) -> str:
        """Storage format of a sparse layer: ``"csr"``, ``"bsr"`` or ``"nm"``."""
        return {"unstructured": "csr", "block": "bsr", "n:m": "nm"}[self.pattern]


# ------------------------------------------------------------------------------------------------ masks
def scores(weight: torch.Tensor, criterion: str, col_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every weight (float64): ``|W|`` or Wanda's ``|W| * ||X_col||_2``.

    ``col_sq`` is ``sum_rows X[:, j]^2`` over the calibration inputs (needed for ``"wanda"``).
    """
    s = weight.detach().double().abs().cpu()
    if criterion == "wanda":
        if col_sq is None:
            raise ConfigError("criterion 'wanda' needs the layer's calibration inputs")
        s = s * col_sq.double().cpu().clamp_min(0).sqrt().unsqueeze(0)
    return s


def _keep_top(score: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Boolean mask keeping all but the ``n_drop`` lowest-scoring entries along the last dim."""
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop <= 0:
        return keep
    drop = torch.topk(score, n_drop, dim=-1, largest=False, sorted=False).indices
    return keep.scatter_(-1, drop, False)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the best ``in - floor(sparsity*in)`` entries of every row."""
    return _keep_top(score, int(math.floor(sparsity * score.shape[1] + 1e-9)))


def block_mask(score: torch.Tensor, sparsity: float, block: tuple[int, int]) -> torch.Tensor:
    """Keep the best ``(r, c)`` blocks (by summed score) of every block row; ``block`` must divide the shape."""
    out_f, in_f = score.shape
    r, c = block
    nbr, nbc = out_f // r, in_f // c
    bscore = score.reshape(nbr, r, nbc, c).sum(dim=(1, 3))
    keep = _keep_top(bscore, int(math.floor(sparsity * nbc + 1e-9)))
    return keep.reshape(nbr, 1, nbc, 1).expand(nbr, r, nbc, c).reshape(out_f, in_f)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the best ``n`` of every group of ``m`` consecutive inputs of every row."""
    out_f, in_f = score.shape
    return _keep_top(score.reshape(out_f, in_f // m, m), m - n).reshape(out_f, in_f)


def layer_mask(cfg: Sparsify, score: torch.Tensor) -> torch.Tensor:
    if cfg.pattern == "unstructured":
        return unstructured_mask(score, cfg.sparsity)
    if cfg.pattern == "block":
        return block_mask(score, cfg.sparsity, cfg.block)
    return nm_mask(score, cfg.n, cfg.m)


def _check_layer(cfg: Sparsify, layer: str, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    if cfg.pattern == "block":
        r, c = cfg.block
        bad = [f"out_features={out_f} is not a multiple of r={r}"] if out_f % r else []
        bad += [f"in_features={in_f} is not a multiple of c={c}"] if in_f % c else []
        if bad:
            raise ConfigError(
                f"Sparsify: block {cfg.block} does not divide the weight {layer!r} of shape {list(shape)} "
                f"({'; '.join(bad)}); choose another block or add the layer to ignore"
            )
    elif cfg.pattern == "n:m" and in_f % cfg.m:
        raise ConfigError(
            f"Sparsify: in_features={in_f} of {layer!r} is not a multiple of m={cfg.m} (n:m groups run "
            "along the input dim); choose another m or add the layer to ignore"
        )


# ------------------------------------------------------------------------------------------------ selection
def _candidates(gm: fx.GraphModule, cfg: Sparsify) -> tuple[list[fx.Node], list[dict]]:
    """Linear nodes to sparsify, and report rows for the ones left alone."""
    todo: list[fx.Node] = []
    skipped: list[dict] = []
    for c in weighted_nodes(gm, kinds=("linear",)):
        if c.param.dim() != 2:
            continue
        if c.ignored(cfg.ignore):
            skipped.append({**c.row(), "skipped": "ignored"})
        elif c.shared:
            skipped.append({**c.row(), "skipped": "weight shared with other ops"})
        else:
            _check_layer(cfg, c.target, tuple(c.param.shape))
            todo.append(c.node)
    return todo, skipped


def _grams(gm: fx.GraphModule, nodes: list[fx.Node], captured: Captured, calibration: Any) -> dict[str, torch.Tensor]:
    """``X^T X`` of each node's input over the calibration batches (summed in float64)."""
    want = {n.name: n.args[0] for n in nodes}
    grams: dict[str, torch.Tensor] = {}

    def hook(node: fx.Node, value: Any, interp: Any) -> None:
        x_node = want.get(node.name)
        if x_node is None:
            return
        x = interp.env[x_node].detach()
        x = x.reshape(-1, x.shape[-1]).float()
        g = (x.T @ x).double()  # float32 product (several times faster), float64 accumulation
        grams[node.name] = grams[node.name] + g if node.name in grams else g

    for args, kwargs in iter_batches(calibration, captured):
        observe(gm, args, kwargs, hook)
    return grams


def relative_output_error(weight: torch.Tensor, masked: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W - W_masked)^T||_F / ||X W^T||_F`` from the Gram matrix ``G = X^T X`` (``tr(D G D^T)``)."""
    w = weight.detach().float().cpu()
    d = w - masked.detach().float().cpu()
    g = gram.float().cpu()  # float32 products: a report figure, several times faster than float64
    num = float(((d @ g) * d).double().sum())
    den = float(((w @ g) * w).double().sum())
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return math.sqrt(max(num, 0.0) / den)


def _batch_symbols(graph: fx.Graph) -> set:
    """Symbols of the graph inputs' dim 0 (the batch dim every capture makes dynamic)."""
    out: set = set()
    for node in graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            out |= val.shape[0].node.expr.free_symbols
    return out


def _rows(node: fx.Node, batch_size: int) -> int:
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return batch_size
    return cost_model.rows_per_call(tuple(val.shape[:-1]), batch_size, _batch_symbols(node.graph))


def _pack(cfg: Sparsify, masked: torch.Tensor):
    if cfg.pattern == "unstructured":
        return pack_csr(masked)
    if cfg.pattern == "block":
        return pack_bsr(masked, cfg.block)
    return pack_nm(masked, cfg.n, cfg.m)


def _pattern_label(cfg: Sparsify) -> str:
    if cfg.pattern == "block":
        return f"block {cfg.block[0]}x{cfg.block[1]}"
    return f"{cfg.n}:{cfg.m}" if cfg.pattern == "n:m" else cfg.pattern


def _format_label(cfg: Sparsify) -> str:
    if cfg.pattern == "block":
        return f"bsr {cfg.block[0]}x{cfg.block[1]}"
    if cfg.pattern == "n:m":
        return f"nm {cfg.n}:{cfg.m}"
    return "csr"


def _rewrite_sparse(gm: fx.GraphModule, node: fx.Node, cfg: Sparsify, packed) -> None:
    """Replace ``linear(x, W, b)`` by the sparse operator reading ``packed``'s tensors as buffers beside ``W``."""
    if cfg.pattern == "n:m":
        tensors = {"values": packed.values, "indices": packed.indices}
    else:
        tensors = {"crow": packed.crow_indices, "col": packed.col_indices, "values": packed.values}
    targets = {key: add_tensor(gm, node.args[1].target, f"{cfg.format}_{key}", t.contiguous())
               for key, t in tensors.items()}
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    out_f, in_f = packed.shape
    with gm.graph.inserting_before(node):
        ga = {k: gm.graph.get_attr(t) for k, t in targets.items()}
        if cfg.pattern == "unstructured":
            args = (x, ga["crow"], ga["col"], ga["values"], bias, out_f, in_f)
        elif cfg.pattern == "block":
            args = (x, ga["crow"], ga["col"], ga["values"], bias, out_f, in_f, *cfg.block)
        else:
            args = (x, ga["values"], ga["indices"], bias, cfg.n, cfg.m, in_f)
        new = gm.graph.call_function(SPARSE_OPS[cfg.format], args)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


# ------------------------------------------------------------------------------------------------ the pass
@register_pass(Sparsify)
def run_sparsify(captured: Captured, cfg: Sparsify, calibration: Any = None) -> PassResult:
    gm = deepcopy(captured.module)
    todo, report = _candidates(gm, cfg)
    if not todo or cfg.target_sparsity == 0:
        return PassResult(captured, False, report, "Sparsify")
    observe_data = cfg.criterion == "wanda" or calibration is not None
    grams = _grams(gm, todo, captured, calibration) if observe_data else {}

    table, source = cost_model.table_for(cfg.backend, cfg.threads)
    modified = False
    for node in todo:
        w_node = node.args[1]
        weight = get_attr(gm, w_node.target)
        out_f, in_f = (int(s) for s in weight.shape)
        row: dict[str, Any] = {"layer": w_node.target, "node": node.name, "shape": [out_f, in_f]}
        gram = grams.get(node.name)
        if observe_data and gram is None:  # the node did not run on the calibration data
            report.append({**row, "skipped": "not reached by the calibration data"})
            continue
        col_sq = torch.diagonal(gram) if gram is not None else None
        mask = layer_mask(cfg, scores(weight, cfg.criterion, col_sq)).to(weight.device)
        masked = (weight.detach() * mask).contiguous()
        zeros = int((masked == 0).sum())
        sparsity = zeros / max(1, out_f * in_f)
        rows = _rows(node, cfg.batch_size)
        decision = cost_model.decide(cfg.format, sparsity, rows, block=cfg.block, n=cfg.n, m=cfg.m,
                                     policy=cfg.cost_model, table=table, source=source)
        packed = _pack(cfg, masked) if decision.sparse else None
        dense_bytes = out_f * in_f * weight.element_size()
        stored = packed.nnz if packed is not None else out_f * in_f
        row.update({
            "pattern": _pattern_label(cfg),
            "criterion": cfg.criterion,
            "sparsity": sparsity,
            "format": _format_label(cfg) if decision.sparse else "dense-with-zeros",
            "reason": decision.reason,
            "rows": rows,
            "params_before": out_f * in_f,
            "params_after": stored,
            **cost_model.estimate(out_f, in_f, rows, stored, dense_bytes,
                                  packed.nbytes if packed is not None else dense_bytes, decision.sparse),
        })
        if gram is not None:
            row["relative_error"] = relative_output_error(weight, masked, gram)

        if packed is None:
            replace_tensor(*owner_of(gm, w_node.target), weight, masked)
        else:
            _rewrite_sparse(gm, node, cfg, packed)
            drop_weight(gm, w_node)
        modified = True
        report.append(row)

    return finish(captured, gm, report, modified, "Sparsify")
