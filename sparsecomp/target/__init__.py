"""Compress to a measured target: latency models per backend and machine, and the search that uses them.

* :mod:`.latency`: time models and single ops on a backend; the cached per-op table; whole-model prediction.
* :mod:`.breakeven`: measured break-even sparsities of the sparse kernels per backend (read by ``Sparsify``).
* :mod:`.widths`: a backend-suitable ``round_to``, measured.
* :mod:`.config` / :mod:`.search`: ``Target`` and ``compress_to_target``.
"""

from .breakeven import measure_break_even, measured_break_even
from .config import Target
from .latency import (BACKENDS, LatencyModel, LatencyTable, OpKey, Prediction, Timing, measure_model, model_ops,
                      table_path)
from .search import Point, TargetResult, compress_to_target
from .widths import WidthChoice, representative_op, suitable_round_to

__all__ = ["BACKENDS", "LatencyModel", "LatencyTable", "OpKey", "Point", "Prediction", "Target", "TargetResult",
           "Timing", "WidthChoice", "compress_to_target", "measure_break_even", "measure_model", "measured_break_even",
           "model_ops", "representative_op", "suitable_round_to", "table_path"]
