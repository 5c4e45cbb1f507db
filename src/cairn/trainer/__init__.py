"""The training loop."""

from cairn.trainer.trainer import Trainer

__all__ = ["Trainer"]
