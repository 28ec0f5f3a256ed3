"""Capture a model with ``torch.export`` into an ATen graph with parameters as named attributes.

The passes work on the *unlifted* graph module (``ExportedProgram.module()``): parameters and buffers are
``get_attr`` nodes named by their qualified names, so a pass can replace a weight by a smaller tensor and
edit the shape arguments of the ops that read it. Every dim of every tensor input is captured dynamic where
the model allows it (``torch.export``'s ``Dim.AUTO``), so the compressed model runs at other batch sizes,
sequence lengths and image sizes; dims the model pins stay static, and a call outside what was captured
raises :class:`~sparsecomp.errors.ShapeError` naming the input and dim.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.utils import _pytree as pytree

from ..errors import CaptureError, ShapeError


@dataclasses.dataclass
class Captured:
    """A captured model.

    Attributes
    ----------
    module:
        The ATen-level ``torch.fx.GraphModule`` (parameters as ``get_attr`` nodes). It shares the weight
        tensors of the captured model (no copy: a 1B-parameter model is not held twice); every pass
        *replaces* the tensors it changes and never writes into one, so compressing never changes the
        user's model. Writing into ``module``'s tensors yourself writes into the model's.
    program:
        The ``ExportedProgram`` of ``module``, or ``None`` after a pass edited the graph (passes refresh
        shape metadata without re-exporting, see :meth:`recapture`); read :attr:`exported`, which exports
        on first use.
    example_args, example_kwargs:
        The inputs used for capture (after batch widening, see ``capture``).
    dynamic_shapes:
        The dynamic-shape spec that was used (``None`` when static).
    notes:
        What capture did that the user did not ask for (e.g. ``use_cache=False`` for a Hugging Face
        model, dims that stayed static); passes copy them into the report.
    """

    module: fx.GraphModule
    program: ExportedProgram | None
    example_args: tuple
    example_kwargs: dict
    dynamic_shapes: Any
    notes: list = dataclasses.field(default_factory=list)
    ranges: dict = dataclasses.field(default_factory=dict)  # input symbol -> (lo, hi), for the shape check

    @property
    def exported(self) -> ExportedProgram:
        """The ``ExportedProgram`` of :attr:`module` (exported now if a pass edited the graph since)."""
        if self.program is None:
            spec = _rebind_shapes(self.dynamic_shapes, self.example_args, self.example_kwargs)
            try:
                self.program = _export(self.module, self.example_args, self.example_kwargs, spec)
            except Exception as exc:
                raise CaptureError(f"the compressed graph does not re-export: {_first_line(exc)}") from exc
        return self.program

    @property
    def dynamic(self) -> bool:
        """Whether any input dim was captured dynamic."""
        return any(isinstance(s, str) for _, dims in self.input_dims() for s in dims)

    def run(self, module: torch.nn.Module | None = None) -> Any:
        """Run ``module`` (default: the captured graph) on the example inputs."""
        with torch.no_grad():
            return (module or self.module)(*self.example_args, **self.example_kwargs)

    def recapture(self, module: fx.GraphModule) -> "Captured":
        """The captured model after a pass edited the graph ``module`` (in place or a copy).

        Every node's shape metadata is derived again by propagating the captured (symbolic) input shapes
        through the edited graph with fake tensors: this is the postcondition check of a rewriting pass
        (a graph whose shapes do not agree fails here, naming the node), at a fraction of the cost of a
        ``torch.export`` (which happens once, when a backend asks for :attr:`exported`). Dead nodes and
        tensors no op reads any more are dropped; the shape check in front of the module stays.
        """
        refresh_shapes(module)
        _drop_unused_tensors(module)
        _guarded(module, self.ranges)
        return Captured(module, None, self.example_args, self.example_kwargs, self.dynamic_shapes,
                        list(self.notes), self.ranges)

    def input_dims(self) -> list[tuple[str, tuple]]:
        """Per user input: its name and, per dim, the captured size (an int when static, the symbol's
        name when dynamic)."""
        return [(n.name, tuple(str(s) if is_symbolic(s) else int(s) for s in n.meta["val"].shape))
                for n in self.module.graph.nodes if n.op == "placeholder"
                and isinstance(n.meta.get("val"), torch.Tensor)]


def _export(model, args, kwargs, dynamic_shapes) -> ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _rebind_shapes(spec, args, kwargs):
    """ShapesCollection is keyed by tensor identity, so rebuild it for the stored example inputs."""
    if spec is None or not isinstance(spec, (_BatchSpec, _AutoSpec)):
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


@dataclasses.dataclass(frozen=True)
class _AutoSpec:
    """Every dim of every tensor input is ``Dim.AUTO``: dynamic unless the model pins it (then static)."""

    def collection(self, args, kwargs) -> ShapesCollection:
        sc = ShapesCollection()
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                sc[leaf] = {d: Dim.AUTO for d in range(leaf.dim())}
        return sc


def _input_ranges(ep: ExportedProgram) -> dict:
    """Per input symbol of ``ep``, the ``(lo, hi)`` sizes it was captured for (``None``: unbounded)."""
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        lo = int(vr.lower) if vr.lower.is_Integer and int(vr.lower) > 2 else None  # 0/1: a trace-time
        # assumption of torch.export, not a limit of the graph (torch accepts size 1 there too)
        hi = int(vr.upper) if vr.upper.is_Integer else None
        ranges[sym] = (lo, hi)
    return ranges


def _guarded(gm: fx.GraphModule, ranges: dict) -> fx.GraphModule:
    """Put the shape check in front of ``gm`` (a call at a shape outside what was captured raises
    :class:`ShapeError` naming the input, the dim and what it was captured as) unless it has it already
    (copies of a GraphModule lose their hooks: call again)."""
    for hook in gm._forward_pre_hooks.values():
        if isinstance(hook, functools.partial) and hook.func is _check_input_shapes:
            return gm
    gm.register_forward_pre_hook(functools.partial(_check_input_shapes, ranges=ranges), prepend=True,
                                 with_kwargs=True)
    return gm


class _ShapeProp(fx.Interpreter):
    """Fake-tensor propagation that reads parameters as fake tensors of their real shapes."""

    def __init__(self, gm: fx.GraphModule, mode: Any) -> None:
        super().__init__(gm)
        self.mode = mode

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "get_attr":
            real = super().run_node(n)
            if not isinstance(real, torch.Tensor):
                return real
            fake = self.mode.from_tensor(real, static_shapes=True)
            n.meta["val"] = _snapshot(fake)
            return fake
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise CaptureError(f"node {n.name} ({n.target}) does not accept its new input shapes: "
                               f"{_first_line(exc)}") from exc
        if n.op != "output":
            val = pytree.tree_map(lambda v: _snapshot(v), result)
            if val is not None:
                n.meta["val"] = val
        return result


def _snapshot(v: Any) -> Any:
    from torch.fx.experimental.proxy_tensor import snapshot_fake

    if isinstance(v, torch._subclasses.FakeTensor):
        return snapshot_fake(v)
    return v if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)) else None


def refresh_shapes(gm: fx.GraphModule) -> None:
    """Derive every node's ``meta["val"]`` again from the placeholders' (symbolic) fake values.

    Raises :class:`CaptureError` naming the first node whose op rejects its inputs' shapes.
    """
    values = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = next((v.fake_mode for v in values if isinstance(v, torch._subclasses.FakeTensor)), None)
    if mode is None:  # no symbolic inputs recorded (a hand-built graph): nothing to propagate from
        return
    with mode, torch.no_grad():
        _ShapeProp(gm, mode).run(*values)


def _drop_unused_tensors(gm: fx.GraphModule) -> None:
    """Remove dead nodes, then parameters and buffers that no ``get_attr`` node reads (a pass replaced
    them): the module holds what its graph uses, as a fresh export would."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    for name, _ in named:
        if name in used:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if hasattr(owner, leaf):
            delattr(owner, leaf)
    gm.recompile()


def _placeholder_dims(gm: fx.GraphModule) -> list[tuple[str, tuple]]:
    return [(n.name, tuple(n.meta["val"].shape)) for n in gm.graph.nodes if n.op == "placeholder"
            and isinstance(n.meta.get("val"), torch.Tensor)]


def _check_input_shapes(module: fx.GraphModule, args: tuple, kwargs: dict, ranges: dict) -> None:
    from torch.fx import _pytree as fx_pytree

    info = getattr(module.graph._codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return None
    try:
        flat = fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec)
    except Exception:  # a different input structure: torch's own check reports it
        return None
    nodes = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(flat) != len(nodes):
        return None
    seen: dict[Any, tuple[str, int, int]] = {}
    for node, value in zip(nodes, flat):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        if isinstance(value, torch._subclasses.FakeTensor) or any(isinstance(s, torch.SymInt) for s in value.shape):
            return None  # being traced (re-export): torch.export checks shapes itself
        if value.dim() != val.dim():
            raise ShapeError(f"input {node.name!r} has {value.dim()} dims; the model was captured with "
                             f"{val.dim()} (shape {_show(val.shape)})")
        for d, (want, got) in enumerate(zip(val.shape, value.shape)):
            if isinstance(want, int) or not is_symbolic(want):
                if int(want) != got:
                    raise ShapeError(
                        f"input {node.name!r} dim {d} is {got}, but the model was captured with this dim "
                        f"static at {int(want)} (captured shape {_show(val.shape)}): the model, or "
                        "torch.export, pinned it. Call it at that size, or capture again with an example "
                        "of the size you need.")
                continue
            expr = want.node.expr
            if len(expr.free_symbols) == 1 and expr.is_Symbol:
                if expr in seen and seen[expr][2] != got:
                    other, od, osize = seen[expr]
                    raise ShapeError(
                        f"input {node.name!r} dim {d} is {got} but input {other!r} dim {od} is {osize}; "
                        f"the model was captured with the two equal (captured shape {_show(val.shape)})")
                seen.setdefault(expr, (node.name, d, got))
                lo, hi = ranges.get(expr, (None, None))
                if (lo is not None and got < lo) or (hi is not None and got > hi):
                    raise ShapeError(f"input {node.name!r} dim {d} is {got}, outside the range "
                                     f"[{lo}, {'inf' if hi is None else hi}] it was captured for "
                                     f"(captured shape {_show(val.shape)})")
    return None


def _show(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


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
    dynamic_dims: bool = True,
) -> Captured:
    """Capture ``model`` as an ATen graph with ``torch.export``.

    Parameters
    ----------
    model:
        An ``nn.Module`` (traced in eval mode; its training flags are restored afterwards; its weights
        are shared, never modified) or an ``ExportedProgram``.
    example_inputs:
        A tuple of positional inputs (a single tensor is accepted).
    example_kwargs:
        Keyword inputs.
    dynamic_batch:
        Make dim 0 of every tensor input dynamic (a batch of 1 is traced as 2, rows repeated).
    dynamic_dims:
        Also try every other dim of every tensor input dynamic (``Dim.AUTO``): a dim stays dynamic unless
        the model pins it (a weight's size, a reshape to a constant), in which case it is captured static
        and, for dim 0 and for the dims of integer (token id) inputs, a warning names it. If torch.export
        refuses the automatic dims outright, capture falls back to a dynamic batch only, then to static
        shapes, each with a warning. ``Captured.input_dims()`` says what was captured.
    dynamic_shapes:
        A ``torch.export`` dynamic-shape spec; it replaces the automatic one.

    A Hugging Face model whose config has ``use_cache=True`` is captured with ``use_cache`` off (a
    ``DynamicCache`` is not a graph output): the compressed model returns no past key values.

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
        ranges = _input_ranges(model)
        gm = _guarded(model.module(), ranges)
        return Captured(gm, model, example_inputs, example_kwargs, None, [], ranges)
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture expects an nn.Module or ExportedProgram, got {type(model).__name__}")

    name = type(model).__name__
    with _eval_mode(model), _no_kv_cache(model) as notes:
        attempts: list[tuple[tuple, dict, Any]] = []
        if dynamic_shapes is not None:
            attempts.append((example_inputs, example_kwargs, dynamic_shapes))
        elif dynamic_batch or dynamic_dims:
            widened = _widen_batch(example_inputs, example_kwargs) if dynamic_batch else None
            a, k = widened if widened else (example_inputs, example_kwargs)
            if dynamic_dims:
                attempts.append((a, k, _AutoSpec()))
            if dynamic_batch:
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
                what = ("a dynamic batch only" if isinstance(spec, _BatchSpec) else "static shapes, so the "
                        "compressed model only accepts the example shapes")
                warnings.warn(
                    f"{name}: torch.export refused dynamic input dims ({errors[0]}); captured with {what}.",
                    stacklevel=2,
                )
            ranges = _input_ranges(ep)
            gm = _guarded(ep.module(), ranges)  # shares the model's tensors; passes replace, never write into them
            cap = Captured(gm, ep, args, kwargs, spec, notes, ranges)
            if isinstance(spec, _AutoSpec):
                _warn_static_dims(name, cap)
            return cap
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _no_kv_cache(model: torch.nn.Module) -> Iterator[list]:
    """Hugging Face models return a ``DynamicCache`` (not a graph output) unless ``config.use_cache``
    is off: capture with it off, restored afterwards."""
    notes: list[str] = []
    config = getattr(model, "config", None)
    if config is None or getattr(config, "use_cache", None) is not True:
        yield notes
        return
    config.use_cache = False
    notes.append("captured with config.use_cache=False: the compressed model returns no KV cache")
    try:
        yield notes
    finally:
        config.use_cache = True


def _warn_static_dims(name: str, cap: Captured) -> None:
    """Warn about the dims a user most likely meant to vary (dim 0, and every dim of an integer input
    such as token ids) that the model pinned; every pinned dim is recorded in ``cap.notes``."""
    dtypes = {n.name: n.meta["val"].dtype for n in cap.module.graph.nodes if n.op == "placeholder"
              and isinstance(n.meta.get("val"), torch.Tensor)}
    pinned, loud = [], []
    for inp, dims in cap.input_dims():
        for d, size in enumerate(dims):
            if isinstance(size, int):
                pinned.append(f"{inp}[{d}]={size}")
                if d == 0 or not (dtypes[inp].is_floating_point or dtypes[inp].is_complex):
                    loud.append(f"{inp} dim {d} (= {size})")
    if pinned:
        cap.notes.append("static input dims: " + ", ".join(pinned))
    if loud:
        warnings.warn(f"{name}: the model pins {', '.join(loud)}; captured static there, so the compressed "
                      "model only accepts that size in that dim.", stacklevel=3)


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
