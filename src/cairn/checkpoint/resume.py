"""Finding the checkpoint a run resumes from, and wiring the Trainer's ``save_*`` / ``load_*`` arguments."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from cairn.checkpoint.loader import apply_checkpoint, read_checkpoint
from cairn.checkpoint.naming import format_name, name_pattern
from cairn.checkpoint.retention import list_checkpoints
from cairn.checkpoint.saver import CheckpointSaver
from cairn.core.state import State
from cairn.errors import CheckpointCorruptError

__all__ = ["find_latest_checkpoint", "restore"]

log = logging.getLogger(__name__)


def find_latest_checkpoint(saver: CheckpointSaver, state: State) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of ``saver``'s folder that reads and verifies, with its content; None if none does.

    Every file matching the saver's name pattern is complete (writes are atomic), so the newest of them wins,
    even when a crash came between its rename and the ``latest`` link's swap; the link's target is the fallback
    for names that carry no progress numbers. A damaged file falls back to the one before it.
    """
    folder = format_name(saver.folder, state)
    candidates = list(reversed(list_checkpoints(folder, name_pattern(saver.filename, state))))
    if saver.latest_filename is not None:
        link = os.path.join(folder, format_name(saver.latest_filename, state))
        if os.path.islink(link):
            candidates.append(os.path.join(folder, os.readlink(link)))
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except (CheckpointCorruptError, FileNotFoundError) as err:
            log.warning("autoresume skips %s: %s", path, err)
    return None


def restore(
    state: State,
    *,
    load_path: str | None,
    weights_only: bool,
    strict: bool,
    ignore_keys: Sequence[str],
    autoresume: bool,
    saver: CheckpointSaver | None,
) -> str | None:
    """Load what the arguments ask for into ``state``; return the checkpoint's path, or None for a fresh start."""
    if autoresume:
        if saver is None:
            raise ValueError("autoresume=True needs save_folder: that is where it looks for the run's checkpoints")
        found = find_latest_checkpoint(saver, state)
        if found is not None:
            path, checkpoint = found
            apply_checkpoint(checkpoint, state, source=path, strict=strict, ignore_keys=ignore_keys)
            log.info("autoresume: continuing from %s", path)
            return path
        log.info("autoresume: no checkpoint in %s yet; starting fresh", format_name(saver.folder, state))
        if load_path is None:
            return None
    if load_path is None:
        return None
    checkpoint = read_checkpoint(load_path)
    apply_checkpoint(
        checkpoint, state, source=load_path, weights_only=weights_only, strict=strict, ignore_keys=ignore_keys
    )
    return load_path
