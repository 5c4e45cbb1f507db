"""The CheckpointSaver callback: it asks the policy *when*, builds *what*, commits it *how*, and prunes."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

from cairn.checkpoint.commit import atomic_symlink, remove_stale_temporaries, write_checkpoint
from cairn.checkpoint.content import build_checkpoint
from cairn.checkpoint.naming import check_format, format_name, name_pattern
from cairn.checkpoint.policy import is_last_checkpoint_event, save_policy
from cairn.checkpoint.retention import list_checkpoints, prune
from cairn.core.callback import Callback
from cairn.core.event import Event
from cairn.core.interval import IntervalLike
from cairn.core.state import State
from cairn.loggers.logger import Logger

__all__ = ["CheckpointSaver", "save_checkpoint"]

log = logging.getLogger(__name__)

_SAVE_SEQUENCE = itertools.count()


class CheckpointSaver(Callback):
    """Saves checkpoints of the run into ``folder`` on a schedule.

    ``folder``, ``filename`` and ``latest_filename`` are format strings (``{run_name}``, ``{epoch}``, ``{batch}``,
    ``{rank}``, ... see ``cairn.checkpoint.naming.FORMAT_VARIABLES``); folders inside a name are created. The end of
    training is always saved once. ``num_checkpoints_to_keep`` counts the files matching ``filename`` on disk.
    """

    def __init__(
        self,
        folder: str = "{run_name}/checkpoints",
        filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt",
        remote_file_name: str | None = None,
        latest_filename: str | None = "latest-rank{rank}.pt",
        latest_remote_file_name: str | None = None,
        save_interval: IntervalLike = "1ep",
        *,
        weights_only: bool = False,
        num_checkpoints_to_keep: int = -1,
        overwrite: bool = False,
        ignore_keys: Sequence[str] | None = None,
    ) -> None:
        if remote_file_name is not None or latest_remote_file_name is not None:
            raise ValueError("remote_file_name needs an object store, which this version of cairn does not have yet")
        self.folder = check_format(str(folder), argument="folder")
        self.filename = check_format(filename, argument="filename")
        self.latest_filename = None if latest_filename is None else check_format(latest_filename, argument="latest")
        self.policy = save_policy(save_interval)
        self.weights_only = weights_only
        if isinstance(num_checkpoints_to_keep, bool) or not isinstance(num_checkpoints_to_keep, int):
            raise ValueError(f"num_checkpoints_to_keep={num_checkpoints_to_keep!r}: use an int (-1 keeps all)")
        if num_checkpoints_to_keep == 0 or num_checkpoints_to_keep < -1:
            raise ValueError(
                f"num_checkpoints_to_keep={num_checkpoints_to_keep}: keep -1 (all) or at least 1 local checkpoint; "
                "0 only makes sense with an object store to upload to"
            )
        self.num_checkpoints_to_keep = num_checkpoints_to_keep
        self.overwrite = overwrite
        self.ignore_keys = list(ignore_keys or [])
        self.saved_checkpoints: list[str] = []
        self.save_order: list[int] = []  # a process-wide sequence number per save, to merge several savers' lists
        self._last_saved_batch: int | None = None

    # -- events -----------------------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        folder = format_name(self.folder, state)
        remove_stale_temporaries(folder)
        if self.overwrite or state.resumed_from is not None:
            return
        existing = list_checkpoints(folder, name_pattern(self.filename, state))
        if existing:
            raise FileExistsError(
                f"{folder!r} already holds checkpoints of this run's name pattern ({existing[-1]!r} and "
                f"{len(existing) - 1} more); pass save_overwrite=True (overwrite=True) to replace them, use "
                "autoresume=True to continue that run, or choose another folder"
            )

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._maybe_save(state, Event.BATCH_CHECKPOINT)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._maybe_save(state, Event.EPOCH_CHECKPOINT)

    def _maybe_save(self, state: State, event: Event) -> None:
        due = self.policy(state, event)
        final = is_last_checkpoint_event(state, event) and self._last_saved_batch != state.timestamp.batch
        if due or final:
            self.save(state)

    # -- saving -----------------------------------------------------------------------------------------------

    def save(self, state: State) -> str:
        """Write a checkpoint of ``state`` now; return its path as given (``folder/filename``)."""
        folder = format_name(self.folder, state)
        path = os.path.join(folder, format_name(self.filename, state))
        save_checkpoint(
            state, path, weights_only=self.weights_only, ignore_keys=self.ignore_keys, overwrite=self.overwrite
        )
        if self.latest_filename is not None:
            atomic_symlink(os.path.join(folder, format_name(self.latest_filename, state)), path)
        if self.num_checkpoints_to_keep > 0:
            prune(folder, name_pattern(self.filename, state), self.num_checkpoints_to_keep, protect=path)
        self.saved_checkpoints.append(path)
        self.save_order.append(next(_SAVE_SEQUENCE))
        self._last_saved_batch = state.timestamp.batch
        log.info("saved checkpoint %s", path)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"saved_checkpoints": list(self.saved_checkpoints)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state  # the files on disk are the record; a resumed run lists only what it saves itself


def save_checkpoint(
    state: State, path: str, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), overwrite: bool = True
) -> str:
    """Write a checkpoint of ``state`` to ``path`` now, atomically; savers and manual saves both come here."""
    checkpoint = build_checkpoint(state, weights_only=weights_only, ignore_keys=ignore_keys)
    write_checkpoint(checkpoint, path, overwrite=overwrite)
    return path
