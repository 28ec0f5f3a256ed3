"""Capture a model with ``torch.export`` into an ATen graph with parameters as named attributes.

The passes work on the *unlifted* graph module (``ExportedProgram.module()``): parameters and buffers are
``get_attr`` nodes named by their qualified names, so a pass can replace a weight by a smaller tensor and
edit the shape arguments of the ops that read it. The batch dimension (dim 0 of every tensor input) is
dynamic by default, so the compressed model runs at other batch sizes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings as _warnings
import dataclasses
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.utils import _pytree as pytree

from ..errors import CaptureError


@dataclasses.dataclass
class Captured:
    """A captured model.

    Attributes
    ----------
    module:
        The ATen-level ``torch.fx.GraphModule`` (parameters as ``get_attr`` nodes), owning copies of the
        weights: editing it never touches the user's model.
    exported:
        The ``ExportedProgram`` it came from.
    example_args, example_kwargs:
        The inputs used for capture (after batch widening, see ``capture``).
    dynamic_shapes:
        The dynamic-shape spec that was used (``None`` when static).
    """

    module: fx.GraphModule
    exported: ExportedProgram
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any

    @property
    def dynamic(self) -> bool:
        return self.dynamic_shapes is not None

    def run(self, module: torch.nn.Module | None = None) -> Any:
        """Run ``module`` (default: the captured graph) on the example inputs."""
        with torch.no_grad():
            return (module or self.module)(*self.example_args, **self.example_kwargs)

    def recapture(self, module: fx.GraphModule) -> "Captured":
        """Re-export an edited graph module with the same inputs and dynamic-shape spec.

        This refreshes every node's shape metadata and is the postcondition check of a rewriting
        pass: a graph whose shapes do not agree fails here, naming the node.
        """
        spec = _rebind_shapes(self.dynamic_shapes, self.example_args, self.example_kwargs)
        ep = _export(module, self.example_args, self.example_kwargs, spec)
        return Captured(ep.module(), ep, self.example_args, self.example_kwargs, self.dynamic_shapes)


def _export(model, args, kwargs, dynamic_shapes) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _rebind_shapes(spec, args, kwargs):
    """ShapesCollection is keyed by tensor identity, so rebuild it for the stored example inputs."""
    if spec is None or not isinstance(spec, _BatchSpec):
        return spec
    return spec.collection(args, kwargs)


@dataclasses.dataclass(frozen=True)
class _BatchSpec:
    """Dim 0 of every tensor input is one shared dynamic ``batch`` dimension."""

    def collection(self, args, kwargs) -> ShapesCollection:
        batch = Dim("batch", min=1, max=1 << 16)
        sc = ShapesCollection()
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                sc[leaf] = {0: batch}
        return sc


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for tracing and restore every submodule's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:  # not model.eval(): modules from ExportedProgram.module() refuse it
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _widen_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """A batch of 1 is specialised by ``torch.export``; trace with batch 2 (rows repeated) instead."""
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not leaves or any(t.dim() == 0 for t in leaves):
        return None
    sizes = {t.shape[0] for t in leaves}
    if sizes != {1}:
        return None
    widen = lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return pytree.tree_map(widen, args), pytree.tree_map(widen, kwargs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def capture(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: Any,
    example_kwargs: dict | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_shapes: Any = None,
) -> Captured:
    """Capture ``model`` as an ATen graph with ``torch.export``.

    Parameters
    ----------
    model:
        An ``nn.Module`` (traced in eval mode; its training flags are restored afterwards, and its
        weights are copied, never modified) or an ``ExportedProgram``.
    example_inputs:
        A tuple of positional inputs (a single tensor is accepted).
    example_kwargs:
        Keyword inputs.
    dynamic_batch:
        Make dim 0 of every tensor input a shared dynamic ``batch`` dimension. If the model does not
        allow it, capture falls back to static shapes with a warning.
    dynamic_shapes:
        A ``torch.export`` dynamic-shape spec (e.g. to also mark a sequence dimension dynamic); it
        replaces the default batch spec.

    Raises
    ------
    CaptureError
        When ``torch.export`` cannot capture the model; the message gives the reason and what to try.

    Examples
    --------
    >>> cap = capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> cap.module(torch.randn(5, 4)).shape
    torch.Size([5, 2])
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs)
    example_kwargs = dict(example_kwargs or {})

    if isinstance(model, ExportedProgram):
        gm = _deepcopy(model.module())
        return Captured(gm, model, example_inputs, example_kwargs, None)
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects an nn.Module or ExportedProgram, got {type(model).__name__}")

    name = type(model).__name__
    with _eval_mode(model):
        attempts: list[tuple[tuple, dict, Any]] = []
        if dynamic_shapes is not None:
            attempts.append((example_inputs, example_kwargs, dynamic_shapes))
        elif dynamic_batch:
            widened = _widen_batch(example_inputs, example_kwargs)
            a, k = widened if widened else (example_inputs, example_kwargs)
            attempts.append((a, k, _BatchSpec()))
        attempts.append((example_inputs, example_kwargs, None))

        errors: list[str] = []
        for i, (args, kwargs, spec) in enumerate(attempts):
            try:
                ep = _export(model, args, kwargs, _rebind_shapes(spec, args, kwargs))
            except Exception as exc:  # torch.export raises many types; we report its reason
                errors.append(_first_line(exc))
                if spec is not None and spec is dynamic_shapes:
                    raise CaptureError(
                        f"torch.export refused the dynamic_shapes given for {name}: {errors[-1]}"
                    ) from exc
                if spec is None:
                    raise CaptureError(
                        f"torch.export could not capture {name}: {errors[-1]}. "
                        "sparsecomp works on models that torch.export can trace: avoid data-dependent "
                        "Python control flow (use torch.cond), non-tensor outputs and in-place "
                        "mutation of inputs, or capture it yourself and pass the ExportedProgram."
                    ) from exc
                continue
            if i > 0 and errors:
                warnings.warn(
                    f"{name}: a dynamic batch dimension was refused by torch.export ({errors[0]}); "
                    "captured with static shapes, so the compressed model only accepts the example shapes.",
                    stacklevel=2,
                )
            gm = _deepcopy(ep.module())  # own the weights: later edits never reach the user's model
            return Captured(gm, ep, args, kwargs, spec)
    raise AssertionError("unreachable")  # pragma: no cover


def concrete_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The example-time shape of a tensor-valued node (symbolic sizes replaced by their hints)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(concrete_size(s) for s in val.shape)


def concrete_size(size: Any) -> int:
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        if hint is None:
            raise CaptureError(f"symbolic size {size} has no example value")
        return int(hint)
    return int(size)


def is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and not isinstance(size.node.maybe_as_int(), int)


def _deepcopy(obj):
    """``copy.deepcopy`` without torch's pytree deprecation noise (emitted while copying GraphModules)."""
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj)
