"""Application code on top of the library: the ``sparsecomp`` CLI (cli.py), the MiniLM demo (demo.py), model
loaders (models.py), one evaluation helper for the real encoder (evaluate.py), parameters / MACs / latency
(metrics.py)."""
