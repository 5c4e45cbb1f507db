"""Where numbers go: the :class:`Logger` hands each metric to every destination the user configured."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cairn.core.callback import Callback

if TYPE_CHECKING:
    from cairn.core.state import State

__all__ = ["Logger", "LoggerDestination"]


class LoggerDestination(Callback):
    """A place metrics are sent (a console, a file, an experiment tracker). It sees every event, like a callback."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        del metrics, step

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        del hyperparameters


class Logger:
    """Fans each call out to the run's destinations; callbacks receive it at every event."""

    def __init__(self, state: State, destinations: Sequence[LoggerDestination] = ()) -> None:
        self._state = state
        self.destinations = list(destinations)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self._state.timestamp.batch if step is None else step
        for destination in self.destinations:
            destination.log_metrics(metrics, step)

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        for destination in self.destinations:
            destination.log_hyperparameters(hyperparameters)
