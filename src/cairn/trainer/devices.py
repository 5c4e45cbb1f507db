"""Which device a run trains on, and getting each batch there."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["move_to_device", "resolve_device"]

_GPU_NAMES = ("gpu", "cuda")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks the GPU when one is visible, else the CPU; ``"gpu"`` and ``"cuda"`` mean the same."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str) and device.lower() in ("cpu", *_GPU_NAMES):
        resolved = torch.device("cpu") if device.lower() == "cpu" else torch.device("cuda")
    else:
        raise ValueError(f"device={device!r}: use 'cpu', 'gpu', a torch.device, or leave it out to pick automatically")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but no CUDA GPU is visible here; pass device='cpu' or leave it out")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (nested tuples, lists, dicts) to ``device``; leave the rest alone."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch
