"""The Slice pass (SliceGPT-style rotate-and-slice of the residual stream)."""

import pytest
import torch
from torch import nn

import sparsecomp
from sparsecomp.errors import ConfigError
from sparsecomp import PassError, Slice
from sparsecomp.config import config_from_dict
from sparsecomp.app.metrics import count_params
from sparsecomp.testing import bytelm, zoo

EXACT_MODELS = ["llama", "vit", "hf_llama", pytest.param("gpt", marks=pytest.mark.slow),
                pytest.param("hf_gpt2", marks=pytest.mark.slow)]


def _rel(a, b):
    a = a[0] if isinstance(a, (tuple, list)) else a
    b = b[0] if isinstance(b, (tuple, list)) else b
    return ((a - b).norm() / a.norm()).item()


def _count(op, gm):
    return sum(1 for n in gm.graph.nodes if n.target == op)


def test_config_validates_and_roundtrips():
    cfg = Slice(ratio=0.3, round_to=4, reconstruct=True)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(sparsecomp.ConfigError):
        Slice(ratio=1.0)
    with pytest.raises(sparsecomp.ConfigError):
        Slice(round_to=0)


@pytest.mark.parametrize("name", EXACT_MODELS)
def test_rotation_only_is_exact(name):
    model, args, kwargs = zoo.build(name)
    out = sparsecomp.compress(model, args, Slice(ratio=0.0), example_kwargs=kwargs)
    with torch.no_grad():
        assert _rel(model(*args, **kwargs), out(*args, **kwargs)) < 1e-4
    # the rotation is real: every skip matrix is a dense rotation, not the identity
    skips = [p for n, p in out.named_parameters() if n.startswith("_slice_skip")]
    assert skips and all(not torch.allclose(p, torch.eye(len(p)), atol=1e-3) for p in skips)


def test_trained_lm_exact_at_zero_and_sliced(bytelm_tiny):
    model = bytelm.Logits(bytelm_tiny).eval()
    ids = bytelm.calibration_batches(1, 64, batch=2, seed=7)[0][0]
    calib = bytelm.calibration_batches(8, 64, batch=4)
    base = bytelm.perplexity(model, seq_len=64, max_windows=32)
    rotated = sparsecomp.compress(model, (ids,), Slice(ratio=0.0), calibration=calib)
    sliced = sparsecomp.compress(model, (ids,), Slice(ratio=0.25), calibration=calib)
    with torch.no_grad():
        assert _rel(model(ids), rotated(ids)) < 1e-4
        assert sliced(ids).shape == model(ids).shape  # logits keep the vocabulary width
    d, k = bytelm.SIZES["tiny"].hidden, 48
    emb = [p for n, p in sliced.named_parameters() if p.shape[0] == bytelm.VOCAB]
    assert emb and all(p.shape[1] == k for p in emb)  # embedding and head are narrower
    lin = [n for n in sliced.graph.nodes if n.target == torch.ops.aten.linear.default]
    widths = {n.args[1].meta["val"].shape[1] for n in lin if n.args[1].meta["val"].shape[0] in (64, 32, 176)}
    assert k in widths and d not in {n.args[1].meta["val"].shape[1] for n in lin
                                     if n.args[1].meta["val"].shape[0] == 176}
    assert count_params(sliced) < count_params(model)
    assert bytelm.perplexity(sliced, seq_len=64, max_windows=32) < base * 1.05


# ------------------------------------------------------------------------------------ hand reference
class RMS(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class OneBlock(nn.Module):
    """Embedding -> x + W1 RMS1(x) -> head(RMS2(x)): two stream segments, one skip matrix."""

    def __init__(self, vocab=40, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.n1, self.w1 = RMS(d), nn.Linear(d, d, bias=False)
        self.n2, self.head = RMS(d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.w1(self.n1(x))
        return self.head(self.n2(x))


def _pca(n):
    rows = n.reshape(-1, n.shape[-1]).double()
    evals, evecs = torch.linalg.eigh(rows.T @ rows)
    return evecs[:, torch.argsort(evals, descending=True)]


def test_numerics_match_a_hand_computed_reference():
    torch.manual_seed(0)
    m = OneBlock().eval()
    ids = torch.randint(0, 40, (4, 12))
    out = sparsecomp.compress(m, (ids,), Slice(ratio=0.25, round_to=1), calibration=[(ids,)])
    d, k, eps = 16, 12, 1e-6
    E, W1, H = (t.detach().double() for t in (m.emb.weight, m.w1.weight, m.head.weight))
    g1, g2 = m.n1.weight.detach().double(), m.n2.weight.detach().double()
    rms = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    x0 = E[ids]
    q0 = _pca(rms(x0))
    s1 = x0 + (rms(x0) * g1) @ W1.T
    q1 = _pca(rms(s1))
    q0, q1 = q0[:, :k], q1[:, :k]
    # the sliced model, by hand: the norms still divide by the full width d
    rms_d = lambda x: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / d + eps)  # noqa: E731
    y0 = (E @ q0)[ids]
    y1 = y0 @ (q0.T @ q1) + rms_d(y0) @ (q1.T @ W1 @ torch.diag(g1) @ q0).T
    logits = rms_d(y1) @ (H @ torch.diag(g2) @ q1).T
    with torch.no_grad():
        got = out(ids)
    assert _rel(logits.float(), got) < 1e-5
    assert dict(out.named_parameters())["emb.weight"].shape == (40, k)
    assert _count(torch.ops.aten.linear.default, out) == 3  # w1, the skip matrix, the head


# --------------------------------------------------------------------------------------------- refusals
class GeluOnStream(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.emb = nn.Embedding(30, d)
        self.n1, self.w1 = RMS(d), nn.Linear(d, d)
        self.n2, self.head = RMS(d), nn.Linear(d, 30)

    def forward(self, ids):
        x = self.emb(ids)
        x = torch.nn.functional.gelu(x + self.w1(self.n1(x)))
        return self.head(self.n2(x))


class PostNorm(nn.Module):
    """BERT-shaped: embedding LayerNorm, then LN(r + f(r)) blocks."""

    def __init__(self, d=16, embedding_norm=True):
        super().__init__()
        self.emb = nn.Embedding(30, d)
        self.ln0 = nn.LayerNorm(d) if embedding_norm else nn.Identity()
        self.w1, self.ln1 = nn.Linear(d, d), nn.LayerNorm(d)
        self.w2, self.ln2 = nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, ids):
        x = self.ln0(self.emb(ids))
        x = self.ln1(x + self.w1(x))
        return self.ln2(x + self.w2(x))


def test_refuses_a_nonlinearity_on_the_stream():
    ids = torch.randint(0, 30, (2, 8))
    with pytest.raises(PassError, match=r"at node 'gelu'.*aten\.gelu"):
        sparsecomp.compress(GeluOnStream().eval(), (ids,), Slice(ratio=0.25), calibration=[(ids,)])


class NormTwice(PostNorm):
    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.w1(self.ln1(x))
        return self.ln2(self.ln1(x))


def test_post_norm_blocks_rotate_exactly():
    """BERT-style LN(r + f(r)): the skip matrices read the norm outputs and absorb their scale/shift."""
    torch.manual_seed(0)
    model, ids = PostNorm().eval(), torch.randint(0, 30, (2, 8))
    out = sparsecomp.compress(model, (ids,), Slice(ratio=0.0))
    with torch.no_grad():
        assert _rel(model(ids), out(ids)) < 1e-4
    assert _count(torch.ops.aten.layer_norm.default, out) == 0  # LayerNorms became RMS form (writers centred)


def test_refuses_a_linear_reading_an_unnormalised_layernorm_stream():
    ids = torch.randint(0, 30, (2, 8))
    with pytest.raises(PassError, match="at node 'linear'.*before any LayerNorm"):
        sparsecomp.compress(PostNorm(embedding_norm=False).eval(), (ids,), Slice(ratio=0.25, post_norm=True),
                            calibration=[(ids,)])


def test_refuses_a_norm_of_a_norm():
    ids = torch.randint(0, 30, (2, 8))
    with pytest.raises(PassError, match="normalised again directly"):
        sparsecomp.compress(NormTwice().eval(), (ids,), Slice(ratio=0.25), calibration=[(ids,)])


def test_composes_with_structured_pruning():
    model, args, kwargs = zoo.build("llama")
    out = sparsecomp.compress(model, args, [Slice(ratio=0.25), sparsecomp.StructuredPruning(ratio=0.25)],
                              calibration=[args])
    assert [r["pass"] for r in out.sparsecomp_report] == ["Slice", "StructuredPruning"]
    assert count_params(out) < count_params(model)


def test_post_norm_slicing_is_refused_unless_asked_for():
    """At ratio > 0 a post-norm stream is refused naming the block (measured worse than pruning); the
    rotation alone, and slicing with post_norm=True, go through."""
    torch.manual_seed(0)
    model, ids = PostNorm().eval(), torch.randint(0, 30, (2, 8))
    with pytest.raises(PassError, match=r"at node 'add.*post-norm block.*post_norm=True"):
        sparsecomp.compress(model, (ids,), Slice(ratio=0.25), calibration=[(ids,)])
    out = sparsecomp.compress(model, (ids,), Slice(ratio=0.25, post_norm=True), calibration=[(ids,)])
    assert count_params(out) < count_params(model)


def test_slicing_without_calibration_is_refused_but_rotation_is_not():
    model, args, kwargs = zoo.build("llama")
    with pytest.raises(ConfigError, match="Slice: ratio=0.25.*needs calibration data"):
        sparsecomp.compress(model, args, Slice(ratio=0.25), example_kwargs=kwargs)
    sparsecomp.compress(model, args, Slice(ratio=0.0), example_kwargs=kwargs)
