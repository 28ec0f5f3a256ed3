"""Slicing (SliceGPT): rotate the residual stream of a pre-norm transformer by PCA and delete its weakest
directions, derived from the ATen graph and the dependency graph.

Pipeline of the pass (each step keeps the model's function until step 5):

1. ``stream.prepare``: norms become weightless ``aten.rms_norm`` (scales and shifts folded into their
   readers), identity skip matrices on the residual adds, identity restore matrices on outputs that
   expose the stream, tied embeddings untied; re-export.
2. ``DependencyGraph.build(prune_norm_dims=True)``: each stretch of the stream between two skip matrices
   is one channel group (a *segment*). Its members are every parameter dim that lives in that space:
   embeddings, positional tables, class tokens, patch convs, the readers' input dims, the writers' output
   dims and biases, the skip and restore matrices. Every op whose output lives in a segment must be one
   that commutes with an orthogonal map (``EQUIVARIANT``); anything else is refused, naming the node.
3. Per segment, the calibration covariance of its normalised stream (the ``rms_norm`` outputs; padding
   rows skipped) gives ``Q`` (eigenvectors by decreasing eigenvalue). Segments read by a former
   LayerNorm are first made zero-mean (``C = I - 11^T/d`` on every writer), which turns the LayerNorm into
   an RMSNorm exactly.
4. Every member parameter dim is multiplied by ``C`` (writers of centred segments) and ``Q``: readers
   ``W Q``, writers ``Q^T W``, skip matrices become ``Q_a^T Q_b``, restore matrices ``Q^T``.
5. Slice: the last ``d - k`` directions of every segment are removed with ``graph.apply.prune`` (which
   also rewrites shape arguments), then each ``rms_norm`` is written back as ``x * rsqrt(mean(x^2)*k/d +
   eps)`` so that it still divides by the original width; re-export (the postcondition).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...calibration.data import _Observer, flat_batches, token_masks
from ...capture.export import Captured
from ...config import PassConfig, register_config
from ...errors import ConfigError, PassError
from ...graph.apply import prune
from ...graph.attrs import deepcopy, get_attr
from ...graph.depgraph import DependencyGraph, Group
from ...calibration.reconstruct import token_rows
from ..base import PassResult, register_pass
from . import stream
from .stream import PASS, READERS, _set_param, aten

#: ops that may produce a stream value: each commutes with a rotation of the hidden dim (given the
#: conditions checked in ``_check_equivariant``)
EQUIVARIANT = {
    aten.embedding.default, aten.linear.default, aten.addmm.default, aten.mm.default, aten.conv1d.default,
    aten.conv2d.default, aten.conv3d.default, aten.convolution.default, aten.add.Tensor, aten.sub.Tensor,
    aten.cat.default, aten.rms_norm.default, aten.neg.default, aten.mul.Tensor, aten.div.Tensor,
} | stream.ROW_OPS


@register_config
@dataclasses.dataclass(frozen=True)
class Slice(PassConfig):
    """Rotate a pre-norm transformer's residual stream by PCA and remove a fraction of its width.

    Parameters
    ----------
    ratio:
        Fraction of the hidden width to remove, in [0, 1). ``0`` only rotates (the function is unchanged).
    round_to:
        Keep a multiple of this many hidden dims (never fewer than ``round_to``).
    token_mask:
        Name of the input that marks real tokens (e.g. ``"attention_mask"``); padding rows do not enter
        the PCA. ``None``, or an input the model does not have: all rows count.
    damp:
        Added to the covariance diagonal, relative to its mean, before the eigendecomposition.
    reconstruct:
        After slicing, refit every linear of the sliced model by ridge least squares (cross-validated
        strength) so that its output matches the rotated, unsliced model's on the calibration data, in
        topological order on the sliced model's own activations (``reconstruct.sequential_refit``); a
        writer into the stream is fit to the kept coordinates of the rotated stream.
    residual:
        With ``reconstruct``: a writer into a residual add is fit to the unsliced sum minus the sliced
        residual, so it also absorbs the error left in the stream by earlier blocks.
    post_norm:
        Also slice post-norm blocks (BERT's ``LN(r + f(r))``). Off by default: at ``ratio > 0`` such a
        model is refused, naming the block, because slicing it measured worse than pruning at every speed
        on a real encoder (all-MiniLM-L6-v2, docs/BENCHMARKS.md). Rotation alone (``ratio=0``) is exact
        either way.

    Example
    -------
    >>> small = sparsecomp.compress(model, (ids,), sparsecomp.Slice(ratio=0.25), calibration=batches)  # doctest: +SKIP
    """

    type_name: ClassVar[str] = "Slice"

    ratio: float = 0.25
    round_to: int = 8
    token_mask: str | None = "attention_mask"
    damp: float = 0.0
    reconstruct: bool = False
    residual: bool = True
    post_norm: bool = False

    @property
    def needs_calibration(self) -> bool:
        """The rotation comes from calibration activations; at ratio 0 without a refit any basis is exact."""
        return self.ratio > 0 or self.reconstruct

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ConfigError(f"Slice.ratio must be in [0, 1), got {self.ratio!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"Slice.round_to must be a positive int, got {self.round_to!r}")
        if not isinstance(self.damp, (int, float)) or self.damp < 0:
            raise ConfigError(f"Slice.damp must be >= 0, got {self.damp!r}")
        object.__setattr__(self, "ratio", float(self.ratio))


def kept_width(d: int, ratio: float, round_to: int) -> int:
    k = d - int(math.floor(ratio * d + 1e-9))
    if round_to > 1:
        k = max(round_to, (k // round_to) * round_to)
    return min(d, max(1, k))


# ------------------------------------------------------------------------------------------- segments
@dataclasses.dataclass
class Segment:
    group: Group
    norms: list[fx.Node]  # rms_norm nodes reading this segment
    centered: bool
    basis_node: fx.Node | None = None  # where the PCA is taken when no norm reads the segment


def _node_group(dg: DependencyGraph) -> dict[tuple[str, int], Group]:
    out = {}
    for g in dg.groups:
        for m in g.members:
            out[(m.kind, m.name, m.dim)] = g
    return out


def _find_segments(dg: DependencyGraph, prep: stream.Prepared) -> list[Segment]:
    gm = dg.captured.module
    by_member = _node_group(dg)
    nodes = {n.name: n for n in gm.graph.nodes}
    segs: dict[int, Segment] = {}
    for n in gm.graph.nodes:
        if n.target != aten.rms_norm.default or int(n.args[1][0]) != prep.d:
            continue
        x = n.args[0]
        g = by_member.get(("op", x.name, x.meta["val"].dim() - 1))
        if g is None:
            raise PassError(PASS, "the stream read by this norm is not a removable group of the dependency "
                            f"graph (an op mixes its hidden dim or it reaches a graph input/output); unknown "
                            f"ops: {sorted(dg.ctx.unknown_ops) or 'none'}", n.name)
        seg = segs.setdefault(g.id, Segment(g, [], False))
        seg.norms.append(n)
        seg.centered |= prep.norm_kinds.get(n.name) == "layer"
    for target in prep.restores:
        g = by_member.get(("param", target, 1))
        if g is None:
            raise PassError(PASS, f"the stream returned as an output ({target}) is not a removable group")
        seg = segs.setdefault(g.id, Segment(g, [], False))
        if not seg.norms:
            user = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)
            seg.basis_node = next(iter(user.users)).args[0]
    for target in prep.skips:  # every skip matrix must join two segments
        for dim in (0, 1):
            if by_member.get(("param", target, dim)) is None:
                raise PassError(PASS, f"a residual branch ({target}, dim {dim}) is not a removable group")
            if by_member[("param", target, dim)].id not in segs:
                raise PassError(PASS, f"a stream segment (around skip {target}) is read by no norm")
    for seg in segs.values():
        _check_segment(dg, seg, nodes)
    _check_centering(gm, list(segs.values()))
    return list(segs.values())


def _check_centering(gm: fx.GraphModule, segs: list[Segment]) -> None:
    """A segment read by a (former) LayerNorm is made zero-mean, which is exact only if nothing but norms
    and skip matrices into other zero-mean segments reads it."""
    if not any(s.centered for s in segs):
        return
    if not all(s.centered for s in segs):
        raise PassError(PASS, "the stream is read by both LayerNorms and RMSNorms: a LayerNorm's mean "
                        "subtraction cannot be folded into writers that also feed an RMSNorm")
    members = {(m.name, m.dim) for s in segs for m in s.group.param_members()}
    for n in gm.graph.nodes:
        spec = READERS.get(n.target)
        if spec is None or not isinstance(n.args[spec[1]], fx.Node) or n.args[spec[1]].op != "get_attr":
            continue
        w = n.args[spec[1]].target
        if (w, spec[2]) not in members or w.startswith(stream.SKIP_PREFIX):
            continue
        src = n.args[spec[0]]
        while src.op == "call_function" and src.target in stream.ROW_OPS:
            src = src.args[0]
        if src.target != aten.rms_norm.default:
            raise PassError(PASS, "this linear reads the stream before any LayerNorm: the mean that the "
                            "LayerNorms remove cannot be folded into the writers", n.name)


def _check_segment(dg: DependencyGraph, seg: Segment, nodes: dict[str, fx.Node]) -> None:
    g = seg.group
    if g.kind != "channel":
        raise PassError(PASS, f"the stream's hidden dim is split into {g.kind}s somewhere "
                        f"(members {[m.name for m in g.members][:6]})")
    names = {(m.kind, m.name) for m in g.members}
    order = g.members[0].index_map
    for m in g.members:
        if any(len(ix) != 1 for ix in m.index_map.values()):
            raise PassError(PASS, "the stream's hidden dim is merged with another dim here", m.name)
        if m.index_map != order:
            raise PassError(PASS, "the stream's hidden dim is permuted here (one basis needs one order)", m.name)
        if m.kind != "op":
            continue
        node = nodes[m.name]
        reason = _not_equivariant(node, names)
        if reason:
            raise PassError(PASS, f"{node.target} on the residual stream: {reason}; the stream cannot be "
                            "rotated through it", node.name)


def _in_group(arg: Any, names: set[tuple[str, str]]) -> bool:
    if not isinstance(arg, fx.Node):
        return False
    return ("op", arg.name) in names or (arg.op == "get_attr" and ("param", arg.target) in names)


def _not_equivariant(node: fx.Node, names: set[tuple[str, str]]) -> str | None:
    """Why ``node``, whose output lives in a stream segment (members ``names``), does not commute with a
    rotation of that segment; ``None`` when it does."""
    if node.op != "call_function":
        return None
    t = node.target
    if t not in EQUIVARIANT:
        return "not an op known to commute with a rotation (a nonlinearity or a mixing op)"
    if t == aten.dropout.default and (node.args[2] if len(node.args) > 2 else node.kwargs.get("train")):
        return "dropout in training mode"
    if t in (aten.add.Tensor, aten.sub.Tensor):
        a, b = node.args[0], node.args[1]
        if not (_in_group(a, names) and _in_group(b, names)):
            return "adds a value that is not itself in the stream's space (a constant or broadcast bias)"
    if t in (aten.mul.Tensor, aten.div.Tensor):
        if not all(isinstance(a, (int, float)) for a in node.args[1:2]) or not isinstance(node.args[0], fx.Node):
            return "a per-channel or tensor scale (only scalar scales commute with a rotation)"
    return None


# ----------------------------------------------------------------------------------------------- PCA
def _covariances(dg: DependencyGraph, segs: list[Segment], cfg: Slice, calibration: Any) -> list[torch.Tensor]:
    captured = dg.captured
    gm = captured.module
    batches = flat_batches(calibration, captured)
    masks = token_masks(gm, batches, cfg.token_mask)
    watch: dict[fx.Node, int] = {}
    for i, s in enumerate(segs):
        for n in s.norms:
            watch[n] = i
        if s.basis_node is not None:
            watch[s.basis_node] = i
    covs: list[torch.Tensor | None] = [None] * len(segs)
    for b, mask in zip(batches, masks):
        def hook(node: fx.Node, value: Any, interp: Any) -> None:
            i = watch.get(node)
            if i is None:
                return
            rows = token_rows(value.detach(), mask).double()
            c = rows.T @ rows
            covs[i] = c if covs[i] is None else covs[i] + c

        _observe_flat(gm, b, hook)
    return covs


def _observe_flat(gm: fx.GraphModule, flat: list[Any], hook) -> None:
    with torch.no_grad():
        _Observer(gm, hook).run(*flat)


def _basis(cov: torch.Tensor, damp: float) -> torch.Tensor:
    if damp:
        cov = cov + damp * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)
    return evecs[:, torch.argsort(evals, descending=True)]


# ------------------------------------------------------------------------------------------- rotation
def _mode_product(t: torch.Tensor, dim: int, m: torch.Tensor) -> torch.Tensor:
    """``t`` with its dim ``dim`` multiplied by ``m``: ``out[.., j, ..] = sum_c t[.., c, ..] m[c, j]``."""
    moved = t.double().movedim(dim, -1)
    return (moved @ m).movedim(-1, dim).to(t.dtype)


def _reader_dims(gm: fx.GraphModule) -> set[tuple[str, int]]:
    """Parameter dims contracted by a matmul-like op (the readers' input dims)."""
    out = set()
    for n in gm.graph.nodes:
        spec = READERS.get(n.target)
        if spec is not None and isinstance(n.args[spec[1]], fx.Node) and n.args[spec[1]].op == "get_attr":
            out.add((n.args[spec[1]].target, spec[2]))
        if n.target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default):
            w = n.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr":
                out.add((w.target, 1))
    return out


def _rotate(dg: DependencyGraph, segs: list[Segment], bases: list[torch.Tensor]) -> None:
    gm = dg.captured.module
    readers = _reader_dims(gm)
    for seg, q in zip(segs, bases):
        d = len(q)
        center = torch.eye(d, dtype=torch.float64) - 1.0 / d
        for m in seg.group.param_members():
            t = get_attr(gm, m.name).detach()
            if seg.centered and (m.name, m.dim) not in readers:
                t = _mode_product(t, m.dim, center)
            _set_param(gm, m.name, _mode_product(t, m.dim, q))


def _removed_units(seg: Segment, k: int) -> list[int]:
    m = seg.group.members[0]
    return [u for u, ix in m.index_map.items() if ix[0] >= k]


def _drop_identities(gm: fx.GraphModule, prefixes: tuple[str, ...]) -> None:
    """Bypass inserted matrices that stayed the identity (nothing was rotated through them)."""
    for n in list(gm.graph.nodes):
        if n.target != aten.linear.default or len(n.args) != 2:
            continue
        w = n.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target.startswith(prefixes)):
            continue
        t = get_attr(gm, w.target)
        if t.shape[0] == t.shape[1] and torch.equal(t, torch.eye(t.shape[0], dtype=t.dtype)):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    stream.drop_unused_attrs(gm)
    gm.recompile()


@register_pass(Slice)
def run_slice(captured: Captured, cfg: Slice, calibration: Any = None) -> PassResult:
    gm = deepcopy(captured.module)
    prep = stream.prepare(gm, allow_post_norm=cfg.post_norm or cfg.ratio == 0)
    try:
        prepared = captured.recapture(prep.gm)
    except Exception as exc:
        raise PassError(PASS, f"the prepared graph's shapes do not agree: {str(exc).splitlines()[0]}") from exc
    # map the prepared norm kinds onto the rms_norm nodes of the prepared graph (same order)
    old = [n for n in prep.gm.graph.nodes if n.target == aten.rms_norm.default]
    new = [n for n in prepared.module.graph.nodes if n.target == aten.rms_norm.default]
    prep.norm_kinds = {b.name: prep.norm_kinds.get(a.name, "rms") for a, b in zip(old, new)}
    dg = DependencyGraph.build(prepared, prune_norm_dims=True)
    segs = _find_segments(dg, prep)
    covs = _covariances(dg, segs, cfg, calibration)
    bases = []
    for seg, cov in zip(segs, covs):
        if cov is None:
            raise PassError(PASS, f"no calibration rows reached stream segment {seg.group.id}")
        bases.append(_basis(cov, cfg.damp))
    _rotate(dg, segs, bases)
    d = prep.d
    k = kept_width(d, cfg.ratio, cfg.round_to)
    removed = [u for s in segs for u in _removed_units(s, k)]
    rms_d = {n.name: d for n in new}
    sliced = prune(dg, removed, PASS, recapture=False)
    gm2 = sliced.module
    stream.decompose_rms(gm2, rms_d)
    refits = []
    if cfg.reconstruct and removed:
        refits = _refit(dg, gm2, removed, cfg, calibration)
    _drop_identities(gm2, (stream.SKIP_PREFIX, stream.RESTORE_PREFIX))
    try:
        result = captured.recapture(gm2)
    except Exception as exc:
        raise PassError(PASS, f"the sliced graph's shapes do not agree: {str(exc).splitlines()[0]}") from exc
    report = [{"layer": f"segment {i}", "op": "stream", "before": d, "after": k,
               "norms": len(s.norms), "centered": s.centered} for i, s in enumerate(segs)]
    if refits:
        report.append({"reconstruction": [dataclasses.asdict(r) for r in refits]})
    return PassResult(result, True, report, PASS)


def _refit(dg: DependencyGraph, gm: fx.GraphModule, removed: list[int], cfg: Slice, calibration: Any) -> list:
    from ...calibration.reconstruct import refittable, sequential_refit

    batches = flat_batches(calibration, dg.captured)
    masks = token_masks(dg.captured.module, batches, cfg.token_mask)
    keep = dg.param_keep_indices(removed)
    out_keep = {t: idx[0] for t, idx in keep.items()}
    return sequential_refit(dg.captured.module, gm, batches, out_keep, lambda n: refittable(n) is None, masks,
                            damp="cv", residual=cfg.residual)
