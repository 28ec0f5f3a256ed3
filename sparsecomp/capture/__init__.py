"""Capture: turn a user model into the ATen-level graph that every sparsecomp pass works on."""

from .export import Captured, capture, concrete_shape

__all__ = ["Captured", "capture", "concrete_shape"]
