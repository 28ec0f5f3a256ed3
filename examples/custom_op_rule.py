"""Teach the dependency graph a custom op, so that pruning can go through it.

    python examples/custom_op_rule.py

An op sparsecomp does not know is never assumed elementwise: every dim it touches is fixed (nothing
around it is pruned) and it is listed in ``unknown_ops``. An ``OpRule`` says how the op couples the
dims of its inputs and output; for a per-channel op like this one, channel ``c`` of the output is
channel ``c`` of the input, which is what the elementwise helper ``broadcast`` describes.
"""

import torch
from torch import nn

import sparsecomp
from sparsecomp.app.metrics import count_params
from sparsecomp.graph.rules import DEFAULT_RULES, broadcast


@torch.library.custom_op("examples::scaled_silu", mutates_args=())
def scaled_silu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * torch.nn.functional.silu(x)


@scaled_silu.register_fake
def _(x, scale):
    return torch.empty_like(x)


def scaled_silu_rule(node, ctx):
    """Output dims are the input's dims (channel c stays channel c): unify them like an elementwise op."""
    return broadcast(ctx, node, [node.args[0]])


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.down(scaled_silu(self.up(x), 0.5))


def main() -> None:
    op = torch.ops.examples.scaled_silu.default
    model, x = Model().eval(), torch.randn(4, 32)

    unknown = sparsecomp.dependency_graph(model, (x,))
    assert list(unknown.unknown_ops) == ["examples.scaled_silu.default"], "reported by name"
    assert not unknown.groups, "its dims are fixed: nothing to prune around it"

    rules = {op: sparsecomp.OpRule(scaled_silu_rule)}
    known = sparsecomp.dependency_graph(model, (x,), rules=rules)
    assert [g.size for g in known.groups] == [64], "the 64 hidden neurons of up -> scaled_silu -> down"

    DEFAULT_RULES.add(op, sparsecomp.OpRule(scaled_silu_rule))   # for every compress() in this process
    small = sparsecomp.compress(model, (x,), sparsecomp.StructuredPruning(ratio=0.5))
    assert count_params(small) < count_params(model), "half the hidden neurons went, through the custom op"
    assert small(x).shape == (4, 32)
    print(known.summary())


if __name__ == "__main__":
    main()
