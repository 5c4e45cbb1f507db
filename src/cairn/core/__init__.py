"""The vocabulary of a run: time, events, state, and the hooks that act on them."""

from cairn.core.callback import Algorithm, Callback
from cairn.core.event import Event
from cairn.core.state import State
from cairn.core.time import Time, Timestamp, TimeUnit

__all__ = ["Algorithm", "Callback", "Event", "State", "Time", "TimeUnit", "Timestamp"]
