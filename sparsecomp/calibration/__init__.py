"""What the passes learn from calibration data: batches and observation (data.py), importance of pruning groups
(importance.py), least-squares refits of the kept weights (reconstruct.py)."""
