"""Firing an event: algorithms first (they change training), then callbacks and loggers (they observe it)."""

from __future__ import annotations

from cairn.core.event import Event
from cairn.core.logger import Logger
from cairn.core.state import State

__all__ = ["Engine"]


class Engine:
    """Runs everything registered on ``state`` for one event, in registration order."""

    def __init__(self, state: State, logger: Logger) -> None:
        self.state = state
        self.logger = logger
        self._closed = False

    def run_event(self, event: Event) -> None:
        for algorithm in self.state.algorithms:
            if algorithm.match(event, self.state):
                algorithm.apply(event, self.state, self.logger)
        for callback in self.state.callbacks:
            callback.run_event(event, self.state, self.logger)

    def close(self) -> None:
        """Close every callback once, even when one of them fails; the first failure is raised afterwards."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for callback in self.state.callbacks:
            try:
                callback.close(self.state, self.logger)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others had their chance
                errors.append(err)
        if errors:
            raise errors[0]
