"""``torch.compile(model, backend="sparsecomp", options={...})``: compress every graph Dynamo captures.

The backend is registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so it is
available once sparsecomp is installed, without importing it.

Options (validated; unknown keys, targets or values raise :class:`~sparsecomp.errors.ConfigError`):

``recipe``          list of pass configs or their ``to_dict()`` dicts, applied in order (default: none,
                    the graph is only captured and run on ``target``)
``target``          ``"eager"`` (default: the compressed ATen graph run by torch), ``"inductor"``,
                    ``"ort"`` (ONNX Runtime) or ``"tvm"``
``target_options``  dict passed to ``sparsecomp.lower`` for ``"ort"``/``"tvm"`` (e.g. ``num_threads``)
``on_failure``      ``"warn"`` (default: run the uncompressed graph and warn with the reason) or
                    ``"error"``
``calibration``     calibration data for data-driven recipes (``compress(..., calibration=)``): a tensor,
                    a tuple of tensors or a list of such batches, given as the model's tensor inputs in
                    order (the inputs of the graph Dynamo captures; with graph breaks, of the first graph).
                    Without it, "auto" settings resolve to the data-free default and data-driven ones
                    raise (the graph runs uncompressed with a warning, or the error with "error").

**Inference only.** Dynamo passes parameters and buffers as graph inputs; the backend treats them as
*frozen constants*: their values at compile time are copied into the compiled graph, and later in-place
changes to the model's weights are not seen (recompile, or call ``torch._dynamo.reset()``). When grad
mode is on and a parameter requires grad, the graph is not compressed (it runs as Dynamo traced it, with
a warning): run the model under ``torch.no_grad()`` / ``torch.inference_mode()``.

Each graph is compressed with its interface fixed: the user inputs and outputs Dynamo gives it are the
inputs and outputs of the captured graph, with the same symbolic dims (so a graph Dynamo made dynamic
in the batch stays dynamic). The work runs on each graph's first call, outside Dynamo's tracing
context. A graph that cannot be compressed or lowered runs uncompressed with a warning naming the
reason (graph breaks give several graphs; each is handled on its own).

>>> compiled = torch.compile(model, backend="sparsecomp",  # doctest: +SKIP
...                          options={"recipe": [{"type": "StructuredPruning", "ratio": 0.5}], "target": "ort"})
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..errors import ConfigError, UnsupportedError

__all__ = ["CompileOptions", "TARGETS", "sparsecomp_backend"]

TARGETS = ("eager", "inductor", "ort", "tvm")
_ON_FAILURE = ("warn", "error")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """Validated ``options`` of the ``sparsecomp`` torch.compile backend (see the module docstring)."""

    recipe: tuple = ()
    target: str = "eager"
    target_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    on_failure: str = "warn"
    calibration: Any = None

    def __post_init__(self) -> None:
        from ..config import PassConfig, config_from_dict

        recipe = self.recipe
        if isinstance(recipe, (PassConfig, dict)):
            recipe = [recipe]
        if not isinstance(recipe, (list, tuple)):
            raise ConfigError(f"option 'recipe' must be a list of sparsecomp configs or dicts, got {recipe!r}")
        configs = []
        for entry in recipe:
            if isinstance(entry, PassConfig):
                configs.append(entry)
            elif isinstance(entry, dict):
                configs.append(config_from_dict(entry))
            else:
                raise ConfigError(f"option 'recipe' entries must be sparsecomp configs or dicts, got {entry!r}")
        object.__setattr__(self, "recipe", tuple(configs))
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r} for the sparsecomp torch.compile backend; "
                              f"known: {list(TARGETS)}")
        if not isinstance(self.target_options, Mapping):
            raise ConfigError(f"option 'target_options' must be a dict, got {self.target_options!r}")
        if self.target_options and self.target not in ("ort", "tvm"):
            raise ConfigError(f"target_options are only used by the 'ort' and 'tvm' targets, "
                              f"not {self.target!r}")
        object.__setattr__(self, "target_options", dict(self.target_options))
        if self.on_failure not in _ON_FAILURE:
            raise ConfigError(f"option 'on_failure' must be one of {list(_ON_FAILURE)}, got {self.on_failure!r}")
        cal = self.calibration
        if cal is not None and not isinstance(cal, (torch.Tensor, tuple, list)):
            raise ConfigError(f"option 'calibration' must be a tensor, a tuple of tensors or a list of batches, "
                              f"got {type(cal).__name__}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "CompileOptions":
        """Build from the ``options`` dict given to ``torch.compile``."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for the sparsecomp torch.compile backend; "
                              f"known: {known}")
        return cls(**options)


# --------------------------------------------------------------------------------------------------
# the Dynamo graph as a module with frozen constants
# --------------------------------------------------------------------------------------------------


def _source_name(node: fx.Node) -> str:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    try:
        return source.name if isinstance(getattr(source, "name", None), str) else source.name()
    except Exception:  # sources without a printable name
        return ""


def _is_constant(node: fx.Node, value: Any) -> bool:
    """Parameters and buffers (Dynamo lifts them to graph inputs) are frozen into the graph."""
    if isinstance(value, torch.nn.Parameter):
        return True
    name = _source_name(node)
    return "._parameters[" in name or "._buffers[" in name


def _qualified_name(node: fx.Node) -> str | None:
    """``L['self']._modules['enc']._parameters['weight']`` -> ``enc.weight`` (the user's own name, so
    that recipes' ``ignore`` patterns and reports refer to the model's layers)."""
    parts = re.findall(r"\['([^'\]]+)'\]", _source_name(node))[1:]
    if not parts or not all(p.isidentifier() or p.isdigit() for p in parts):
        return None
    return ".".join(parts)


class _FrozenGraph(torch.nn.Module):
    """Calls the Dynamo graph with its parameters/buffers as attributes and its size inputs recomputed
    from the shapes of the tensor inputs, so that ``forward`` takes only the user's tensors."""

    def __init__(self, gm: fx.GraphModule, plan: list[tuple[str, Any]],
                 constants: dict[str, tuple[torch.Tensor, bool]]):
        super().__init__()
        self._dynamo_graph = gm
        self.plan = plan  # per graph input: ("input", i) | ("const", name) | ("size", (i, dim))
        for name, (value, is_param) in constants.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            if is_param:  # parameters stay parameters: the passes only rewrite those
                owner.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
            else:
                owner.register_buffer(leaf, value.detach())

    def _constant(self, name: str) -> torch.Tensor:
        owner = self
        for part in name.split("."):
            owner = getattr(owner, part)
        return owner

    def forward(self, *inputs: torch.Tensor):
        args = []
        for kind, ref in self.plan:
            if kind == "input":
                args.append(inputs[ref])
            elif kind == "const":
                args.append(self._constant(ref))
            else:
                i, dim = ref
                args.append(inputs[i].shape[dim])
        return self._dynamo_graph(*args)


class _Unsupported(UnsupportedError):
    """The graph cannot be compressed; the message is the reason shown to the user."""


def _plan(gm: fx.GraphModule, example_inputs: Sequence[Any]):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _Unsupported(f"the graph has {len(placeholders)} inputs but Dynamo gave {len(example_inputs)}")
    plan: list[tuple[str, Any]] = []
    constants: dict[str, tuple[torch.Tensor, bool]] = {}
    reserved = {"_dynamo_graph", "plan"}
    user: list[torch.Tensor] = []
    user_nodes: list[fx.Node] = []
    sizes: list[tuple[int, Any]] = []
    for pos, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and _is_constant(node, value):
            name = _qualified_name(node)
            clash = name is None or name in constants or name.split(".")[0] in reserved or any(
                other.startswith(name + ".") or name.startswith(other + ".") for other in constants)
            if clash:
                name = f"_const{len(constants)}"
            is_param = isinstance(value, torch.nn.Parameter) or "._parameters[" in _source_name(node)
            constants[name] = (value, is_param)
            plan.append(("const", name))
        elif isinstance(value, torch.Tensor):
            plan.append(("input", len(user)))
            user.append(value.detach().clone())  # export tags its example tensors; keep Dynamo's clean
            user_nodes.append(node)
        elif isinstance(value, (int, torch.SymInt)):
            plan.append(("size", None))
            sizes.append((pos, node.meta.get("example_value", value)))
        else:
            raise _Unsupported(f"graph input {node.name!r} is a {type(value).__name__}, not a tensor or size")
    # size inputs are recomputed from a tensor dim that carries the same symbol
    symbolic: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(user_nodes):
        fake = node.meta.get("example_value")
        for d, s in enumerate(getattr(fake, "shape", ())):
            if isinstance(s, torch.SymInt):
                symbolic.setdefault(str(s), (i, d))
    for pos, sym in sizes:
        if str(sym) not in symbolic:
            raise _Unsupported(f"size input {placeholders[pos].name!r} ({sym}) is not the size of a tensor input")
        plan[pos] = ("size", symbolic[str(sym)])
    return plan, constants, user, user_nodes, symbolic


def _dynamic_spec(user: list[torch.Tensor], user_nodes: list[fx.Node]):
    """The dims Dynamo made symbolic, as a torch.export spec (one ``Dim`` per symbol), or None."""
    from torch.export import Dim, ShapesCollection

    dims: dict[str, Any] = {}
    spec = ShapesCollection()
    any_dynamic = False
    for t, node in zip(user, user_nodes):
        fake = node.meta.get("example_value")
        entry = {}
        for d, s in enumerate(getattr(fake, "shape", ())):
            if isinstance(s, torch.SymInt):
                key = str(s)
                if key not in dims:
                    dims[key] = Dim(f"d_{len(dims)}", min=2)
                entry[d] = dims[key]
        if entry:
            spec[t] = entry
            any_dynamic = True
    return spec if any_dynamic else None


# --------------------------------------------------------------------------------------------------
# the backend
# --------------------------------------------------------------------------------------------------


def _capture(module: torch.nn.Module, user: list[torch.Tensor], spec):
    from ..capture.export import capture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = capture(module, tuple(user), dynamic_batch=False, dynamic_dims=False, dynamic_shapes=spec)
    if spec is not None and cap.dynamic_shapes is None:
        reason = next((str(w.message) for w in caught), "torch.export refused the dynamic dims")
        raise _Unsupported(f"the graph is dynamic but could only be captured with static shapes ({reason})")
    return cap


def _lowered(module: torch.nn.Module, cap, user, spec, opts: CompileOptions) -> Callable:
    if opts.target == "eager":
        return module
    if opts.target == "inductor":
        from torch._inductor import compile as inductor_compile

        return inductor_compile(module, list(user))
    from .registry import lower

    return lower(cap, backend=opts.target, **opts.target_options)


def _build(gm, plan, constants, user, user_nodes, opts: CompileOptions) -> tuple[Callable, torch.nn.Module]:
    """Capture the frozen graph, compress it, lower it to the target (raises ``_Unsupported``)."""
    from ..api import compress
    from ..errors import SparsecompError

    spec = _dynamic_spec(user, user_nodes)
    frozen = _FrozenGraph(gm, plan, constants)
    try:
        cap = _capture(frozen, user, spec)
        module = cap.module
        if opts.recipe:
            module = compress(cap, None, list(opts.recipe), calibration=opts.calibration)
            cap = _capture(module, user, spec)
        with torch.no_grad():
            return _lowered(module, cap, user, spec, opts), module
    except _Unsupported:
        raise
    except SparsecompError as exc:
        raise _Unsupported(f"{type(exc).__name__}: {exc}") from exc
    except (ImportError, RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _Unsupported(f"{type(exc).__name__}: {first}") from exc


class _CompiledGraph:
    """What the backend returns for one Dynamo graph.

    The work (export, compression, lowering) runs on the first call, outside Dynamo's tracing context
    (``torch.export`` must not run inside it). If it fails, this graph runs as Dynamo traced it, with a
    warning (or the error is raised with ``on_failure="error"``).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], opts: CompileOptions):
        self.gm = gm
        self.opts = opts
        self.plan, self.constants, self.user, self.user_nodes, _ = _plan(gm, example_inputs)
        if not self.user:
            raise _Unsupported("the graph has no tensor inputs")
        self.user_positions = [i for i, (kind, _) in enumerate(self.plan) if kind == "input"]
        self.run: Callable | None = None
        self.module: torch.nn.Module | None = None  # the compressed graph (before target lowering)
        self.fallback_reason: str | None = None

    def _prepare(self) -> None:
        try:
            self.run, self.module = _build(self.gm, self.plan, self.constants, self.user, self.user_nodes,
                                           self.opts)
        except _Unsupported as exc:
            if self.opts.on_failure == "error":
                raise
            self.fallback_reason = str(exc)
            warnings.warn(f"sparsecomp backend: a graph of {len(self.gm.graph.nodes)} nodes runs uncompressed "
                          f"on torch ({exc})", stacklevel=3)
            self.run = None
        finally:
            self.user = self.constants = None  # the example copies are no longer needed

    def __call__(self, *args: Any):
        if self.run is None and self.fallback_reason is None:
            self._prepare()
        if self.run is None:
            return self.gm(*args)
        with torch.no_grad():
            return self.run(*[args[i] for i in self.user_positions])


def sparsecomp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping | None = None,
                       mode: str | None = None) -> Callable:
    """Dynamo backend: compress ``gm`` with ``options["recipe"]`` and run it on ``options["target"]``.

    Registered as ``torch.compile(..., backend="sparsecomp")``; see the module docstring for options.
    """
    if mode is not None:
        raise ConfigError(f"the sparsecomp backend takes no torch.compile mode (got {mode!r}); use options")
    opts = CompileOptions.from_options(options)
    try:
        if torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad
                                           for v in example_inputs):
            raise _Unsupported("grad mode is enabled and the graph has inputs that require grad; sparsecomp "
                               "compiles for inference with frozen weights (run under torch.no_grad())")
        return _CompiledGraph(gm, example_inputs, opts)
    except _Unsupported as exc:
        if opts.on_failure == "error":
            raise
        warnings.warn(f"sparsecomp backend: graph with {len(gm.graph.nodes)} nodes runs uncompressed on "
                      f"torch ({exc})", stacklevel=2)
        return gm.forward
