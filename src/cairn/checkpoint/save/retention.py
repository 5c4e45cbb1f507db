"""How many checkpoints are kept: decided from the files on disk, so it survives restarts and crashes."""

from __future__ import annotations

import logging
import os
import re
import shutil

from cairn.checkpoint.folder import list_checkpoints

__all__ = ["prune"]

log = logging.getLogger(__name__)


def prune(folder: str, pattern: re.Pattern[str], keep: int, *, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (never ``protect``); a failed delete is logged, not fatal."""
    if keep < 0:
        return []
    checkpoints = list_checkpoints(folder, pattern)
    doomed = checkpoints[: max(len(checkpoints) - keep, 0)]
    removed = []
    for path in doomed:
        if protect is not None and os.path.abspath(path) == os.path.abspath(protect):
            continue
        try:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
        except OSError as err:
            log.warning("could not remove old checkpoint %s (%s); it will be retried at the next save", path, err)
    return removed
