"""What every zoo builder shares: ZooEntry, batch helpers, norm randomisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

BuildResult = tuple[nn.Module, tuple, dict]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    ``build()`` returns ``(model.eval(), example_args, example_kwargs)`` with
    deterministic weights and example inputs (batch 2, except heavy entries).
    ``heavy`` entries are large (benchmark-sized) and skipped by the tests.
    """

    name: str
    family: str  # "cnn" or "transformer"
    build: Callable[[], BuildResult]
    heavy: bool = False


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
    return out


def batch_dynamic_shapes(args: tuple, kwargs: dict | None = None, name: str = "batch") -> torch.export.ShapesCollection:
    """A ``ShapesCollection`` marking dim 0 of every input tensor as one shared
    dynamic ``Dim(name)``.  Use as::

        ep = torch.export.export(model, args, kwargs,
                                 dynamic_shapes=batch_dynamic_shapes(args, kwargs),
                                 strict=False)
    """
    kwargs = kwargs or {}
    batch = torch.export.Dim(name)
    sc = torch.export.ShapesCollection()
    for t in _tensors(args, kwargs):
        if t.dim() == 0 or t.shape[0] < 2:
            # export 0/1-specialises size-1 dims, so Dim("batch") would raise a
            # ConstraintViolationError; say so up front.
            raise ValueError(
                f"cannot mark dim 0 dynamic on an input of shape {tuple(t.shape)}: example batch must be >= 2 "
                "(use with_batch(args, kwargs, 2) first)"
            )
        sc[t] = {0: batch}
    return sc


def with_batch(args: tuple, kwargs: dict | None, batch: int) -> tuple[tuple, dict]:
    """Return ``(args, kwargs)`` with every tensor's dim 0 resized to ``batch``
    by cycling (concatenating) the existing rows, e.g. rows [0, 1, 0] for
    batch 3 from batch 2.  Non-tensor leaves are left unchanged."""
    kwargs = kwargs or {}

    def resize(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        n = x.shape[0]
        reps = -(-batch // n)
        return torch.cat([x] * reps, dim=0)[:batch].clone()

    return torch.utils._pytree.tree_map(resize, (args, kwargs))


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    """Give every norm layer non-trivial affine params / running statistics
    (uses the current RNG state, so stays deterministic)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            if m.track_running_stats:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0.0, 0.1)
        elif type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor):
            m.weight.uniform_(0.5, 1.5)  # ours and HF's (LlamaRMSNorm, ...)


@torch.no_grad()
def seeded(make_model: Callable[[], nn.Module], make_inputs: Callable[[], tuple]) -> BuildResult:
    """A zoo model built the zoo's way: seed 0, ``make_model()``, its norms' affine parameters randomized,
    then ``make_inputs()`` (this order keeps weights and inputs bit-identical from call to call)."""
    torch.manual_seed(0)
    model = make_model()
    _randomize_norms(model)
    return model.eval(), make_inputs(), {}


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics to the batch statistics of one
    train-mode forward on ``x`` (affine params untouched), as a trained
    network's would be.  Keeps deep random-init nets numerically tame."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one step == batch statistics
    model.train()
    model(x)
    model.eval()
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
