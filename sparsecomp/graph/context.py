"""The propagation context handed to op rules, and the rewrite context handed to their rewrites."""

from __future__ import annotations

import operator
from typing import Any, Iterable

import numpy as np
import torch
import torch.fx as fx

from ..capture.export import concrete_shape, is_symbolic
from .attrs import get_attr
from .labels import AtomTable

Dims = list  # list[np.ndarray | None], one entry per tensor dim


class Multi(list):
    """Labels of a node that returns several tensors (one ``Dims`` or ``None`` per output)."""


def _is_tensor_node(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)


class PropagationContext:
    """What a rule sees: labels of inputs, shapes, parameter dims, and union/fix helpers."""

    def __init__(self, gm: fx.GraphModule, options: dict[str, Any]) -> None:
        self.gm = gm
        self.atoms = AtomTable()
        self.options = options
        self.node_labels: dict[fx.Node, Any] = {}
        self.param_labels: dict[str, list[np.ndarray | None]] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.notes: dict[fx.Node, dict[str, Any]] = {}
        self.consumers: list[tuple[fx.Node, fx.Node, int, str, int]] = []
        self.unknown_ops: dict[str, list[str]] = {}
        self.kind_hints: list[tuple[np.ndarray, str]] = []

    # ----- shapes
    def shape(self, arg: fx.Node) -> tuple[int, ...]:
        shp = concrete_shape(arg)
        if shp is None:
            raise TypeError(f"node {arg.name} is not a tensor")
        return shp

    def symbolic_dims(self, arg: fx.Node) -> list[bool]:
        return [is_symbolic(s) for s in arg.meta["val"].shape]

    # ----- parameters
    def param_target(self, arg: Any) -> str | None:
        return arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else None

    def _ensure_param(self, target: str) -> list[np.ndarray | None]:
        if target not in self.param_labels:
            tensor = get_attr(self.gm, target)
            self.param_shapes[target] = tuple(tensor.shape)
            self.param_labels[target] = [None] * tensor.dim()
        return self.param_labels[target]

    def claim(self, arg: fx.Node, dim: int) -> np.ndarray:
        """The atoms of parameter dim ``dim`` (created on first use)."""
        target = self.param_target(arg)
        if target is None:
            raise TypeError(f"{arg.name} is not a parameter")
        dims = self._ensure_param(target)
        dim = dim % len(dims)
        if dims[dim] is None:
            dims[dim] = self.atoms.fresh(self.param_shapes[target][dim])
        return dims[dim]

    def fix_param_dim(self, arg: fx.Node, dim: int) -> None:
        self.fix(self.claim(arg, dim))

    # ----- labels
    def lab(self, arg: Any) -> Dims | None:
        """Labels of a tensor argument (``None`` for non-tensors). Parameters are claimed whole."""
        if not isinstance(arg, fx.Node):
            return None
        if arg.op == "get_attr":
            if not _is_tensor_node(arg):
                return None
            return [self.claim(arg, d) for d in range(arg.meta["val"].dim())]
        return self.node_labels.get(arg)

    def has_labels(self, arg: Any) -> bool:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return _is_tensor_node(arg)
        lab = self.lab(arg)
        if isinstance(lab, Multi):
            return any(x is not None and any(d is not None for d in x) for x in lab)
        return lab is not None and any(d is not None for d in lab)

    def unlabeled(self, node: fx.Node) -> Any:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return [None] * val.dim()
        if isinstance(val, (tuple, list)):
            return Multi([[None] * v.dim() if isinstance(v, torch.Tensor) else None for v in val])
        return None

    def fresh(self, n: int) -> np.ndarray:
        return self.atoms.fresh(n)

    def fixed(self, n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    def fix(self, arr: np.ndarray | None) -> None:
        if arr is not None:
            self.atoms.fix(arr)

    def fix_all(self, lab: Any) -> None:
        if lab is None:
            return
        if isinstance(lab, Multi):
            for x in lab:
                self.fix_all(x)
            return
        for d in lab:
            self.fix(d)

    def unify(self, a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        """Couple two dims index by index; an unlabeled side fixes the other. Returns the result."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            self.fix(a if b is None else b)
            return None
        self.atoms.union_arrays(a, b)
        return a

    def compound(self, *parts: np.ndarray) -> np.ndarray:
        """Per index, the compound of the given equally long arrays."""
        n = len(parts[0])
        return np.fromiter(
            (self.atoms.compound(tuple(int(p[i]) for p in parts)) for i in range(n)), dtype=np.int64, count=n
        )

    def hint_kind(self, arr: np.ndarray, kind: str) -> None:
        """Declare the group kind of these atoms (overrides the structural guess; see ``Group``)."""
        self.kind_hints.append((arr, kind))

    def note(self, node: fx.Node, key: str, value: Any) -> None:
        self.notes.setdefault(node, {})[key] = value

    def consumer(self, node: fx.Node, x: fx.Node, x_dim: int, weight: fx.Node, w_dim: int) -> None:
        """Record that ``node`` reduces input ``x`` along ``x_dim`` against ``weight`` dim ``w_dim``."""
        if self.param_target(weight) is not None and isinstance(x, fx.Node):
            self.consumers.append((node, x, x_dim, weight.target, w_dim))


def tensor_args(node: fx.Node) -> Iterable[fx.Node]:
    for a in node.all_input_nodes:
        if _is_tensor_node(a) or (a.op == "get_attr"):
            yield a


class RewriteContext:
    """What a rule's rewrite sees: kept counts and kept indices of every labeled dim."""

    def __init__(self, ctx: PropagationContext, removed: set[int]) -> None:
        self.ctx = ctx
        self.removed = removed
        self._keep_cache: dict[int, np.ndarray] = {}

    def keep_mask(self, arr: np.ndarray | None) -> np.ndarray | None:
        if arr is None:
            return None
        key = id(arr)
        hit = self._keep_cache.get(key)
        if hit is not None and len(hit) == len(arr):
            return hit
        leaves = self.ctx.atoms.leaves
        removed = self.removed
        mask = np.fromiter(
            (not any(l in removed for l in leaves(int(a))) for a in arr), dtype=bool, count=len(arr)
        )
        self._keep_cache[key] = mask
        return mask

    def count(self, arr: np.ndarray | None, default: Any) -> Any:
        if arr is None:
            return default
        return int(self.keep_mask(arr).sum())

    def kept_index(self, arr: np.ndarray) -> np.ndarray:
        return np.nonzero(self.keep_mask(arr))[0]

    def out(self, node: fx.Node) -> Any:
        return self.ctx.node_labels.get(node)

    def lab(self, arg: Any) -> Any:
        return self.ctx.lab(arg)

    def note(self, node: fx.Node, key: str) -> Any:
        return self.ctx.notes.get(node, {}).get(key)

    def new_shape(self, node: fx.Node, old: list[Any], labels: Dims | None = None) -> list[Any]:
        """``old`` shape argument of ``node`` with each labeled output dim replaced by its kept count."""
        labels = labels if labels is not None else self.out(node)
        new = list(old)
        if labels is None:
            return new
        for i, arr in enumerate(labels):
            if arr is not None and i < len(new):
                cnt = self.count(arr, None)
                if isinstance(new[i], int) and new[i] == -1 or cnt == len(arr):
                    continue
                if isinstance(new[i], fx.Node):
                    # a symbolic size whose labels repeat per batch entry: scale it by the kept fraction
                    with node.graph.inserting_before(node):
                        scaled = node.graph.call_function(operator.mul, (new[i], cnt))
                        new[i] = node.graph.call_function(operator.floordiv, (scaled, len(arr)))
                else:
                    new[i] = cnt
        return new


def getitem_labels(ctx: PropagationContext, node: fx.Node) -> Any:
    src, idx = node.args
    lab = ctx.node_labels.get(src)
    if isinstance(lab, Multi):
        return lab[idx]
    return ctx.unlabeled(node)


GETITEM = operator.getitem
