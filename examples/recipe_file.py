"""Apply a recipe file (YAML) and save the configs back: a compression is data, not code.

    python examples/recipe_file.py

``recipe.yaml`` (next to this script) lists the passes; ``sparsecomp.load_recipe`` turns it into frozen,
validated configs, and ``to_dict()`` / ``config_from_dict`` round-trip them.
"""

from pathlib import Path

import torch
from torch import nn

import sparsecomp

RECIPE = Path(__file__).with_name("recipe.yaml")


def main() -> None:
    configs = sparsecomp.load_recipe(str(RECIPE))
    assert [type(c).__name__ for c in configs] == ["StructuredPruning", "LowRank"]
    assert [sparsecomp.config_from_dict(c.to_dict()) for c in configs] == configs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    x = torch.randn(8, 64)
    small = sparsecomp.compress(model, (x,), configs)
    passes = [entry["pass"] for entry in small.sparsecomp_report]
    assert passes == ["StructuredPruning", "LowRank"], passes
    assert small(x).shape == (8, 64)
    print(sparsecomp.report(small, show=False))


if __name__ == "__main__":
    main()
