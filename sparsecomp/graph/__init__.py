"""Dependency-graph analysis: atoms (labels.py), op rules by op family (rules/), groups (depgraph.py), apply.py."""

from .depgraph import DependencyGraph, Group, Member
from .registry import OpRegistry, OpRule
from .rules import DEFAULT_RULES

__all__ = ["DEFAULT_RULES", "DependencyGraph", "Group", "Member", "OpRegistry", "OpRule"]
