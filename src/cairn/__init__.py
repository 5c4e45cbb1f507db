"""cairn: PyTorch training whose checkpoints you can trust."""

from typing import Any

from cairn.core import Algorithm, Callback, Event, State, Time, Timestamp, TimeUnit
from cairn.version import __version__

__all__ = ["Algorithm", "Callback", "Event", "State", "Time", "TimeUnit", "Timestamp", "Trainer", "__version__"]


def __getattr__(name: str) -> Any:
    """``cairn.Trainer`` is imported on first use: it pulls in torchmetrics (a second), which the ``cairn``
    command's checkpoint tools never need."""
    if name == "Trainer":
        from cairn.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")
