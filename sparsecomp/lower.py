"""``sparsecomp.lower``: hand a (compressed) model to an execution backend.

Backends live in :mod:`sparsecomp.backends` and are imported lazily, so a missing optional dependency only
matters when that backend is asked for. A backend module exposes

* ``lower(captured: Captured, **options) -> Lowered`` and
* ``load(path: str, **options) -> Lowered`` (for backends whose artefacts can be saved).

``Lowered`` is any callable with the model's signature (torch tensors in, torch tensors out) that also has
``save(path)`` where the backend supports it.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from .capture.export import Captured, capture
from .errors import ConfigError

# backend name -> module implementing ``lower``/``load``
BACKENDS: dict[str, str] = {
    "tvm": "sparsecomp.backends.tvm",
    "ort": "sparsecomp.backends.ort",
}

# Saved artefacts carry this file (inside the directory given to ``save``) naming their backend.
MANIFEST = "sparsecomp.json"


def _backend_module(backend: str):
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def lower(model: Any, example_inputs: Any = None, backend: str = "tvm", *,
          example_kwargs: dict | None = None, **options: Any) -> Any:
    """Compile ``model`` (an ``nn.Module``, a compressed module, or a ``Captured``) for ``backend``.

    ``options`` are backend specific (e.g. ``target``, ``num_threads``). Returns a callable taking the same
    inputs as the model and returning torch tensors in the same structure.
    """
    mod = _backend_module(backend)
    captured = model if isinstance(model, Captured) else capture(model, example_inputs, example_kwargs)
    return mod.lower(captured, **options)


def load(path: str | os.PathLike, **options: Any) -> Any:
    """Load a lowered model saved with ``.save(path)``; the backend is read from the saved manifest."""
    manifest = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.exists(manifest):
        raise ConfigError(f"{path} is not a saved sparsecomp model (no {MANIFEST} inside)")
    with open(manifest) as f:
        meta = json.load(f)
    return _backend_module(meta["backend"]).load(path, **options)
