"""Write a compressed graph's result back onto the user's eager module.

The compressed ``GraphModule`` keeps every parameter and buffer under its original qualified name (see
``capture``), so the result of pruning (and of LowRank) can be put back into the module the user wrote:

1. every tensor the graph reads under a name the module also has replaces the module's tensor (values and
   shape; tied tensors stay tied while the graph keeps them equal);
2. a module whose weight the graph no longer reads, but which the graph computes as two thin ops of the
   same kind (LowRank's ``<weight>_lr_a`` / ``_lr_b``), becomes ``LowRankLinear`` / ``LowRankConv``;
3. ``MODULE_RULES`` (keyed by module class) recompute the sizes a module keeps as attributes;
4. the result is run on the example inputs against the graph; a difference beyond the tolerance raises
   ``VerificationError`` naming the modules that still hold an old size in an attribute (e.g. a
   hard-coded head count). A tensor the graph reads that the module cannot hold (a packed sparse weight,
   a new matrix) raises ``UnsupportedError`` naming it and the node that reads it.

Nothing is left half-done: with ``inplace=False`` (default) the module is deep-copied first; with
``inplace=True`` every change is undone before an error is raised.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import UnsupportedError, VerificationError
from ..graph.attrs import get_attr
from .modules import LowRankConv, LowRankLinear, rule_for

_LINEAR = torch.ops.aten.linear.default
_CONVS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
          torch.ops.aten.conv1d.padding, torch.ops.aten.conv2d.padding, torch.ops.aten.conv3d.padding,
          torch.ops.aten.convolution.default}

PASS = "write_back"


def _split(name: str) -> tuple[str, str]:
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


class _Editor:
    """Replaces tensors and submodules of ``root`` by name, keeping tied tensors tied; can undo it all."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self._undo: list[Callable[[], None]] = []
        self.aliases: dict[int, list[str]] = {}
        for name, t in list(root.named_parameters(remove_duplicate=False)) + list(
                root.named_buffers(remove_duplicate=False)):
            self.aliases.setdefault(id(t), []).append(name)

    def tensor(self, name: str) -> torch.Tensor | None:
        try:
            t = get_attr(self.root, name)
        except AttributeError:
            return None
        return t if isinstance(t, torch.Tensor) else None

    def set_tensor(self, name: str, value: torch.Tensor, *, tie: bool = True) -> None:
        """Put ``value`` at ``name`` (and at every name tied to the old tensor, when ``tie``)."""
        old = self.tensor(name)
        names = self.aliases.get(id(old), [name]) if tie and old is not None else [name]
        for n in names:
            prefix, leaf = _split(n)
            owner = self.root.get_submodule(prefix)
            before = owner._parameters.get(leaf, owner._buffers.get(leaf))
            if leaf in owner._parameters:
                req = owner._parameters[leaf].requires_grad if owner._parameters[leaf] is not None else False
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=req)
                new = owner._parameters[leaf]
                self._undo.append(lambda o=owner, l=leaf, b=before: o._parameters.__setitem__(l, b))
            else:
                owner._buffers[leaf] = value
                new = value
                self._undo.append(lambda o=owner, l=leaf, b=before: o._buffers.__setitem__(l, b))
            value = new  # aliases share the very same Parameter object

    def set_attr(self, module: nn.Module, attr: str, value: Any) -> None:
        before = getattr(module, attr)
        setattr(module, attr, value)
        self._undo.append(lambda: setattr(module, attr, before))

    def set_module(self, name: str, module: nn.Module) -> None:
        before = self.root.get_submodule(name)
        self.root.set_submodule(name, module)
        self._undo.append(lambda: self.root.set_submodule(name, before))

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()


def _graph_tensors(gm: fx.GraphModule) -> dict[str, tuple[torch.Tensor, list[fx.Node]]]:
    out: dict[str, tuple[torch.Tensor, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = get_attr(gm, node.target)
            if isinstance(t, torch.Tensor):
                out[node.target] = (t, list(node.users))
    return out


def _lowrank_pairs(gm: fx.GraphModule, missing: set[str]) -> dict[str, tuple[fx.Node, fx.Node]]:
    """``{module_name: (inner, outer)}`` for modules whose weight the graph computes as two thin ops."""
    pairs = {}
    for outer in gm.graph.nodes:
        if outer.op != "call_function" or (outer.target is not _LINEAR and outer.target not in _CONVS):
            continue
        inner = outer.args[0]
        if not isinstance(inner, fx.Node) or inner.target is not outer.target and not (
                outer.target in _CONVS and inner.target in _CONVS):
            continue
        w_in, w_out = inner.args[1], outer.args[1]
        if not all(isinstance(w, fx.Node) and w.op == "get_attr" for w in (w_in, w_out)):
            continue
        (p_in, _), (p_out, _) = _split(w_in.target), _split(w_out.target)
        if p_in == p_out and f"{p_in}.weight" in missing:
            pairs[p_in] = (inner, outer)
    return pairs


def _write_lowrank(ed: _Editor, name: str, inner: fx.Node, outer: fx.Node, gm: fx.GraphModule,
                   layout: dict) -> None:
    a, b = get_attr(gm, inner.args[1].target), get_attr(gm, outer.args[1].target)
    bias_node = outer.args[2] if len(outer.args) > 2 else outer.kwargs.get("bias")
    bias = None
    if isinstance(bias_node, fx.Node):
        bias = get_attr(gm, bias_node.target)
    old = ed.root.get_submodule(name)
    if outer.target is _LINEAR:
        if not isinstance(old, nn.Linear):
            raise UnsupportedError(f"write-back: {name} ({type(old).__name__}) is computed as two linears by "
                                   f"the graph (node {outer.name!r}), but it is not an nn.Linear")
        new = LowRankLinear(a.shape[1], a.shape[0], b.shape[0], bias is not None)
        new.weight_lr_a.data, new.weight_lr_b.data = a.detach().clone(), b.detach().clone()
        if bias is not None:
            new.bias.data = bias.detach().clone()
        layout[name] = {"kind": "lowrank_linear", "in": a.shape[1], "rank": a.shape[0], "out": b.shape[0],
                        "bias": bias is not None}
    else:
        if not isinstance(old, nn.modules.conv._ConvNd) or old.transposed or old.groups != 1:
            raise UnsupportedError(f"write-back: {name} ({type(old).__name__}) is computed as two convolutions "
                                   f"by the graph (node {outer.name!r}); only a plain nn.ConvNd can hold them")
        new = LowRankConv(old, a.detach().clone(), b.detach().clone(),
                          None if bias is None else bias.detach().clone())
        layout[name] = {"kind": "lowrank_conv", "a": list(a.shape), "b": list(b.shape), "bias": bias is not None}
    ed.set_module(name, new)


def _leaves(out: Any) -> list[torch.Tensor]:
    """Float tensors of a model output (an HF ``ModelOutput``'s cache objects are not compared)."""
    if hasattr(out, "to_tuple"):
        out = tuple(v for v in out.to_tuple() if isinstance(v, torch.Tensor))
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def write_back(model: nn.Module, compressed: fx.GraphModule, example_args: Any = (),
               example_kwargs: dict | None = None, *, inplace: bool = False, tol: float = 1e-4) -> nn.Module:
    """Apply ``compressed``'s weights (pruned, refit, low-rank) to ``model``; return the eager module.

    ``compressed`` is what :func:`sparsecomp.compress` returned for ``model``; ``example_args`` /
    ``example_kwargs`` are inputs both accept (the result is checked on them: every float output within
    ``tol`` of the graph's, relative to the output's largest magnitude). ``model`` is copied unless
    ``inplace``. The returned module carries ``sparsecomp_layout`` (per module, what changed), which
    :func:`sparsecomp.save_compressed` records so that :func:`sparsecomp.load_compressed` rebuilds it.
    """
    if not isinstance(compressed, fx.GraphModule):
        raise TypeError(f"write_back needs the GraphModule returned by sparsecomp.compress, got "
                        f"{type(compressed).__name__}")
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    root = model if inplace else copy.deepcopy(model)
    ed = _Editor(root)
    try:
        layout = _apply(ed, compressed)
        _verify(root, compressed, args, kwargs, tol, layout)
    except Exception:
        ed.undo()
        raise
    prev = getattr(root, "sparsecomp_layout", {}) or {}
    root.sparsecomp_layout = {**prev, **layout}
    return root


def _apply(ed: _Editor, gm: fx.GraphModule) -> dict:
    root = ed.root
    own = {n for names in ed.aliases.values() for n in names}
    graph = _graph_tensors(gm)
    missing = own - set(graph)
    pairs = _lowrank_pairs(gm, missing)
    lowrank_attrs = {n.args[1].target for pair in pairs.values() for n in pair}
    extra = [n for n in graph if n not in own and n not in lowrank_attrs]
    if extra:
        readers = sorted({u.name for n in extra for u in graph[n][1]})
        raise UnsupportedError(
            f"write-back: the compressed graph reads tensors the module has no place for: {extra[:6]}"
            f"{' ...' if len(extra) > 6 else ''} (read by {readers[:6]}); the module's code cannot compute "
            f"what those ops do (a packed sparse weight or a new matrix). Write back before Sparsify/Slice, "
            f"or deploy the graph itself (sparsecomp.lower / export_onnx)")
    layout: dict[str, dict] = {}
    touched: dict[str, nn.Module] = {}
    group_of = {n: names for names in ed.aliases.values() for n in names}
    done: set[str] = set()
    for name, (t, _) in graph.items():
        if name not in own or name in done:
            continue
        tied = group_of[name]
        # a tie holds while the graph reads equal tensors under every tied name
        keep_tie = all(n not in graph or graph[n][0] is t or torch.equal(graph[n][0], t) for n in tied)
        cur = ed.tensor(name)
        new = t.detach().clone().to(cur.dtype)
        resized = tuple(new.shape) != tuple(cur.shape)
        untied = not keep_tie and len(tied) > 1  # the graph refit one of two tied tensors: they part here
        names = tied if keep_tie else [name]
        done.update(names)
        for n in names:  # every alias is recorded, so that a reload resizes the tie as one
            prefix, leaf = _split(n)
            if resized:
                touched[prefix] = root.get_submodule(prefix)
            if resized or untied:
                entry = layout.setdefault(prefix, {"kind": "resized", "tensors": {}, "attrs": {}})
                entry["tensors"][leaf] = list(new.shape)
                if untied:
                    entry.setdefault("untied", []).append(leaf)
        ed.set_tensor(name, new, tie=keep_tie)
    for name, (inner, outer) in pairs.items():
        _write_lowrank(ed, name, inner, outer, gm, layout)
    for prefix, mod in touched.items():
        rule = rule_for(mod)
        if rule is None:
            continue
        for attr, value in rule(mod).items():
            if getattr(mod, attr) != value:
                ed.set_attr(mod, attr, value)
                layout[prefix]["attrs"][attr] = list(value) if isinstance(value, tuple) else value
    return layout


def _verify(root: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict, tol: float, layout: dict) -> None:
    with torch.no_grad():
        want = _leaves(gm(*args, **kwargs))
        try:
            got = _leaves(root(*args, **kwargs))
        except Exception as exc:
            raise VerificationError(PASS, f"the written-back module fails on the example inputs: "
                                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                          f"{_hint(root, layout)}") from exc
    if len(got) != len(want):
        raise VerificationError(PASS, f"the module returns {len(got)} tensors, the graph {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise VerificationError(PASS, f"output {i}: shape {tuple(g.shape)} != graph's {tuple(w.shape)}"
                                          f"{_hint(root, layout)}")
        if w.is_floating_point():
            scale = float(w.abs().max()) or 1.0
            err = float((g.double() - w.double()).abs().max()) / scale
            if err > tol:
                raise VerificationError(PASS, f"output {i} differs from the compressed graph by {err:.3g} "
                                              f"(relative to its largest magnitude; tolerance {tol})"
                                              f"{_hint(root, layout)}")
        elif not torch.equal(g, w):
            raise VerificationError(PASS, f"output {i} (integer) differs from the compressed graph")


_SIZE_WORDS = ("head", "dim", "size", "features", "channels", "width", "hidden", "groups")


def _hint(root: nn.Module, layout: dict) -> str:
    """Name the size-like integer attributes of the changed modules and their parents: one of them may be a
    size (e.g. a head count) that the module's forward reads and that write-back cannot know to update."""
    found = set()
    for name in layout:
        parts = name.split(".")
        for depth in range(len(parts), -1, -1):
            mod_name = ".".join(parts[:depth])
            mod = root.get_submodule(mod_name)
            rule = rule_for(mod)
            managed = set(rule(mod)) if rule is not None else set()
            for attr, v in vars(mod).items():
                if (not attr.startswith("_") and type(v) is int and v > 1 and attr not in managed
                        and any(w in attr for w in _SIZE_WORDS)):
                    found.add(f"{mod_name or '<root>'}.{attr}={v}")
    if not found:
        return ""
    return ("; size attributes of the changed modules that write-back has no rule for (one may be hard-coded "
            f"in forward): {sorted(found)[:8]}")
