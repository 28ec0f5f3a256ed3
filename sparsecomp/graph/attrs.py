"""Attributes of a graph module: read, replace and add the tensors that ``get_attr`` nodes name.

Every pass edits weights through these, so that a parameter stays a parameter (with its
``requires_grad``), a buffer stays a buffer (persistent or not) and a plain tensor constant stays one.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch


def get_attr(module: torch.nn.Module, target: str) -> Any:
    """The attribute at dotted path ``target`` of ``module`` (a parameter, buffer, constant or submodule)."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def owner_of(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """``(owner, leaf)``: the submodule holding ``target`` and the attribute's name in it."""
    path, _, leaf = target.rpartition(".")
    return (get_attr(module, path) if path else module), leaf


def replace_tensor(owner: torch.nn.Module, leaf: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Store ``new`` as ``owner.leaf``, the same kind of attribute as ``old``; returns what was stored."""
    if isinstance(old, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
        owner._parameters[leaf] = new
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)
    return new


def set_tensor(module: torch.nn.Module, target: str, value: torch.Tensor) -> torch.Tensor:
    """Replace the tensor at ``target`` by ``value`` cast to its dtype and shape; returns the new tensor."""
    owner, leaf = owner_of(module, target)
    old = getattr(owner, leaf)
    return replace_tensor(owner, leaf, old, value.to(old.dtype).reshape(old.shape).contiguous())


def free_name(module: torch.nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first name ``module`` has no attribute for."""
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def add_tensor(module: torch.nn.Module, beside: str, suffix: str, tensor: torch.Tensor) -> str:
    """Register ``tensor`` next to the attribute ``beside`` (in the same submodule), under the first free name
    ``<leaf>_<suffix>[_i]``: as a parameter if it is an ``nn.Parameter``, else as a buffer. Returns its
    target (the dotted path a ``get_attr`` node names)."""
    owner, leaf = owner_of(module, beside)
    name = free_name(owner, f"{leaf}_{suffix}")
    if isinstance(tensor, torch.nn.Parameter):
        owner.register_parameter(name, tensor)
    else:
        owner.register_buffer(name, tensor)
    prefix = beside.rpartition(".")[0]
    return f"{prefix}.{name}" if prefix else name


def deepcopy(obj: Any) -> Any:
    """``copy.deepcopy`` without torch's pytree deprecation noise (emitted while copying GraphModules)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj)


def shared_copy(module: torch.nn.Module) -> Any:
    """A copy of ``module`` (its submodules and, for a GraphModule, its graph) that shares every parameter
    and buffer with it: a pass that replaces tensors (:func:`replace_tensor`, :func:`set_tensor`) instead
    of writing into them edits the copy at the memory cost of the tensors it replaces."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    for m in module.modules():  # plain tensor attributes (constants) too
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                memo[id(v)] = v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module, memo)

