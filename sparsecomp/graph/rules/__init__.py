"""Default op rules: how each ATen op couples the dimensions of its inputs and output.

One small function per op, keyed by ATen overload; one module per op family, each with its own ``RULES``;
``DEFAULT_RULES`` is their union (a duplicate key is an error). See ``registry.py`` for the contract and
``common.py`` for the shared patterns (elementwise broadcasting, reshape blocks).
"""

from ..registry import OpRegistry
from . import conv, elementwise, index, linalg, norm, reduce, shape
from .common import broadcast, reshape_labels

#: The op families, in the order their rules are merged.
FAMILIES = (elementwise, reduce, linalg, conv, norm, shape, index)

DEFAULT_RULES = OpRegistry.union(*(family.RULES for family in FAMILIES))

__all__ = ["DEFAULT_RULES", "FAMILIES", "broadcast", "reshape_labels"]
