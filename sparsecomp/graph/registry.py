"""The op-rule registry: all knowledge about ATen ops lives here, keyed by overload.

An ``OpRule`` has two halves:

* ``propagate(node, ctx) -> labels``: given the labels (atoms) of the node's inputs, unify whatever the op
  couples and return the labels of its output (one array or ``None`` per output dim; a list of those for
  ops returning several tensors). ``None`` means "not prunable" (fixed).
* ``rewrite(node, rw)`` (optional): after units were removed, fix the op's non-tensor arguments (shapes,
  split sizes, groups, indices) so the smaller graph is consistent.

An op without a rule is treated conservatively: every dim of its inputs is fixed and it is reported by
name. It is never assumed elementwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

PropagateFn = Callable[..., Any]
RewriteFn = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class OpRule:
    propagate: PropagateFn
    rewrite: RewriteFn | None = None


class OpRegistry:
    """A mapping from ATen overloads (or other call targets) to ``OpRule``s."""

    def __init__(self, entries: Mapping[Any, OpRule] | None = None) -> None:
        self._rules: dict[Any, OpRule] = {}
        for op, rule in (entries or {}).items():
            self.add(op, rule)

    def add(self, op: Any, rule: OpRule) -> None:
        if op in self._rules:
            raise KeyError(f"op {op} already has a rule")
        if not isinstance(rule, OpRule):
            raise TypeError(f"rule for {op} must be an OpRule, got {type(rule).__name__}")
        self._rules[op] = rule

    def register(self, *ops: Any, rewrite: RewriteFn | None = None) -> Callable[[PropagateFn], PropagateFn]:
        """Decorator: ``@registry.register(aten.relu.default, aten.gelu.default)``."""

        def deco(fn: PropagateFn) -> PropagateFn:
            for op in ops:
                self.add(op, OpRule(fn, rewrite))
            return fn

        return deco

    def get(self, op: Any) -> OpRule | None:
        return self._rules.get(op)

    def __getitem__(self, op: Any) -> OpRule:
        try:
            return self._rules[op]
        except KeyError:
            raise KeyError(f"no rule for {op}; registered: {sorted(map(str, self._rules))}") from None

    def __contains__(self, op: Any) -> bool:
        return op in self._rules

    def keys(self) -> Iterable[Any]:
        return self._rules.keys()

    def __len__(self) -> int:
        return len(self._rules)

    def items(self) -> Iterable[tuple[Any, OpRule]]:
        return self._rules.items()

    @classmethod
    def union(cls, *registries: "OpRegistry") -> "OpRegistry":
        """One registry holding the rules of all ``registries``; an op registered twice is an error."""
        merged = cls()
        for registry in registries:
            for op, rule in registry.items():
                merged.add(op, rule)
        return merged

    def with_overrides(self, extra: Mapping[Any, OpRule] | None) -> "OpRegistry":
        """A copy in which ``extra`` entries replace or add rules (user-supplied rules)."""
        merged = OpRegistry()
        merged._rules = dict(self._rules)
        for op, rule in (extra or {}).items():
            if not isinstance(rule, OpRule):
                raise TypeError(f"rule for {op} must be an OpRule, got {type(rule).__name__}")
            merged._rules[op] = rule
        return merged
