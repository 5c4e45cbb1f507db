"""When a checkpoint is taken: one policy object answers "now?" at each checkpoint event."""

from __future__ import annotations

from cairn.core.event import Event
from cairn.core.interval import IntervalLike, IntervalPolicy, interval_policy
from cairn.core.state import State

__all__ = ["SavePolicy", "is_last_checkpoint_event", "save_policy"]

SavePolicy = IntervalPolicy


def save_policy(save_interval: IntervalLike) -> SavePolicy:
    """``1`` / ``"1ep"`` / ``"500ba"`` / ``"30m"`` / a ``Time`` / ``callable(state, event)`` as one policy."""
    return interval_policy(
        save_interval, batch_event=Event.BATCH_CHECKPOINT, epoch_event=Event.EPOCH_CHECKPOINT, name="save_interval"
    )


def is_last_checkpoint_event(state: State, event: Event) -> bool:
    """True at the run's final checkpoint event: its end must always be saved, so that it can be resumed."""
    if not state.is_done():
        return False
    if event is Event.EPOCH_CHECKPOINT:
        return True
    # After the last batch of an epoch the epoch's end still follows; otherwise this batch is the end.
    return event is Event.BATCH_CHECKPOINT and not state.is_epoch_exhausted()
