"""ONNX Runtime backend: ``sparsecomp.lower(model, example_inputs, backend="ort", num_threads=...)``.

The model is exported with :func:`sparsecomp.backends.onnx.export_onnx` (sparse linears already lowered
to the fastest form for ``num_threads``) and run by an ``onnxruntime.InferenceSession`` on CPU. The
returned :class:`OrtModule` takes torch tensors like the model and returns torch tensors in the model's
output structure; ``save(path)`` writes a directory that ``sparsecomp.load(path)`` reads back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..capture.export import Captured, capture
from ..errors import ConfigError, MissingDependencyError, UnsupportedError
from .registry import MANIFEST
from .onnx import OnnxExport, export_onnx

__all__ = ["OrtModule", "latency", "load", "lower"]

_MODEL_FILE = "model.onnx"


def _check_threads(num_threads: Any) -> int:
    if num_threads is None:
        return os.cpu_count() or 1
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ConfigError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    return num_threads


def _session(path: str, num_threads: int):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "The ONNX Runtime backend") from exc
    so = ort.SessionOptions()
    so.intra_op_num_threads = num_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class OrtModule:
    """A model running in ONNX Runtime, called like the original module (torch tensors in and out).

    Attributes
    ----------
    session:
        The ``onnxruntime.InferenceSession``.
    num_threads:
        Intra-op threads of the session.
    report:
        Per sparse linear, the chosen ONNX form and why (list of dicts).
    """

    def __init__(self, directory: str, meta: dict, num_threads: int, owns_directory: bool = False):
        self.directory = directory
        self.meta = meta
        self.num_threads = num_threads
        self.session = _session(os.path.join(directory, meta["model"]), num_threads)
        self.input_names: list[str] = meta["input_names"]
        self.in_spec = pytree.treespec_loads(meta["in_spec"])
        self.out_spec = pytree.treespec_loads(meta["out_spec"])
        self.report: list[dict] = meta.get("report", [])
        if owns_directory:  # a temporary export directory: removed with this object (or at exit)
            weakref.finalize(self, shutil.rmtree, directory, True)
        session_inputs = {i.name for i in self.session.get_inputs()}
        self._feed_names = [n if n in session_inputs else None for n in self.input_names]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise UnsupportedError(f"OrtModule called with inputs structured as {spec}, "
                                   f"but the model was exported for {self.in_spec}")
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        feed = {name: t.detach().cpu().contiguous().numpy()
                for name, t in zip(self._feed_names, tensors) if name is not None}
        outs = self.session.run(None, feed)
        return pytree.tree_unflatten([torch.from_numpy(np.asarray(o)) for o in outs], self.out_spec)

    forward = __call__

    def save(self, path: str | os.PathLike) -> str:
        """Write the model, its weights and the manifest into directory ``path``."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(self.directory):
            src = os.path.join(self.directory, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(path, name)):
                shutil.copy2(src, os.path.join(path, name))
        with open(os.path.join(path, MANIFEST), "w") as f:
            json.dump(self.meta, f, indent=1)
        return path

    def __repr__(self) -> str:
        return f"OrtModule(inputs={self.input_names}, num_threads={self.num_threads})"


def _manifest(exp: OnnxExport) -> dict:
    try:
        in_spec, out_spec = pytree.treespec_dumps(exp.in_spec), pytree.treespec_dumps(exp.out_spec)
    except Exception as exc:  # custom containers without a serialization hook
        raise UnsupportedError(f"the model's input/output structure cannot be recorded: {exc}") from exc
    return {"backend": "ort", "model": os.path.basename(exp.path), "input_names": exp.input_names,
            "in_spec": in_spec, "out_spec": out_spec, "report": [c.to_dict() for c in exp.report]}


def lower(captured: Captured, num_threads: int | None = None, **export_options: Any) -> OrtModule:
    """Export ``captured`` to ONNX and open it in ONNX Runtime with ``num_threads`` threads (default: all
    cores). ``export_options`` go to :func:`~sparsecomp.backends.onnx.export_onnx` (e.g.
    ``sparse_representation``); sparse-layer forms are chosen by timing with ``num_threads`` threads."""
    threads = _check_threads(num_threads)
    unknown = set(export_options) - {"sparse_representation", "margin", "budget_ms", "external_data",
                                     "opset_version"}
    if unknown:
        raise ConfigError(f"unknown ort backend option(s) {sorted(unknown)}; known: num_threads, "
                          "sparse_representation, margin, budget_ms, external_data, opset_version")
    directory = tempfile.mkdtemp(prefix="sparsecomp_ort_")
    try:
        exp = export_onnx(captured, None, os.path.join(directory, _MODEL_FILE), num_threads=threads,
                          **export_options)
        n_out = len(pytree.tree_leaves(captured.run()))
        if n_out != len(exp.output_names):
            raise UnsupportedError(f"the model has {n_out} output leaves but the ONNX graph has "
                                   f"{len(exp.output_names)} outputs (non-tensor outputs are not supported)")
        return OrtModule(directory, _manifest(exp), threads, owns_directory=True)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def load(path: str | os.PathLike, num_threads: int | None = None) -> OrtModule:
    """Open a model saved with ``OrtModule.save`` (``sparsecomp.load`` dispatches here)."""
    path = os.fspath(path)
    with open(os.path.join(path, MANIFEST)) as f:
        meta = json.load(f)
    if meta.get("backend") != "ort":
        raise ConfigError(f"{path} holds a {meta.get('backend')!r} model, not an 'ort' one")
    return OrtModule(path, meta, _check_threads(num_threads))


def latency(module: Any, example_inputs: Any, num_threads: int = 1, *, example_kwargs: dict | None = None,
            **measure: Any):
    """ONNX Runtime latency of ``module`` on ``example_inputs`` (a :class:`~sparsecomp.app.metrics.LatencyStats`,
    median/p10/p90 in ms). ``module`` may be an ``nn.Module``, a compressed module, a ``Captured`` or an
    :class:`OrtModule`; ``measure`` goes to :func:`sparsecomp.app.metrics.measure_latency`.

    >>> stats = latency(torch.nn.Linear(8, 4), (torch.randn(2, 8),), num_threads=1, min_time=0.05)
    >>> stats.median_ms > 0
    True
    """
    from ..app.metrics import measure_latency

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(module, OrtModule):
        runner = module
    else:
        captured = module if isinstance(module, Captured) else capture(module, example_inputs, example_kwargs,
                                                                             dynamic_dims=False)
        runner = lower(captured, num_threads=num_threads)
    return measure_latency(runner, tuple(example_inputs), example_kwargs, threads=num_threads, **measure)
