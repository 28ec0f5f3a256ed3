"""Union-find over *atoms*: the removable units of a model's coupled dimensions.

Every index of every prunable tensor dimension carries an atom. Two atoms are unified when the two
indices must be removed together. An atom may instead stand for a *compound* (a tuple of atoms): that
is how a channel dimension split into ``(heads, head_dim)`` is described: flat channel ``c`` is removed
exactly when its head atom or its head-dim atom is removed. Atom ``FIXED`` (0) is never removed (and is dropped from compounds):
whatever is unified with it is kept.

Unifying two compounds of the same arity unifies their components position by position, which is
sufficient (never unsound) for removal to stay consistent on both sides; compounds of different arity,
or a compound unified with ``FIXED``, fix every component.
"""

from __future__ import annotations

import numpy as np

FIXED = 0


class AtomTable:
    """Atoms with union-find and compound decompositions."""

    def __init__(self) -> None:
        self._parent: list[int] = [FIXED]
        self._decomp: dict[int, tuple[int, ...]] = {}
        self._leaf_cache: dict[int, tuple[int, ...]] | None = None

    def __len__(self) -> int:
        return len(self._parent)

    def fresh(self, n: int) -> np.ndarray:
        """``n`` new independent atoms."""
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self._leaf_cache = None
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def compound(self, parts: tuple[int, ...]) -> int:
        """An atom removed exactly when one of ``parts`` is removed."""
        flat: list[int] = []
        for p in parts:
            r = self.find(int(p))
            flat.extend(self._decomp.get(r, (r,)))
        # a fixed part is never removed, so it does not decide anything: drop it
        live = [p for p in flat if self.find(p) != FIXED]
        if not live:
            return FIXED
        if len(live) == 1:
            return live[0]
        atom = int(self.fresh(1)[0])
        self._decomp[atom] = tuple(live)
        return atom

    def union(self, a: int, b: int) -> None:
        self._leaf_cache = None
        work = [(int(a), int(b))]
        while work:
            x, y = work.pop()
            rx, ry = self.find(x), self.find(y)
            if rx == ry:
                continue
            if ry == FIXED:
                rx, ry = ry, rx
            dx, dy = self._decomp.get(rx), self._decomp.get(ry)
            if rx == FIXED:
                self._parent[ry] = FIXED
                if dy is not None:
                    del self._decomp[ry]
                    work.extend((FIXED, p) for p in dy)
                continue
            if dx is not None and dy is not None:
                self._parent[rx] = ry
                del self._decomp[rx]
                if len(dx) == len(dy):
                    work.extend(zip(dx, dy))
                else:
                    work.extend((FIXED, p) for p in dx + dy)
            elif dx is not None:
                self._parent[ry] = rx  # the leaf becomes an alias of the compound
            else:
                self._parent[rx] = ry

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is b:
            return
        if a.shape != b.shape:
            raise ValueError(f"cannot unify label arrays of sizes {a.shape} and {b.shape}")
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.union(x, y)

    def fix(self, a: np.ndarray) -> None:
        for x in a.tolist():
            self.union(FIXED, x)

    def leaves(self, a: int) -> tuple[int, ...]:
        """The removable leaf atoms (roots) whose removal removes ``a``; ``()`` if ``a`` is fixed."""
        if self._leaf_cache is None:
            self._leaf_cache = {}
        r = self.find(a)
        cached = self._leaf_cache.get(r)
        if cached is not None:
            return cached
        d = self._decomp.get(r)
        if d is None:
            out: tuple[int, ...] = () if r == FIXED else (r,)
        else:
            seen: list[int] = []
            for p in d:
                for leaf in self.leaves(p):
                    if leaf not in seen:
                        seen.append(leaf)
            out = tuple(seen)
        self._leaf_cache[r] = out
        return out

    def components(self, a: int) -> tuple[int, ...]:
        """Root atoms of ``a``'s decomposition, by position (``(root,)`` for a leaf)."""
        r = self.find(a)
        d = self._decomp.get(r)
        if d is None:
            return (r,)
        out: list[int] = []
        for p in d:
            out.extend(self.components(p))
        return tuple(out)
