"""Testing utilities for sparsecomp (model zoo, ...)."""

from .zoo import (
    ZOO,
    ZooEntry,
    batch_dynamic_shapes,
    build,
    count_params,
    get,
    names,
    with_batch,
)

__all__ = [
    "ZOO",
    "ZooEntry",
    "batch_dynamic_shapes",
    "build",
    "count_params",
    "get",
    "names",
    "with_batch",
]
