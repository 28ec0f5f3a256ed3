"""Structured pruning on every zoo model: shapes kept, parameters drop, ratio 0 is the identity, every
group is exactly equivalent to zeroing it, and the compressed model runs at other batch sizes."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils import _pytree as pytree

import sparsecomp
from sparsecomp.testing import zoo
from sparsecomp.testing.verify import group_equivalence, max_abs_diff, output_scale

LIGHT = zoo.names(include_heavy=False)


@functools.lru_cache(maxsize=None)
def _captured(name):
    model, args, kwargs = zoo.build(name)
    return model, sparsecomp.capture(model, args, kwargs)


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


def _shapes(out):
    return [tuple(t.shape) for t in pytree.tree_leaves(out)]


@pytest.mark.parametrize("name", LIGHT)
def test_every_group_equals_zeroing_it(name):
    _, cap = _captured(name)
    dg = sparsecomp.dependency_graph(cap)
    groups = dg.prunable_groups()
    assert groups, f"{name}: nothing prunable found"
    for g in groups:
        res = group_equivalence(dg, g)
        assert res.relative < 1e-5, f"{name} group {g.id} ({g.kind}, {g.params[:3]}): {res}"


@pytest.mark.parametrize("name", LIGHT)
def test_ratio_zero_is_identity(name):
    model, cap = _captured(name)
    same = sparsecomp.compress(cap, None, sparsecomp.StructuredPruning(ratio=0.0))
    with torch.no_grad():
        got = same(*cap.example_args, **cap.example_kwargs)
        ref = cap.module(*cap.example_args, **cap.example_kwargs)
        eager = model(*cap.example_args, **cap.example_kwargs)
    for g, r in zip(pytree.tree_leaves(got), pytree.tree_leaves(ref)):
        assert torch.equal(g, r)
    assert max_abs_diff(got, eager) <= 1e-5 * output_scale(eager)
    assert _n_params(same) == _n_params(model)


@pytest.mark.parametrize("name", LIGHT)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_compress_shrinks_and_keeps_interface(name, ratio):
    model, cap = _captured(name)
    small = sparsecomp.compress(cap, None, sparsecomp.StructuredPruning(ratio=ratio))
    n0, n1 = _n_params(model), _n_params(small)
    assert n1 < n0
    if ratio == 0.5:
        assert 1 - n1 / n0 >= 0.35, f"{name}: ratio 0.5 removed only {1 - n1 / n0:.1%} of parameters"
    report = small.sparsecomp_report[0]
    assert report["modified"] and report["layers"], "the pruning rule did not fire"
    for batch in (2, 3):
        a, k = zoo.with_batch(cap.example_args, cap.example_kwargs, batch)
        with torch.no_grad():
            out, ref = small(*a, **k), model(*a, **k)
        assert _shapes(out) == _shapes(ref)
        assert all(torch.isfinite(t).all() for t in pytree.tree_leaves(out))


def test_user_model_is_not_modified():
    model, args, kwargs = zoo.build("resnet")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsecomp.compress(model, args, sparsecomp.StructuredPruning(ratio=0.5), example_kwargs=kwargs)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
