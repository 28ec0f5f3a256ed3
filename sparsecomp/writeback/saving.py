"""Save a written-back module and load it again into the same class.

A directory holds ``model.safetensors`` (the state dict; tied tensors stored once), ``sparsecomp.json`` (the
model's class, and per module what write-back changed: tensor shapes, size attributes, low-rank factors)
and, for a Hugging Face model, its ``config.json``. Loading builds the dense model from that config (or
takes a freshly built one from the caller), re-applies the recorded layout, then loads the weights
strictly: the result computes exactly what was saved.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import torch
from torch import nn

from ..errors import MissingDependencyError, SparsecompError
from .apply import _Editor
from .modules import LowRankConv, LowRankLinear

FORMAT = 1
WEIGHTS = "model.safetensors"
MANIFEST = "sparsecomp.json"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("safetensors", "transformers", "Saving a compressed module") from exc
    return st


def save_compressed(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``model`` (typically from :func:`sparsecomp.write_back`) to ``directory``."""
    st = _safetensors()
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    cls = type(model)
    manifest = {"format": FORMAT, "class": f"{cls.__module__}:{cls.__qualname__}",
                "layout": getattr(model, "sparsecomp_layout", {}) or {},
                "hf_config": hasattr(getattr(model, "config", None), "to_json_file")}
    if manifest["hf_config"]:
        model.config.to_json_file(os.path.join(directory, "config.json"))
    st.save_model(model, os.path.join(directory, WEIGHTS))
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)


def _import_class(path: str) -> type:
    module, _, qual = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def load_compressed(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load what :func:`save_compressed` wrote.

    ``model``: a freshly built dense instance of the saved class (it is modified and returned). Omit it for
    a Hugging Face model: the class is rebuilt from the saved ``config.json``. Loading a directory imports
    the class it names: load only directories you trust.
    """
    st = _safetensors()
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise SparsecompError(f"{directory!r} holds no {MANIFEST}: not saved by sparsecomp.save_compressed")
    with open(path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    if manifest.get("format") != FORMAT:
        raise SparsecompError(f"{path}: format {manifest.get('format')!r}, this sparsecomp reads {FORMAT}")
    if model is None:
        if not manifest["hf_config"]:
            raise SparsecompError(f"{directory!r} holds a {manifest['class']} without a config: pass a freshly "
                                  f"built dense instance as `model`")
        cls = _import_class(manifest["class"])
        config = cls.config_class.from_json_file(os.path.join(directory, "config.json"))
        model = cls(config)
    elif f"{type(model).__module__}:{type(model).__qualname__}" != manifest["class"]:
        raise SparsecompError(f"{directory!r} holds a {manifest['class']}, got a {type(model).__qualname__}")
    apply_layout(model, manifest["layout"])
    st.load_model(model, os.path.join(directory, WEIGHTS), strict=True)
    model.sparsecomp_layout = manifest["layout"]
    return model.eval()


def apply_layout(model: nn.Module, layout: dict) -> None:
    """Give ``model``'s modules the recorded shapes (values are loaded afterwards)."""
    ed = _Editor(model)
    for name, entry in layout.items():
        kind = entry["kind"]
        if kind == "resized":
            for leaf, shape in entry["tensors"].items():
                full = f"{name}.{leaf}" if name else leaf
                ed.set_tensor(full, torch.empty(shape, dtype=ed.tensor(full).dtype),
                              tie=leaf not in entry.get("untied", ()))
            mod = model.get_submodule(name)
            for attr, value in entry["attrs"].items():
                setattr(mod, attr, tuple(value) if isinstance(value, list) else value)
        elif kind == "lowrank_linear":
            ed.set_module(name, LowRankLinear(entry["in"], entry["rank"], entry["out"], entry["bias"]))
        elif kind == "lowrank_conv":
            conv = model.get_submodule(name)
            dtype = conv.weight.dtype
            bias = torch.empty(entry["b"][0], dtype=dtype) if entry["bias"] else None
            ed.set_module(name, LowRankConv(conv, torch.empty(entry["a"], dtype=dtype),
                                            torch.empty(entry["b"], dtype=dtype), bias))
        else:
            raise SparsecompError(f"unknown layout entry {kind!r} for module {name!r}")
