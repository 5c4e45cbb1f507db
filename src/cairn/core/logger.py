"""Where numbers go: the :class:`Logger` hands each metric to every destination the user configured."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cairn.core.callback import Callback

if TYPE_CHECKING:
    from cairn.core.state import State
    from cairn.storage.base import ObjectStore
    from cairn.storage.transfer import Transfers

__all__ = ["Logger", "LoggerDestination", "SavedCheckpoint", "transfers_among"]


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint complete on disk, as the saver announces it to experiment trackers (rank 0, once per save)."""

    path: str  #: the local file
    name: str  #: its name among the run's checkpoints (the saver's remote file name), e.g. ``ep1-ba8-rank0.pt``
    content_hash: str | None  #: cairn's content hash of it (``xxh3-128:...``), None if it could not be read back
    aliases: tuple[str, ...]  #: ``"latest"``, and ``"best"`` when it is the best by the saver's ``best_metric``
    batch: int  #: the run's batch count when it was taken


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

    def log_checkpoint(self, checkpoint: SavedCheckpoint) -> Future[str] | None:
        """Record a complete checkpoint (an experiment tracker registers it as an artifact, in the background);
        destinations that keep no checkpoints ignore it (and return None). The returned future, if any, ends when
        the checkpoint is stored: until then the saver's retention keeps the local file."""
        del checkpoint
        return None

    @property
    def transfers(self) -> Transfers | None:
        """The store transfers this destination runs, or None (the default) for one that stores no files.

        Checkpoint code finds the run's object store through this (autoresume, the fit-start checks of the
        store's names) without importing any logger class: checkpoint/ never imports loggers/.
        """
        return None

    def checkpoint_source(self, name: str) -> tuple[ObjectStore, str] | None:
        """Where the checkpoint ``name`` is read from when this destination is the ``load_object_store``: a store
        and the object's name in it, or None for a destination that holds no checkpoints.

        An uploader's is its store, with ``name`` placed as its uploads are; an experiment tracker's is a store
        over its artifacts, where ``name`` names an artifact (``"<name>:latest"``, ``"runs:/<id>/<path>"``).
        """
        transfers = self.transfers
        return None if transfers is None else (transfers.store, transfers.remote_name(name))


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

    def log_checkpoint(self, checkpoint: SavedCheckpoint) -> list[Future[str]]:
        """Announce a complete checkpoint to every destination; one future per destination that stores it."""
        futures = [destination.log_checkpoint(checkpoint) for destination in self.destinations]
        return [future for future in futures if future is not None]

    @property
    def logs_checkpoints(self) -> bool:
        return any(type(d).log_checkpoint is not LoggerDestination.log_checkpoint for d in self.destinations)

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
