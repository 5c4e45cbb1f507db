"""A frozen copy of a checkpoint, taken in the time it takes to copy memory, so training can go on while it is written.

Every tensor is copied into a host buffer that is kept from one save to the next (pinned memory for GPU tensors, so
the device-to-host copy runs at full speed without blocking on page faults); buffers are reallocated only when a
tensor's shape or dtype changes. Containers are rebuilt and other leaves deep-copied, so later training cannot reach
into the snapshot. A snapshot stays valid until the next call to :meth:`SnapshotBuffers.take`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from cairn.checkpoint.tree import map_tree

__all__ = ["SnapshotBuffers"]

_IMMUTABLE = (str, int, float, bool, complex, bytes, type(None))


class SnapshotBuffers:
    """Host copies of a checkpoint's tensors, reused between saves (one save in flight at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._copied_from_device = False

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self._buffers.values())

    def take(self, tree: Any) -> Any:
        """A copy of ``tree`` whose tensors live in this object's buffers; returns once every copy has landed."""
        self._used = set()
        self._copied_from_device = False
        snapshot = map_tree(tree, self._copy_leaf)
        if self._copied_from_device:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before a thread reads them
        for stale in set(self._buffers) - self._used:  # tensors that are gone (a changed model) free their memory
            del self._buffers[stale]
        return snapshot

    def release(self) -> None:
        self._buffers.clear()

    def _copy_leaf(self, path: str, leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return self._copy_tensor(leaf, path)
        if isinstance(leaf, _IMMUTABLE):
            return leaf
        return copy.deepcopy(leaf)

    def _copy_tensor(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        tensor = tensor.detach()
        if _copied_plainly(tensor) or path in self._used:  # a second tensor at one path must not share its buffer
            return tensor.cpu().clone()
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            pinned = tensor.device.type == "cuda"
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pinned)
            self._buffers[path] = buffer
        self._used.add(path)
        on_device = tensor.device.type != "cpu"
        buffer.copy_(tensor, non_blocking=on_device and buffer.is_pinned())
        self._copied_from_device |= on_device
        return buffer


def _copied_plainly(tensor: torch.Tensor) -> bool:
    """Rare kinds that a reused plain buffer cannot hold: sparse layouts, DTensors, and quantized tensors (an empty
    ``qint8`` buffer has no quantizer, and ``copy_`` into it fails inside torch)."""
    return tensor.is_sparse or tensor.is_quantized or getattr(tensor, "_local_tensor", None) is not None
