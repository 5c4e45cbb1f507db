"""How many checkpoints are kept: decided from the files on disk, so it survives restarts and crashes."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Collection

from cairn.checkpoint.folder import list_checkpoints

__all__ = ["prune"]

log = logging.getLogger(__name__)


def prune(folder: str, pattern: re.Pattern[str], keep: int, *, protect: Collection[str] = ()) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints; a failed delete is logged, not fatal.

    Paths in ``protect`` are never deleted, and still count among the ``keep``: the checkpoint just written, and
    those whose upload is in flight or failed (the error of a failed upload promises that the local file is kept,
    and a file deleted mid-upload would have nothing to fall back on). They go at a later prune, once uploaded.
    """
    if keep < 0:
        return []
    checkpoints = list_checkpoints(folder, pattern)
    doomed = checkpoints[: max(len(checkpoints) - keep, 0)]
    kept = {os.path.abspath(path) for path in protect}
    removed = []
    for path in doomed:
        if os.path.abspath(path) in kept:
            continue
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        except OSError as err:
            log.warning("could not remove old checkpoint %s (%s); it will be retried at the next save", path, err)
    return removed
