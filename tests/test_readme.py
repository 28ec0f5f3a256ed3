"""The README's first Python example runs as written and its result is faithful (issue: the first example
a user copies must be one that works)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _first_python_block() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)


def test_first_readme_example_runs_and_keeps_the_output():
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "the output moved" warning
        exec(compile(_first_python_block(), str(README), "exec"), namespace)  # noqa: S102
    small, model, inputs = namespace["small"], namespace["model"], namespace["inputs"]
    assert small.sparsecomp_report[0]["output_error"] < 0.05
    held_out = inputs(256)
    with torch.no_grad():
        ref = model(held_out)
        assert float((small(held_out) - ref).norm() / ref.norm()) < 0.05
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))  # noqa: E731
    assert weights(small) <= 0.5 * weights(model) + 64  # MACs of linears = their weights per row
