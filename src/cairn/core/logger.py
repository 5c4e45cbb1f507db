"""Where numbers go: the :class:`Logger` hands each metric to every destination the user configured."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from cairn.core.callback import Callback

if TYPE_CHECKING:
    from cairn.core.state import State
    from cairn.storage.transfer import Transfers

__all__ = ["Logger", "LoggerDestination", "transfers_among"]


class LoggerDestination(Callback):
    """A place metrics are sent (a console, a file, an experiment tracker). It sees every event, like a callback."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        del metrics, step

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        del hyperparameters

    def upload_file(
        self,
        remote_file_name: str,
        file_path: str,
        overwrite: bool = False,
        pointer_name: str | None = None,
        *,
        pointer_target: str | None = None,
    ) -> Future[str] | None:
        """Send a file to remote storage; destinations that store no files ignore it (and return None).

        With ``pointer_name``, the store's latest pointer of that name moves to the upload once it is verified:
        to ``remote_file_name``, or to ``pointer_target`` (a sharded folder, whose ``cairn.pt`` goes up last).
        """
        del remote_file_name, file_path, overwrite, pointer_name, pointer_target
        return None

    @property
    def transfers(self) -> Transfers | None:
        """The store transfers this destination runs, or None (the default) for one that stores no files.

        Checkpoint code finds the run's object store through this (autoresume, the fit-start checks of the
        store's names) without importing any logger class: checkpoint/ never imports loggers/.
        """
        return None


class Logger:
    """Fans each call out to the run's destinations; callbacks receive it at every event."""

    def __init__(self, state: State, destinations: Sequence[LoggerDestination] = ()) -> None:
        self._state = state
        self.destinations = list(destinations)
        self._latest: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self._state.timestamp.batch if step is None else step
        self._latest.update({name: float(value) for name, value in metrics.items() if _is_number(value)})
        for destination in self.destinations:
            destination.log_metrics(metrics, step)

    def latest_metric(self, name: str) -> float | None:
        """The value last logged under ``name`` in this process (since it started), or None: what a checkpoint
        saver records in each checkpoint for ``best_metric``."""
        return self._latest.get(name)

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        for destination in self.destinations:
            destination.log_hyperparameters(hyperparameters)

    def upload_file(
        self,
        remote_file_name: str,
        file_path: str,
        overwrite: bool = False,
        pointer_name: str | None = None,
        *,
        pointer_target: str | None = None,
    ) -> list[Future[str]]:
        """Hand a file to every destination that uploads files; one future per upload started."""
        futures = [
            d.upload_file(remote_file_name, file_path, overwrite, pointer_name, pointer_target=pointer_target)
            if pointer_target is not None
            else d.upload_file(remote_file_name, file_path, overwrite, pointer_name)
            for d in self.destinations
        ]
        return [future for future in futures if future is not None]

    @property
    def uploads_files(self) -> bool:
        return any(type(d).upload_file is not LoggerDestination.upload_file for d in self.destinations)


def _is_number(value: object) -> bool:
    """A value a checkpoint can record as a float: a Python or NumPy number, or a one-element tensor."""
    if isinstance(value, bool):
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def transfers_among(destinations: Iterable[object]) -> list[Transfers]:
    """The store transfers of the run's uploaders, in the order the loggers were given: how checkpoint code and the
    Trainer reach the run's stores without knowing any logger class."""
    return [d.transfers for d in destinations if isinstance(d, LoggerDestination) and d.transfers is not None]
