"""Graph passes. Each pass has a frozen config and a function registered for that config type."""

from .base import PassResult, register_pass, run_pass
from .structured import StructuredPruning
from .lowrank import LowRank  # noqa: F401

__all__ = ["PassResult", "StructuredPruning", "register_pass", "run_pass"]
