"""Saving and loading checkpoints by hand, outside a Trainer's schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cairn.checkpoint.commit import write_checkpoint
from cairn.checkpoint.content import build_checkpoint
from cairn.checkpoint.loader import load_checkpoint as _load_checkpoint
from cairn.core.state import State

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    state: State, path: str, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), overwrite: bool = True
) -> str:
    """Write a checkpoint of ``state`` to ``path`` through the same atomic path the savers use."""
    checkpoint = build_checkpoint(state, weights_only=weights_only, ignore_keys=ignore_keys)
    write_checkpoint(checkpoint, path, overwrite=overwrite)
    return path


def load_checkpoint(
    path: str,
    state: State,
    *,
    load_weights_only: bool = False,
    strict_model_weights: bool = True,
    ignore_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Restore the checkpoint at ``path`` into ``state`` (verified, no code executed); return its content."""
    return _load_checkpoint(
        path, state, weights_only=load_weights_only, strict=strict_model_weights, ignore_keys=ignore_keys
    )
