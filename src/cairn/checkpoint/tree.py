"""Walking nested dicts, lists and tuples of tensors: the one walker that saving, loading and the tools share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["map_tensors"]


def map_tensors(node: Any, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A copy of nested dicts, lists and tuples with every tensor replaced by ``change(tensor)``."""
    if isinstance(node, torch.Tensor):
        return change(node)
    if isinstance(node, dict):
        return {key: map_tensors(value, change) for key, value in node.items()}
    if isinstance(node, list):
        return [map_tensors(value, change) for value in node]
    if isinstance(node, tuple):
        return tuple(map_tensors(value, change) for value in node)
    return node


def overlaps(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """Whether two elements of a view may share memory: each stride, smallest first, must step past everything
    the smaller ones reach (a plain, sliced or permuted view does; a zero stride does not)."""
    reach = 0
    for step, count in sorted((s, n) for n, s in zip(size, stride, strict=True) if n > 1):
        if step <= reach:
            return True
        reach += (count - 1) * step
    return False
