"""Graph passes. Each pass has a frozen config and a function registered for that config type."""

from .base import PassContext, PassResult, register_pass, run_pass
from .lowrank import LowRank
from .recover import Recover
from .slicing import Slice
from .sparsify import Sparsify
from .structured import StructuredPruning

__all__ = ["LowRank", "PassContext", "PassResult", "Recover", "Slice", "Sparsify", "StructuredPruning",
           "register_pass", "run_pass"]
