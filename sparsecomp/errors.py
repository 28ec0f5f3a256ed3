"""Typed errors raised by sparsecomp.

Every error names what it refused (the op, node, parameter or setting) so that a user can act on it.
Nothing is ever handed back half-done: a pass that raises leaves the user's model untouched.
"""

from __future__ import annotations


class SparsecompError(Exception):
    """Base class of every error raised by sparsecomp."""


class ConfigError(SparsecompError, ValueError):
    """A config field has an invalid value (raised on construction)."""


class CaptureError(SparsecompError):
    """The model could not be captured with ``torch.export``."""


class ShapeError(SparsecompError, ValueError):
    """A captured model was called with an input shape outside what was captured."""


class UnsupportedError(SparsecompError):
    """An op, construct or setting that sparsecomp cannot handle correctly."""


class PassError(SparsecompError):
    """A pass failed its precondition or postcondition.

    The message names the pass and, where relevant, the node.
    """

    def __init__(self, pass_name: str, message: str, node: str | None = None):
        where = f" at node {node!r}" if node else ""
        super().__init__(f"[{pass_name}]{where}: {message}")
        self.pass_name = pass_name
        self.node = node


class VerificationError(PassError):
    """A transformed model does not match what the transform promised."""


class MissingDependencyError(SparsecompError, ImportError):
    """An optional backend or model package is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package {package!r}; install it with "
            f"`pip install 'sparsecomp[{extra}]'`."
        )


class TargetUnreachableError(SparsecompError):
    """``compress_to_target`` found no model that meets the target as measured.

    ``best`` is the fastest point it measured (a dict: mac_ratio, measured speedup, output error) and
    ``points`` every point it explored.
    """

    def __init__(self, message: str, best: dict | None, points: list[dict]):
        super().__init__(message)
        self.best = best
        self.points = points
