"""Graph passes. Each pass has a frozen config and a function registered for that config type."""

from .base import PassResult, register_pass, run_pass
from .lowrank import LowRank
from .slicing import Slice
from .sparsify import Sparsify
from .structured import StructuredPruning

__all__ = ["LowRank", "PassResult", "Sparsify", "StructuredPruning", "Slice", "register_pass", "run_pass"]
