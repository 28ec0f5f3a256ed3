"""Compress to a measured target: latency models per backend and machine, and the search that uses them.

* :mod:`.latency`: time models and single ops on a backend; the cached per-op table; whole-model prediction.
"""

from .latency import (BACKENDS, LatencyModel, LatencyTable, OpKey, Prediction, Timing, measure_model, model_ops,
                      table_path)

__all__ = ["BACKENDS", "LatencyModel", "LatencyTable", "OpKey", "Prediction", "Timing", "measure_model", "model_ops",
           "table_path"]
