"""cairn: PyTorch training whose checkpoints you can trust."""

from importlib.metadata import PackageNotFoundError, version

from cairn.core import Algorithm, Callback, Event, State, Time, Timestamp, TimeUnit
from cairn.trainer import Trainer

try:
    __version__ = version("cairn")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["Algorithm", "Callback", "Event", "State", "Time", "TimeUnit", "Timestamp", "Trainer", "__version__"]
