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

import torch

from ..capture.export import Captured, capture
from ..errors import ConfigError, VerificationError

# backend name -> module implementing ``lower``/``load``
BACKENDS: dict[str, str] = {
    "tvm": "sparsecomp.backends.tvm",
    "ort": "sparsecomp.backends.ort",
}

# ``lower(..., verify=True)``: float outputs must be within this fraction of each output's largest
# reference magnitude (a backend's fast math and reassociated sums stay ~1e-6 on the test zoo)
VERIFY_RTOL = 1e-3

# Saved artefacts carry this file (inside the directory given to ``save``) naming their backend.
MANIFEST = "sparsecomp.json"


def _backend_module(backend: str):
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; known: {sorted(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def lower(model: Any, example_inputs: Any = None, backend: str = "tvm", *,
          example_kwargs: dict | None = None, verify: bool | float = True, **options: Any) -> Any:
    """Compile ``model`` (an ``nn.Module``, a compressed module, or a ``Captured``) for ``backend``.

    ``options`` are backend specific (e.g. ``target``, ``num_threads``). Returns a callable taking the same
    inputs as the model and returning torch tensors in the same structure. A module is captured with a
    dynamic batch only (the backends' kernels are specialised on the other dims); pass a ``Captured``
    (``sparsecomp.capture(model, x)``, every dim dynamic where the model allows) to lower more dynamic dims.

    ``verify`` (default ``True``) runs the lowered model once on the example inputs and compares it with
    the captured graph run by torch: same output structure, shapes and dtypes, integer and boolean
    outputs equal, float outputs within ``VERIFY_RTOL`` (or ``verify`` itself, when a float) of each
    output's largest magnitude, NaN and infinity where torch has them. A mismatch raises
    ``VerificationError`` naming the output, instead of handing back a model that computes something
    else; ``verify=False`` skips the check.
    """
    if not (isinstance(verify, bool) or (isinstance(verify, float) and 0 < verify < 1)):
        raise ConfigError(f"verify must be True, False or a tolerance in (0, 1), got {verify!r}")
    mod = _backend_module(backend)
    captured = model if isinstance(model, Captured) else capture(model, example_inputs, example_kwargs,
                                                                          dynamic_dims=False)
    lowered = mod.lower(captured, **options)
    if verify is not False:
        got = lowered(*captured.example_args, **captured.example_kwargs)
        check_outputs(f"lower[{backend}]", got, captured.run(), VERIFY_RTOL if verify is True else verify)
    return lowered


def check_outputs(what: str, got: Any, want: Any, rtol: float) -> None:
    """Raise ``VerificationError(what, ...)`` unless ``got`` matches ``want`` as :func:`lower` verifies."""
    outs, refs = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    hint = "; pass verify=False to skip this check"
    if len(outs) != len(refs):
        raise VerificationError(what, f"{len(outs)} outputs where torch gives {len(refs)}{hint}")
    for n, (out, ref) in enumerate(zip(outs, refs)):
        if not isinstance(ref, torch.Tensor):
            if out != ref:
                raise VerificationError(what, f"output {n} is {out!r} where torch gives {ref!r}{hint}")
            continue
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
            desc = (f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor)
                    else type(out).__name__)
            raise VerificationError(
                what, f"output {n} is {desc} where torch gives {tuple(ref.shape)} {ref.dtype}{hint}")
        if not (ref.is_floating_point() or ref.is_complex()):
            if not torch.equal(out, ref):
                wrong = int((out != ref).sum())
                raise VerificationError(
                    what, f"output {n} ({ref.dtype}) differs from torch in {wrong} of {ref.numel()} "
                    f"elements on the example inputs{hint}")
            continue
        if ref.is_complex():
            out, ref = torch.view_as_real(out.detach()), torch.view_as_real(ref.detach())
        out, ref = out.detach().double(), ref.detach().double()
        finite = torch.isfinite(ref)
        special = ~finite
        if not torch.equal(torch.isfinite(out), finite) or not torch.equal(
                out[special].nan_to_num(0.0, 1.0, -1.0), ref[special].nan_to_num(0.0, 1.0, -1.0)):
            raise VerificationError(
                what, f"output {n} has NaN / infinity where torch has none, or misses torch's{hint}")
        if not finite.any():
            continue
        scale = float(ref[finite].abs().max()) or 1.0
        err = float((out[finite] - ref[finite]).abs().max()) / scale
        if err > rtol:
            raise VerificationError(
                what, f"output {n} {tuple(ref.shape)} differs from torch on the example inputs by "
                f"{err:.3g} of its largest magnitude (tolerance {rtol:g}){hint}")


def load(path: str | os.PathLike, **options: Any) -> Any:
    """Load a lowered model saved with ``.save(path)``; the backend is read from the saved manifest."""
    manifest = os.path.join(os.fspath(path), MANIFEST)
    if not os.path.exists(manifest):
        raise ConfigError(f"{path} is not a saved sparsecomp model (no {MANIFEST} inside)")
    with open(manifest) as f:
        meta = json.load(f)
    return _backend_module(meta["backend"]).load(path, **options)
