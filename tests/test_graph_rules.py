"""Targeted checks of the dependency graph: which groups exist, which are fixed, and that unknown ops are
handled conservatively and reported. Every positive case has a negative twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparsecomp
from sparsecomp.graph.registry import OpRegistry, OpRule
from sparsecomp.graph.rules import DEFAULT_RULES
from sparsecomp.testing.verify import group_equivalence

aten = torch.ops.aten


def _params_of_prunable(dg):
    return [set(g.params) for g in dg.prunable_groups()]


def test_mlp_hidden_is_one_group_and_output_is_fixed():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    dg = sparsecomp.dependency_graph(m, (torch.randn(2, 8),))
    groups = _params_of_prunable(dg)
    assert groups == [{"0.weight", "0.bias", "2.weight"}]
    # the output dim (2.weight dim 0, 2.bias) is part of the interface: in no prunable group
    assert not any("2.bias" in g for g in groups)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        return self.c(h + self.b(h))


def test_residual_add_couples_both_branches():
    dg = sparsecomp.dependency_graph(_Residual(), (torch.randn(2, 8),))
    (g,) = dg.prunable_groups()
    assert {"a.weight", "a.bias", "b.weight", "b.bias", "c.weight"} <= set(g.params)
    assert group_equivalence(dg, g).relative < 1e-6


class _ResidualFromInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        return self.c(x + self.a(x))


def test_residual_with_graph_input_is_fixed():
    dg = sparsecomp.dependency_graph(_ResidualFromInput(), (torch.randn(2, 8),))
    assert dg.prunable_groups() == []


class _Attn(nn.Module):
    """Hand-written attention with separate q/k/v; 4 heads of 8."""

    def __init__(self, gqa: bool = False):
        super().__init__()
        self.h, self.kvh, self.d = 4, (2 if gqa else 4), 8
        self.q = nn.Linear(32, 32)
        self.k = nn.Linear(32, self.kvh * 8)
        self.v = nn.Linear(32, self.kvh * 8)
        self.o = nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k = self.k(x).view(b, s, self.kvh, self.d).transpose(1, 2)
        v = self.v(x).view(b, s, self.kvh, self.d).transpose(1, 2)
        if self.kvh != self.h:
            k = k.repeat_interleave(self.h // self.kvh, dim=1)
            v = v.repeat_interleave(self.h // self.kvh, dim=1)
        att = (q @ k.transpose(-2, -1)) / 8 ** 0.5
        y = att.softmax(-1) @ v
        return self.o(y.transpose(1, 2).reshape(b, s, 32))


@pytest.mark.parametrize("gqa", [False, True])
def test_attention_heads_are_whole_and_gqa_mapping_kept(gqa):
    m = _Attn(gqa)
    x = torch.randn(2, 5, 32)
    dg = sparsecomp.dependency_graph(m, (x,))
    heads = [g for g in dg.prunable_groups() if g.kind == "head"]
    assert len(heads) == 1
    (g,) = heads
    assert g.size == m.kvh  # with GQA a unit is one kv head with its query heads
    q_member = next(mm for mm in g.members if mm.name == "q.weight")
    per_unit = {len(ix) for ix in q_member.index_map.values()}
    assert per_unit == {32 // m.kvh}
    assert group_equivalence(dg, g).relative < 1e-6
    small = sparsecomp.compress(m, (x,), sparsecomp.StructuredPruning(ratio=0.5, granularity="head"))
    assert small.q.weight.shape[0] == 16 and small.k.weight.shape[0] == m.kvh * 4
    assert small(torch.randn(3, 5, 32)).shape == (3, 5, 32)
    # head_dim is never pruned: nothing of kind "inner" is prunable
    assert all(gr.kind != "inner" for gr in dg.prunable_groups())


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y1, y2 = y.split([7, 3], dim=1)
        return self.c(torch.cat([y2, y1], dim=1))


def test_cat_and_split_index_maps():
    m = _Cat()
    x = torch.randn(2, 3, 4, 4)
    dg = sparsecomp.dependency_graph(m, (x,))
    for g in dg.prunable_groups():
        assert group_equivalence(dg, g).relative < 1e-6
    small = sparsecomp.compress(m, (x,), sparsecomp.StructuredPruning(ratio=0.5))
    assert small.c.weight.shape[1] < 10
    assert small(x).shape == m(x).shape


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids):
        h = torch.relu(self.fc(self.emb(ids)))
        return h @ self.emb.weight.t()  # weight sharing: the embedding is the output head too


def test_weight_sharing_couples_both_uses():
    m = _Shared()
    ids = torch.randint(0, 20, (2, 5))
    dg = sparsecomp.dependency_graph(m, (ids,))
    # emb.weight dim 1 feeds fc and is contracted against h: one group holds fc.weight dim 1, emb dim 1 ...
    for g in dg.prunable_groups():
        assert group_equivalence(dg, g).relative < 1e-6
    assert any("emb.weight" in g.params and "fc.weight" in g.params for g in dg.prunable_groups())


@torch.library.custom_op("sparsecomp_test::channel_shuffle", mutates_args=())
def _channel_shuffle(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1).clone()


@_channel_shuffle.register_fake
def _(x):
    return torch.empty_like(x)


class _Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)
        self.c = nn.Linear(8, 16)
        self.d = nn.Linear(16, 4)

    def forward(self, x):
        y = self.b(_channel_shuffle(self.a(x)))
        return y + self.d(torch.relu(self.c(x)))


def test_unknown_op_is_fixed_and_reported():
    m = _Unknown()
    x = torch.randn(2, 8)
    dg = sparsecomp.dependency_graph(m, (x,))
    assert "sparsecomp_test.channel_shuffle.default" in dg.unknown_ops
    assert "channel_shuffle" in dg.summary()
    prunable = _params_of_prunable(dg)
    assert not any("a.weight" in g for g in prunable)  # not pruned through the unknown op
    assert any("c.weight" in g for g in prunable)  # the negative twin is pruned
    small = sparsecomp.compress(m, (x,), sparsecomp.StructuredPruning(ratio=0.5))
    assert small.a.weight.shape == (16, 8) and small.c.weight.shape == (8, 8)
    torch.testing.assert_close(small(x).shape, m(x).shape)


def test_user_rule_can_declare_the_unknown_op_elementwise():
    from sparsecomp.graph.rules.common import _elementwise

    m = _Unknown()
    rules = {torch.ops.sparsecomp_test.channel_shuffle.default: OpRule(_elementwise)}
    dg = sparsecomp.dependency_graph(m, (torch.randn(2, 8),), rules=rules)
    assert not dg.unknown_ops
    assert any("a.weight" in g for g in _params_of_prunable(dg))


def test_wrong_rule_is_caught_by_equivalence_check():
    """A rule that forgets a coupling makes the zeroing check fail: the check can fail."""

    def linear_forgetting_bias(node, ctx):
        x, w = node.args[0], node.args[1]
        xl = list(ctx.lab(x))
        wl = ctx.lab(w)
        ctx.unify(xl[-1], wl[1])
        return xl[:-1] + [wl[0]]  # bias not coupled: it will keep entries of removed neurons

    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].bias.fill_(1.0)
    broken = DEFAULT_RULES.with_overrides({aten.linear.default: OpRule(linear_forgetting_bias)})
    dg = sparsecomp.dependency_graph(m, (torch.randn(2, 8),), rules=broken)
    (g,) = dg.prunable_groups()
    # the bias keeps 16 entries while the weight has fewer rows: the pruned graph is inconsistent, and
    # the shape propagation over the pruned graph (the pass's postcondition) names the mismatch
    from sparsecomp.errors import PassError
    from sparsecomp.graph.apply import prune

    removed = set(dg.choose(g, np.arange(g.size, dtype=float), g.size // 2))
    with pytest.raises(PassError, match="shapes do not agree"):
        prune(dg, removed)
    good = sparsecomp.dependency_graph(m, (torch.randn(2, 8),))
    assert group_equivalence(good, good.prunable_groups()[0]).relative < 1e-6  # the real rule: exact


def test_registry_rejects_duplicates_and_lists_keys():
    reg = OpRegistry()
    rule = OpRule(lambda n, c: None)
    reg.add(aten.relu.default, rule)
    with pytest.raises(KeyError, match="already has a rule"):
        reg.add(aten.relu.default, rule)
    with pytest.raises(KeyError, match="aten.relu.default"):
        reg[aten.gelu.default]
    with pytest.raises(TypeError):
        reg.add(aten.gelu.default, lambda n, c: None)


def test_to_networkx_components_are_groups():
    import networkx as nx

    dg = sparsecomp.dependency_graph(_Residual(), (torch.randn(2, 8),))
    g = dg.to_networkx()
    groups = [n for n in g.nodes if n[0] == "group"]
    assert len(groups) == len(dg.groups)
    comp = nx.node_connected_component(g, ("group", dg.prunable_groups()[0].id))
    assert ("param", "a.weight", 0) in comp and ("param", "c.weight", 1) in comp


class _EinsumBmmStack(nn.Module):
    """einsum, bmm, chunk and stack on channel dims, with a per-channel scale parameter."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 24) * 0.3)
        self.scale = nn.Parameter(torch.rand(12) + 0.5)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        h = torch.einsum("bsi,io->bso", x, self.w1)            # [b, s, 24]
        a, b = h.chunk(2, dim=-1)                               # two [b, s, 12]
        mixed = torch.bmm(a.transpose(1, 2), b)                 # [b, 12, 12]: contraction over s only
        pair = torch.stack([a, b], dim=0).sum(0) * self.scale   # [b, s, 12]
        y = pair + torch.bmm(pair, mixed.transpose(1, 2) * 0.01)
        return self.out(torch.relu(y))


def test_einsum_bmm_chunk_stack_groups_are_exact():
    m = _EinsumBmmStack()
    x = torch.randn(2, 6, 8)
    dg = sparsecomp.dependency_graph(m, (x,))
    groups = dg.prunable_groups()
    assert groups and not dg.unknown_ops
    assert any("w1" in g.params and "scale" in g.params for g in groups)
    for g in groups:
        assert group_equivalence(dg, g).relative < 1e-5
    small = sparsecomp.compress(m, (x,), sparsecomp.StructuredPruning(ratio=0.5))
    assert small.w1.shape[1] < 24 and small(torch.randn(3, 6, 8)).shape == (3, 6, 5)


def test_dynamic_sequence_length_prunes_and_runs_at_other_lengths():
    """Slices bounded by a symbolic length (position ids in HF BERT) must not break the rewrite."""
    import inspect

    from torch.export import Dim

    import sparsecomp
    from sparsecomp.testing import zoo

    model, args, kwargs = zoo.build("hf_bert")
    b, s = Dim("b", min=1, max=64), Dim("s", min=2, max=64)
    names = list(inspect.signature(model.forward).parameters)
    shapes = {names[i]: {0: b, 1: s} for i in range(len(args))}
    shapes.update({k: {0: b, 1: s} for k in kwargs})
    cap = sparsecomp.capture(model, args, kwargs, dynamic_shapes=shapes)
    small = sparsecomp.compress(cap, None, sparsecomp.StructuredPruning(ratio=0.5))
    assert small.sparsecomp_report[0]["modified"]
    dg = sparsecomp.dependency_graph(cap)
    for length in (5, 16):
        a = tuple(t[:, :length] for t in args)
        k = {n: t[:, :length] for n, t in kwargs.items()}
        with torch.no_grad():
            out = small(*a, **k)
            ref = model(*a, **k)
        assert out[0].shape == ref[0].shape
    # the pruned model equals the original with the same units zeroed, at another length too
    from sparsecomp.graph.apply import prune, zeroed

    removed = set()
    for g in dg.prunable_groups():
        removed.update(dg.choose(g, np.arange(g.size, dtype=float), g.size // 2))
    pruned, twin = prune(dg, removed).module, zeroed(dg, removed)
    a = tuple(t[:, :7] for t in args)
    k = {n: t[:, :7] for n, t in kwargs.items()}
    with torch.no_grad():
        torch.testing.assert_close(pruned(*a, **k)[0], twin(*a, **k)[0], rtol=1e-4, atol=1e-5)


def test_user_dynamic_shapes_that_export_refuses_raise():
    import pytest
    from torch.export import Dim

    import sparsecomp
    from sparsecomp.errors import CaptureError

    model = torch.nn.Linear(4, 4)
    with pytest.raises(CaptureError, match="dynamic_shapes"):
        sparsecomp.capture(model, (torch.randn(2, 4),), dynamic_shapes=({1: Dim("f")},))
