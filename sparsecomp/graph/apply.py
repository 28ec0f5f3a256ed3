"""Apply a removal decision to a captured graph: slice parameters, fix op arguments, re-export.

Also builds the *zeroed* twin of the original model (the removed units' weights set to zero) that the
equivalence check compares against: removing a group must compute exactly what zeroing it computes.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.fx as fx

from ..capture.export import Captured
from ..errors import PassError
from .attrs import owner_of, replace_tensor, shared_copy
from .context import RewriteContext
from .depgraph import DependencyGraph


class _TranslatingRewriteContext(RewriteContext):
    """Rewrite context for a copy of the analysed graph: looks labels up on the original nodes."""

    def __init__(self, base: RewriteContext, orig: dict[fx.Node, fx.Node]) -> None:
        super().__init__(base.ctx, base.removed)
        self._orig = orig

    def _o(self, n):
        return self._orig.get(n, n) if isinstance(n, fx.Node) else n

    def out(self, node):
        return super().out(self._o(node))

    def lab(self, arg):
        return super().lab(self._o(arg))

    def note(self, node, key):
        return super().note(self._o(node), key)


def _copy_with_map(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    new = shared_copy(gm)  # untouched weights stay shared; pruned ones are replaced, never written into
    by_name = {n.name: n for n in gm.graph.nodes}
    return new, {n: by_name[n.name] for n in new.graph.nodes}


def prune(dg: DependencyGraph, removed: Iterable[int], pass_name: str = "StructuredPruning",
          recapture: bool = True) -> Captured:
    """A new captured model in which the given units are physically removed.

    With ``recapture`` (the default) the edited graph's shape metadata is derived again
    (:meth:`Captured.recapture`), which checks that every op agrees on the new shapes; without it the
    edited module is returned with stale metadata (for quick checks, or for a caller that edits further
    and recaptures itself).
    """
    removed = set(removed)
    captured = dg.captured
    gm, orig = _copy_with_map(captured.module)
    if removed:
        rw = _TranslatingRewriteContext(dg.rewrite_context(removed), orig)
        for target, idx in dg.param_keep_indices(removed).items():
            owner, leaf = owner_of(gm, target)
            old = getattr(owner, leaf)
            new = old.detach()
            for d, keep in enumerate(idx):
                if keep is not None:
                    if len(keep) == 0:
                        raise PassError(pass_name, f"all of dim {d} of {target} would be removed")
                    new = new.index_select(d, torch.as_tensor(keep, dtype=torch.long))
            replace_tensor(owner, leaf, old, new.contiguous())
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            rule = dg.rules.get(node.target)
            if rule is not None and rule.rewrite is not None:
                rule.rewrite(node, rw)
        gm.recompile()
    if not recapture:
        return Captured(gm, None, captured.example_args, captured.example_kwargs,
                        captured.dynamic_shapes, list(captured.notes), captured.ranges)
    try:
        return captured.recapture(gm)
    except Exception as exc:
        raise PassError(pass_name, f"the pruned graph's shapes do not agree: {str(exc).splitlines()[0]}") from exc


def zeroed(dg: DependencyGraph, removed: Iterable[int]) -> fx.GraphModule:
    """A copy of the captured model with every parameter index owned by ``removed`` units set to zero."""
    gm, _ = _copy_with_map(dg.captured.module)
    for target, idx in dg.param_keep_indices(removed).items():
        owner, leaf = owner_of(gm, target)
        old = getattr(owner, leaf)
        new = old.detach().clone()
        for d, keep in enumerate(idx):
            if keep is not None:
                drop = np.setdiff1d(np.arange(new.shape[d]), keep)
                new.index_fill_(d, torch.as_tensor(drop, dtype=torch.long), 0)
        replace_tensor(owner, leaf, old, new)
    return gm
