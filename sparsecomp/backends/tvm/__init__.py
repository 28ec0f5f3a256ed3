"""TVM backend: a captured (compressed) model -> Relax VM executable with our own TIR kernels.

Pipeline (:func:`compile_captured`)::

    ExportedProgram --run_decompositions (linear kept)--> from_exported_program + our converters
      (linear -> packed dense kernel, convolution -> direct / pointwise / depthwise conv kernels with
      BatchNorm, activation and skip-add folded in, group / layer norm kernels, sparsecomp::* ->
      BSR/CSR/N:M kernels, all via call_tir); plus ``main_static``, main specialised to the example
      input shapes (run when the inputs match them)
      --> LegalizeOps, FoldConstant, FuseOps, FuseTIR (the rest of the graph)
      --> schedule.schedule_pass (dlight CPU rules + LoopNest) --> Relax VM build for the host CPU

``lower(captured, target=None, num_threads=None)`` returns a :class:`TVMModel`: call it like the model
(torch tensors in, torch tensors out, same output structure), ``save(path)`` writes a shared library
plus ``sparsecomp.json``, and :func:`load` (or ``sparsecomp.load``) brings it back without the model.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import numpy as np
import torch

from ...errors import MissingDependencyError

try:
    import tvm
    from tvm import relax
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "apache-tvm", "tvm", "The TVM backend (sparsecomp.lower(..., backend='tvm'))"
    ) from _err

from ...capture.export import Captured, capture
from ...errors import ConfigError, UnsupportedError
from ..registry import MANIFEST
from . import frontend, schedule
from .target import default_threads, resolve_target, set_threads
from .weights import WeightArena, lift_weights

__all__ = ["TVMModel", "lower", "load", "latency", "compile_captured"]

_LIBRARY = "model.so"
_WEIGHTS = "weights.npz"


def _pipeline(target: tvm.target.Target, parallel: bool = True) -> tvm.transform.Pass:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0)
    def _run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + [relax.transform.FastMathTransform()]
                + schedule.legalize_passes()
                + [relax.transform.DeadCodeElimination(), schedule.schedule_pass(parallel)]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _run


def compile_captured(captured: Captured, target: Any = None, parallel: bool = True,
                     specialize: bool = True):
    """Import and build ``captured``; returns ``(executable, kernel_counts, target, static_shapes,
    weights)``.

    ``parallel=False`` compiles single-threaded code (no ``T.parallel`` loops at all). ``specialize``
    also builds ``main_static`` for the example inputs' shapes (see
    :func:`.frontend.specialize_example`); ``static_shapes`` is ``None`` when it was not built.
    ``weights`` are the kernels' large constant arguments, lifted to trailing parameters of ``main``
    (:func:`.weights.lift_weights`): pass them after the inputs.
    """
    tgt = resolve_target(target)
    mod, fired = frontend.import_program(captured.exported, parallel, tgt)
    mod, lifted = lift_weights(mod)
    static = None
    if specialize:
        example = [t for t in torch.utils._pytree.tree_leaves(
            (captured.example_args, captured.example_kwargs)) if isinstance(t, torch.Tensor)]
        static = frontend.specialize_example(mod, example)
    try:
        exe = tvm.compile(mod, target=tgt, relax_pipeline=_pipeline(tgt, parallel))
    except Exception as err:  # noqa: BLE001 - TVM raises assorted errors from its passes and LLVM
        first = [line for line in str(err).splitlines()
                 if line.strip() and not line.startswith(("Traceback", " ", "\t"))]
        raise UnsupportedError(
            f"TVM backend: building the imported module failed ({type(err).__name__}: "
            f"{first[0] if first else ''}); an op of this model is not supported by TVM's pipeline"
        ) from err
    return exe, fired, tgt, static, lifted


class TVMModel:
    """A compiled model: ``model(*args, **kwargs)`` runs the Relax VM on torch tensors.

    Attributes
    ----------
    kernels : dict
        How many linears went to each of our kernels (``{"dense": 6, "bsr16x1": 2}``).
    num_threads : int
        Threads of TVM's pool while this model runs.
    """

    def __init__(self, module, in_spec, out_spec, num_threads: int, kernels: dict, target: str,
                 static_shapes: list | None = None, weights: list | WeightArena | None = None):
        self._module = module  # Executable or loaded runtime Module (kept alive for the VM)
        # the kernels' large weights, passed after the inputs on every call (huge-page arena)
        self._arena = weights if isinstance(weights, WeightArena) else WeightArena(weights or [])
        self._weights = self._arena.tensors
        self._vm = relax.VirtualMachine(module, tvm.cpu())
        self._main = self._vm["main"]
        # inputs shaped exactly like the example run the shape-specialised copy (no dynamic shapes)
        self._static_shapes = [tuple(s) for s in static_shapes] if static_shapes else None
        self._main_static = self._vm["main_static"] if self._static_shapes else None
        self._in_spec = in_spec
        self._out_spec = out_spec
        self.num_threads = num_threads
        self.kernels = dict(kernels)
        self.target = target
        self._n_positional = _positional_only(in_spec)
        self._single_out = out_spec is not None and out_spec.is_leaf()

    def _inputs(self, args, kwargs) -> list:
        leaves, spec = torch.utils._pytree.tree_flatten((tuple(args), dict(kwargs)))
        if self._in_spec is not None and spec != self._in_spec:
            raise ConfigError(
                f"inputs do not match the structure the model was lowered with: expected "
                f"{self._in_spec}, got {spec}"
            )
        out = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                t = leaf.detach()
                if t.device.type != "cpu":
                    raise ConfigError(f"the TVM backend runs on CPU; got a tensor on {t.device}")
                out.append(tvm.runtime.from_dlpack(t.contiguous()))
        return out

    def _fast_inputs(self, args, kwargs) -> list | None:
        """Inputs of the common call ``model(t1, ..., tn)`` without pytree (~10 us a call), else None."""
        if kwargs or len(args) != self._n_positional:
            return None
        out = []
        for a in args:
            if type(a) is not torch.Tensor or a.device.type != "cpu" or a.requires_grad:
                return None
            out.append(tvm.runtime.from_dlpack(a if a.is_contiguous() else a.contiguous()))
        return out

    def _function(self, inputs: list):
        """``main_static`` for inputs with the example's shapes, else the dynamic ``main``."""
        static = self._static_shapes
        if static is not None and len(inputs) == len(static) and all(
            tuple(t.shape) == s for t, s in zip(inputs, static)
        ):
            return self._main_static
        return self._main

    def __call__(self, *args, **kwargs):
        set_threads(self.num_threads)
        inputs = self._fast_inputs(args, kwargs)
        if inputs is None:
            inputs = self._inputs(args, kwargs)
        result = self._function(inputs)(*inputs, *self._weights)
        if self._single_out:
            while not hasattr(result, "__dlpack__"):  # a (nested) one-element tuple
                result = result[0]
            return torch.from_dlpack(result)
        flat = _flatten_result(result)
        outs = [torch.from_dlpack(t) for t in flat]
        return torch.utils._pytree.tree_unflatten(outs, self._out_spec)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``model.so`` (the compiled VM), ``weights.npz`` (the lifted kernel weights) and
        ``sparsecomp.json`` into directory ``path``."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._module.export_library(os.path.join(path, _LIBRARY))
        # views of the arena, not copies
        np.savez(os.path.join(path, _WEIGHTS), *[torch.from_dlpack(t).numpy() for t in self._weights])
        meta = {
            "backend": "tvm",
            "library": _LIBRARY,
            "weights": _WEIGHTS,
            "target": self.target,
            "num_threads": self.num_threads,
            "kernels": self.kernels,
            "static_shapes": self._static_shapes,
            "in_spec": torch.utils._pytree.treespec_dumps(self._in_spec),
            "out_spec": torch.utils._pytree.treespec_dumps(self._out_spec),
        }
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump(meta, f, indent=1)


def _positional_only(in_spec) -> int:
    """``n`` when ``in_spec`` is ``((t1, ..., tn), {})`` with tensor-or-leaf positions, else -1."""
    if in_spec is None:
        return -1
    try:
        n = in_spec.child(0).num_children
        probe = torch.utils._pytree.tree_structure((tuple(range(n)), {}))
    except (AttributeError, IndexError):
        return -1
    return n if probe == in_spec else -1


def _flatten_result(result) -> list:
    if isinstance(result, (list, tuple)) or type(result).__name__ in ("Array", "List", "Tuple"):
        flat = []
        for item in result:
            flat.extend(_flatten_result(item))
        return flat
    return [result]


def lower(captured: Captured, *, target: Any = None, num_threads: int | None = None) -> TVMModel:
    """Compile a ``Captured`` for the host CPU (or ``target``) and return a :class:`TVMModel`.

    ``num_threads`` (default: the cores this process may use) sizes TVM's thread pool; a model lowered
    with ``num_threads=1`` is compiled without parallel loops, so running it later with more threads
    does not make it faster (lower it again instead).
    """
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ConfigError(f"num_threads must be a positive int, got {num_threads!r}")
    threads = num_threads or default_threads()
    # one thread: no parallel loops at all (a parallel body compiles to a slower closure; see kernels)
    exe, fired, tgt, static, weights = compile_captured(captured, target, parallel=threads > 1)
    ep = captured.exported
    return TVMModel(exe, ep.call_spec.in_spec, ep.call_spec.out_spec, threads, fired, str(tgt),
                    static, weights)


def _member(path: str, meta: dict, key: str) -> str:
    """The file named by manifest entry ``key``, refused unless it is a file directly inside ``path``
    (a manifest must not make ``load`` open, let alone dlopen, anything outside the saved directory)."""
    name = meta.get(key)
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise ConfigError(f"{path}: manifest entry {key!r} must be a file name inside the directory, got {name!r}")
    root = os.path.realpath(path)
    full = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(full) != root:
        raise ConfigError(f"{path}: manifest entry {key!r} ({name!r}) resolves outside the directory ({full})")
    return full


def load(path: str | os.PathLike, *, num_threads: int | None = None) -> TVMModel:
    """Load a model written by :meth:`TVMModel.save`.

    A saved model is code: ``model.so`` is a native library that this call loads into the process
    (``dlopen``), with the rights of the process. Load only directories you trust as you would trust a
    Python package. The manifest's file names are checked to stay inside ``path`` (no absolute paths,
    no ``..``, no symbolic links leading out), so a manifest alone cannot point ``load`` elsewhere.
    """
    path = os.fspath(path)
    with open(os.path.join(path, MANIFEST)) as f:
        meta = json.load(f)
    if meta.get("backend") != "tvm":
        raise ConfigError(f"{path} holds a {meta.get('backend')!r} model, not a TVM one")
    module = tvm.runtime.load_module(_member(path, meta, "library"))
    weights = []
    if meta.get("weights"):  # straight into the huge-page arena, one array at a time
        weights = WeightArena.from_npz(_member(path, meta, "weights"))
    return TVMModel(
        module,
        torch.utils._pytree.treespec_loads(meta["in_spec"]),
        torch.utils._pytree.treespec_loads(meta["out_spec"]),
        num_threads or meta["num_threads"],
        meta.get("kernels", {}),
        meta["target"],
        meta.get("static_shapes"),
        weights,
    )


def latency(module: Any, example_inputs: Any, *, num_threads: int = 1, target: Any = None,
            warmup: int = 5, repeat: int = 30, example_kwargs: dict | None = None) -> float:
    """Median latency in seconds of ``module`` compiled with this backend on ``example_inputs``.

    ``module`` may be an ``nn.Module`` (captured here), a ``Captured`` or an already lowered
    :class:`TVMModel`.
    """
    if isinstance(module, TVMModel):  # same compiled code, its own thread setting
        model = copy.copy(module)
        model.num_threads = num_threads
    else:
        if not isinstance(module, Captured):
            module = capture(module, example_inputs, example_kwargs, dynamic_dims=False)
        model = lower(module, target=target, num_threads=num_threads)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = example_kwargs or {}
    for _ in range(warmup):
        model(*args, **kwargs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]
