"""Looking into batches only as far as the loop must: how many samples and tokens, and how to cut microbatches."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["count_samples", "count_tokens", "split_batch"]


def count_samples(batch: Any) -> int:
    """The length of the first tensor found in ``batch`` (its first dimension is the batch dimension)."""
    tensor = _first_tensor(batch)
    if tensor is None:
        if isinstance(batch, (list, tuple)):
            return len(batch)
        raise ValueError(f"cannot count the samples in a batch of type {type(batch).__name__}: it holds no tensor")
    return int(tensor.shape[0]) if tensor.dim() > 0 else 1


def count_tokens(batch: Any) -> int:
    """Tokens in a language-model batch: the size of its ``input_ids``; 0 for batches without them."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return int(batch["input_ids"].numel())
    return 0


def split_batch(batch: Any, microbatch_size: int) -> list[Any]:
    """Cut ``batch`` along its first dimension into pieces of at most ``microbatch_size`` samples."""
    total = count_samples(batch)
    starts = range(0, total, microbatch_size)
    return [_slice(batch, start, min(start + microbatch_size, total), total) for start in starts]


def _slice(batch: Any, start: int, stop: int, total: int) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0 or batch.shape[0] != total:
            return batch  # not batched along dim 0: every microbatch shares it
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, start, stop, total) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, start, stop, total) for v in batch))
    if isinstance(batch, (list, tuple)):
        if (
            batch
            and all(not isinstance(v, (torch.Tensor, Mapping, list, tuple)) for v in batch)
            and len(batch) == total
        ):
            return type(batch)(batch[start:stop])  # a list of per-sample items (e.g. strings)
        return type(batch)(_slice(v, start, stop, total) for v in batch)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None
