"""Ready-made callbacks. The base class lives in :mod:`cairn.core`."""

from cairn.checkpoint.save.saver import CheckpointSaver
from cairn.core.callback import Callback

__all__ = ["Callback", "CheckpointSaver"]
