"""Slicing: rotate a pre-norm transformer's residual stream by PCA and remove its weakest directions.

``stream.py`` finds the stream and puts the graph in rotation-ready form; ``slice.py`` is the pass.
"""

from .slice import Slice, kept_width, run_slice

__all__ = ["Slice", "kept_width", "run_slice"]
