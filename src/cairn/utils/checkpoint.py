"""Saving and loading checkpoints by hand, outside a Trainer's schedule.

``save_checkpoint(state, path)`` writes through the same atomic path the savers use; ``load_checkpoint(path,
state, weights_only=False, strict=True, ignore_keys=())`` verifies the file, checks it fits, and restores it.
"""

from cairn.checkpoint.loader import load_checkpoint
from cairn.checkpoint.saver import save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]
