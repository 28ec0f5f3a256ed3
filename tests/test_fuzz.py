"""Property-based fuzz of structured pruning over random architectures (hypothesis).

Each example is a random CNN built from residual blocks, concatenations, ``chunk`` / ``split`` branches,
grouped and depthwise convolutions and multi-head attention over the spatial positions. Two properties:

1. **dead units go, and only they**: some units of every prunable group are planted dead (every weight
   that writes or reads them is zero; BatchNorm running statistics are left as training leaves them),
   exactly as many as ``ratio`` removes; pruning with a magnitude criterion removes those units and
   reproduces the output;
2. **pruning equals zeroing**: removing any units of any groups gives the output of the original model in
   which the same units' weights are zeroed.

``derandomize=True`` makes the examples the same in every run (CI); each takes about a second.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.graph.apply import prune, zeroed  # noqa: E402
from sparsecomp.passes.structured import n_keep  # noqa: E402
from sparsecomp.testing.verify import max_abs_diff, output_scale  # noqa: E402

EXAMPLES = 30
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
BLOCKS = ("conv", "grouped", "depthwise", "residual", "concat", "chunk", "split", "attention")


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # statistics as training leaves them: never zero
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = _bn(cout)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu(y) if self.act else y


class Block(nn.Module):
    """One random block; ``kind`` picks the wiring, ``widths`` the channel counts it creates."""

    def __init__(self, kind: str, c: int, widths: list[int]):
        super().__init__()
        self.kind = kind
        a, b = widths[0], widths[1]
        if kind == "conv":
            self.f = ConvBN(c, a, k=1 + 2 * (a % 2))
            self.out = a
        elif kind == "grouped":
            g = 2 if c % 2 == 0 else 1
            self.f = ConvBN(c, 2 * g * max(1, a // 4), groups=g)
            self.out = 2 * g * max(1, a // 4)
        elif kind == "depthwise":
            self.f = ConvBN(c, c, groups=c)
            self.out = c
        elif kind == "residual":
            self.f = nn.Sequential(ConvBN(c, a, k=1), ConvBN(a, c, act=False))
            self.out = c
        elif kind == "concat":
            self.f, self.g = ConvBN(c, a, k=1), ConvBN(c, b)
            self.out = a + b
        elif kind == "chunk":  # needs an even c: the builder makes sure
            self.f, self.g = ConvBN(c // 2, a), ConvBN(c // 2, b, k=1)
            self.out = a + b
        elif kind == "split":
            self.s = max(1, c // 3)
            self.f = ConvBN(self.s, a)
            self.out = a + c - self.s
        elif kind == "attention":
            heads, hd = 2, max(2, a // 2)
            self.heads, self.hd = heads, hd
            self.q, self.k, self.v = (nn.Linear(c, heads * hd) for _ in range(3))
            self.o = nn.Linear(heads * hd, c)
            self.out = c
        else:  # pragma: no cover
            raise ValueError(kind)

    def forward(self, x):
        k = self.kind
        if k in ("conv", "grouped", "depthwise"):
            return self.f(x)
        if k == "residual":
            return F.relu(x + self.f(x))
        if k == "concat":
            return torch.cat([self.f(x), self.g(x)], 1)
        if k == "chunk":
            p, q = x.chunk(2, dim=1)
            return torch.cat([self.f(p), self.g(q)], 1)
        if k == "split":
            p, q = torch.split(x, [self.s, x.shape[1] - self.s], dim=1)
            return torch.cat([q, self.f(p)], 1)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C)

        def heads(lin):
            return lin(t).reshape(b, h * w, self.heads, self.hd).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q), heads(self.k), heads(self.v))
        y = self.o(y.transpose(1, 2).reshape(b, h * w, self.heads * self.hd))
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class Net(nn.Module):
    def __init__(self, plan: list[tuple[str, list[int]]], stem: int):
        super().__init__()
        self.stem = ConvBN(3, stem)
        blocks, c = [], stem
        for kind, widths in plan:
            if kind == "chunk" and c % 2:
                kind = "concat"
            blk = Block(kind, c, widths)
            blocks.append(blk)
            c = blk.out
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean((2, 3)))


@st.composite
def nets(draw):
    plan = draw(st.lists(st.tuples(st.sampled_from(BLOCKS), st.lists(st.integers(2, 10), min_size=2, max_size=2)),
                         min_size=1, max_size=5))
    stem = draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)
    return Net(plan, stem).eval(), seed


def _inputs(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed)),)


def _plant_dead(model: nn.Module, dg, ratio: float, rng: np.random.Generator) -> set[int]:
    """Zero every weight index of ``n - n_keep(n, ratio)`` random units of every prunable group; BN
    running statistics keep their values. Returns the dead units."""
    dead: set[int] = set()
    for g in dg.prunable_groups():
        k = g.size - n_keep(g.size, ratio, 1)
        if not k:
            continue
        for _ in range(20):  # ``choose`` spares a unit whose removal would empty a weight dim: redraw
            drop = dg.choose(g, rng.random(g.size), k)
            if len(drop) == k:
                break
        assume(len(drop) == k)
        dead.update(drop)
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for target, idx in dg.param_keep_indices(dead).items():
            if target not in weights:
                continue  # a buffer (running mean / var): left alone
            t = weights[target]
            for d, keep in enumerate(idx):
                if keep is not None:
                    drop = np.setdiff1d(np.arange(t.shape[d]), keep)
                    t.index_fill_(d, torch.as_tensor(drop, dtype=torch.long), 0)
    return dead


@FUZZ
@given(nets(), st.sampled_from(["l1", "l2"]))
def test_magnitude_pruning_removes_exactly_the_dead_units(net, criterion):
    model, seed = net
    x = _inputs(seed)
    dg = sparsecomp.dependency_graph(model, x)
    ratio = 0.25
    dead = _plant_dead(model, dg, ratio, np.random.default_rng(seed))
    with torch.no_grad():
        want = model(*x)
    small = sparsecomp.compress(model, x, sparsecomp.StructuredPruning(ratio=ratio, criterion=criterion))
    expected = {}
    for target, idx in dg.param_keep_indices(dead).items():
        shape = list(dg.captured.module.get_parameter(target).shape) if target in dict(
            dg.captured.module.named_parameters()) else list(dg.captured.module.get_buffer(target).shape)
        expected[target] = tuple(len(k) if k is not None else shape[d] for d, k in enumerate(idx))
    got = {**dict(small.named_parameters()), **dict(small.named_buffers())}
    wrong = {t: (tuple(got[t].shape), s) for t, s in expected.items() if tuple(got[t].shape) != s}
    assert not wrong, f"removed live units instead of the dead ones (got, want): {wrong}"
    n_params = sum(p.numel() for p in small.parameters())
    assert not dead or n_params < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        out = small(*x)
    assert max_abs_diff(out, want) <= 1e-5 * output_scale(want)


@FUZZ
@given(nets(), st.floats(0.1, 0.9))
def test_pruning_any_units_equals_zeroing_them(net, fraction):
    model, seed = net
    x = _inputs(seed)
    dg = sparsecomp.dependency_graph(model, x)
    rng = np.random.default_rng(seed)
    removed: set[int] = set()
    for g in dg.prunable_groups():
        k = min(g.size - 1, max(1, int(fraction * g.size)))
        removed.update(dg.choose(g, rng.random(g.size), k))
    pruned = prune(dg, removed)  # re-exported: shapes checked by torch.export
    reference = zeroed(dg, removed)
    with torch.no_grad():
        want = reference(*x)
        got = pruned.module(*x)
    assert max_abs_diff(got, want) <= 1e-5 * output_scale(want), f"{len(removed)} units removed"
