"""Callbacks and algorithms: code that runs at events without changing the Trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cairn.core.event import Event

if TYPE_CHECKING:
    from cairn.core.logger import Logger
    from cairn.core.state import State

__all__ = ["Algorithm", "Callback"]


class Callback:
    """Observes the run: override a method named after an event (``epoch_end``, ``batch_checkpoint``, ...).

    A callback with state worth resuming returns it from ``state_dict()`` as plain data (tensors, numbers,
    strings, lists, dicts); it is stored in checkpoints under ``state["callbacks"][<class name>]``.
    """

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        getattr(self, event.value)(state, logger)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state  # stateless by default

    def close(self, state: State, logger: Logger) -> None:
        """Release resources; called once by ``Trainer.close()``. Must be safe to call when fit never ran."""

    def init(self, state: State, logger: Logger) -> None:
        """Called at ``Event.INIT``."""

    def fit_start(self, state: State, logger: Logger) -> None:
        """Called at ``Event.FIT_START``."""

    def epoch_start(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EPOCH_START``."""

    def before_dataloader(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BEFORE_DATALOADER``."""

    def after_dataloader(self, state: State, logger: Logger) -> None:
        """Called at ``Event.AFTER_DATALOADER``."""

    def batch_start(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BATCH_START``."""

    def before_train_batch(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BEFORE_TRAIN_BATCH``."""

    def before_forward(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BEFORE_FORWARD``."""

    def after_forward(self, state: State, logger: Logger) -> None:
        """Called at ``Event.AFTER_FORWARD``."""

    def before_loss(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BEFORE_LOSS``."""

    def after_loss(self, state: State, logger: Logger) -> None:
        """Called at ``Event.AFTER_LOSS``."""

    def before_backward(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BEFORE_BACKWARD``."""

    def after_backward(self, state: State, logger: Logger) -> None:
        """Called at ``Event.AFTER_BACKWARD``."""

    def after_train_batch(self, state: State, logger: Logger) -> None:
        """Called at ``Event.AFTER_TRAIN_BATCH``."""

    def batch_end(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BATCH_END``."""

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        """Called at ``Event.BATCH_CHECKPOINT``."""

    def epoch_end(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EPOCH_END``."""

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EPOCH_CHECKPOINT``."""

    def eval_start(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EVAL_START``."""

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EVAL_BATCH_START``."""

    def eval_before_forward(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EVAL_BEFORE_FORWARD``."""

    def eval_after_forward(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EVAL_AFTER_FORWARD``."""

    def eval_batch_end(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EVAL_BATCH_END``."""

    def eval_end(self, state: State, logger: Logger) -> None:
        """Called at ``Event.EVAL_END``."""

    def fit_end(self, state: State, logger: Logger) -> None:
        """Called at ``Event.FIT_END``."""


class Algorithm:
    """Changes training: runs ``apply`` at every event for which ``match`` is true, before any callback."""

    def match(self, event: Event, state: State) -> bool:
        raise NotImplementedError(f"{type(self).__name__} must implement match(event, state)")

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement apply(event, state, logger)")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
