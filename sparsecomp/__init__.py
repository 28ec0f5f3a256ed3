"""sparsecomp: PyTorch compiler passes that make models physically smaller and faster.

Pipeline: ``capture`` (torch.export) -> ``dependency_graph`` (coupled dims, pruning groups) -> passes
(``StructuredPruning``) -> a smaller ``torch.nn.Module``; see docs/ARCHITECTURE.md.
"""

from .api import compress, dependency_graph
from .capture import Captured, capture
from .config import PassConfig, config_from_dict, load_recipe
from .errors import (
    CaptureError,
    ConfigError,
    MissingDependencyError,
    PassError,
    ShapeError,
    SparsecompError,
    TargetUnreachableError,
    UnsupportedError,
    VerificationError,
)
from .graph.depgraph import DependencyGraph, Group, Member
from .graph.registry import OpRegistry, OpRule
from .backends.onnx import export_onnx
from .backends.registry import load, lower
from .passes import LowRank, Recover, Slice, Sparsify, StructuredPruning
from .report import report
from .target import Target, TargetResult, compress_to_target
from .writeback import load_compressed, save_compressed, write_back

__version__ = "0.1.0"

__all__ = [
    "Captured",
    "CaptureError",
    "ConfigError",
    "DependencyGraph",
    "Group",
    "LowRank",
    "Member",
    "MissingDependencyError",
    "OpRegistry",
    "OpRule",
    "PassConfig",
    "PassError",
    "Recover",
    "ShapeError",
    "Slice",
    "SparsecompError",
    "Sparsify",
    "StructuredPruning",
    "Target",
    "TargetResult",
    "TargetUnreachableError",
    "UnsupportedError",
    "VerificationError",
    "capture",
    "compress",
    "compress_to_target",
    "config_from_dict",
    "dependency_graph",
    "export_onnx",
    "load",
    "load_recipe",
    "load_compressed",
    "lower",
    "report",
    "save_compressed",
    "write_back",
]
