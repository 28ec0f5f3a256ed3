"""Every non-heavy zoo model runs eagerly, exports with a dynamic batch dim and
the exported program matches eager at batch 2 and batch 3."""

import pytest
import torch

from sparsecomp.testing import zoo

LIGHT = zoo.names(include_heavy=False)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("name", LIGHT)
def test_export_dynamic_batch_matches_eager(name):
    entry = zoo.get(name)
    model, args, kwargs = entry.build()
    assert not model.training
    assert entry.family in ("cnn", "transformer")
    for t in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor):
            assert t.shape[0] == 2
    assert zoo.count_params(model) < 2_000_000

    with torch.no_grad():
        ref2 = _as_tuple(model(*args, **kwargs))
    for t in ref2:
        assert isinstance(t, torch.Tensor) and t.shape[0] == 2 and torch.isfinite(t).all()

    ep = torch.export.export(
        model, args, kwargs, dynamic_shapes=zoo.batch_dynamic_shapes(args, kwargs), strict=False
    )
    gm = ep.module()
    for batch in (2, 3):
        a, k = zoo.with_batch(args, kwargs, batch)
        with torch.no_grad():
            ref = _as_tuple(model(*a, **k))
            out = _as_tuple(gm(*a, **k))
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            assert o.shape[0] == batch
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet", "gpt", "hf_llama"])
def test_build_is_deterministic(name):
    m1, a1, k1 = zoo.build(name)
    m2, a2, k2 = zoo.build(name)
    torch.testing.assert_close((a1, k1), (a2, k2), rtol=0, atol=0)
    torch.testing.assert_close(m1.state_dict(), m2.state_dict(), rtol=0, atol=0)


def test_get_unknown_raises_keyerror_listing_names():
    with pytest.raises(KeyError) as exc:
        zoo.get("nope")
    msg = str(exc.value)
    assert "nope" in msg
    for n in zoo.ZOO:
        assert n in msg


def test_registry():
    assert set(zoo.names()) == set(zoo.ZOO)
    assert "resnet50" in zoo.names("cnn")
    assert "resnet50" not in LIGHT
    assert zoo.get("resnet50").heavy
    assert set(zoo.names("cnn")) | set(zoo.names("transformer")) == set(zoo.ZOO)
    for n, e in zoo.ZOO.items():
        assert e.name == n
    with pytest.raises(Exception):
        zoo.get("resnet").name = "x"  # frozen


def test_batch_helpers():
    args = (torch.arange(4).view(2, 2),)
    kwargs = {"mask": torch.tensor([[1, 1], [1, 0]])}
    a3, k3 = zoo.with_batch(args, kwargs, 3)
    assert a3[0].tolist() == [[0, 1], [2, 3], [0, 1]]
    assert k3["mask"].tolist() == [[1, 1], [1, 0], [1, 1]]
    a1, _ = zoo.with_batch(args, kwargs, 1)
    assert a1[0].shape == (1, 2)
    assert len(zoo.batch_dynamic_shapes(args, kwargs)) == 2
    with pytest.raises(ValueError, match="batch must be >= 2"):
        zoo.batch_dynamic_shapes(a1, {})
