"""How many checkpoints are kept: decided from the files on disk, so it survives restarts and crashes."""

from __future__ import annotations

import logging
import os
import re
import shutil

from cairn.checkpoint.commit import is_temporary

__all__ = ["PROGRESS_ORDER", "list_checkpoints", "prune"]

log = logging.getLogger(__name__)

PROGRESS_ORDER = ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")


def list_checkpoints(folder: str, pattern: re.Pattern[str]) -> list[str]:
    """Paths under ``folder`` whose relative name matches ``pattern`` (files, and sharded checkpoint folders),
    oldest first.

    Order comes from the progress numbers in the names (epoch, batch, ...), then from modification time.
    Links (such as ``latest``) and temporary files are never listed.
    """
    found: list[tuple[tuple[float, ...], str]] = []
    if not os.path.isdir(folder):
        return []
    for root, folders, files in os.walk(folder):
        sharded = [name for name in folders if os.path.isfile(os.path.join(root, name, "cairn.pt"))]
        folders[:] = [name for name in folders if name not in sharded]  # a sharded checkpoint is one entry
        for name in [*files, *sharded]:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            match = pattern.match(relative.replace(os.sep, "/"))
            if match is None or is_temporary(name) or os.path.islink(path):
                continue
            numbers = match.groupdict()
            key = tuple(float(numbers[k]) for k in PROGRESS_ORDER if numbers.get(k) is not None)
            found.append(((*key, os.path.getmtime(path)), path))
    return [path for _, path in sorted(found)]


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
