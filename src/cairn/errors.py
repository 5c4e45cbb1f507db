"""Every error cairn raises on purpose: one small hierarchy, each message saying what was wrong and what to do."""

from __future__ import annotations

__all__ = [
    "CairnError",
    "CheckpointCorruptError",
    "CheckpointIncompatibleError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "ObjectExistsError",
    "ObjectNotFoundError",
    "ObjectStoreError",
    "UnsafeCheckpointError",
]


class CairnError(Exception):
    """Base class: ``except cairn.errors.CairnError`` catches every failure cairn diagnosed itself."""


class CheckpointNotFoundError(CairnError, FileNotFoundError):
    """The checkpoint named by a path or URI does not exist."""


class CheckpointCorruptError(CairnError):
    """The file is truncated, fails its content hash, or is not a cairn checkpoint."""


class CheckpointIncompatibleError(CairnError):
    """The checkpoint does not fit this run: the model or optimizer it is loaded into (the message lists every
    mismatch), the position of its data loader, or this cairn (a file written in a newer format)."""


class CheckpointWriteError(CairnError, OSError):
    """A checkpoint could not be written (a full disk, a file size limit, an unwritable folder); nothing was
    replaced, so earlier checkpoints are intact."""


class UnsafeCheckpointError(CairnError):
    """Loading the file would need pickle to run code; nothing from it was executed."""


class ObjectStoreError(CairnError):
    """An object store could not be reached or refused a request after retries."""


class ObjectNotFoundError(ObjectStoreError, FileNotFoundError):
    """The bucket exists but holds no object of that name."""


class ObjectExistsError(ObjectStoreError, FileExistsError):
    """An upload that must not replace an object (``overwrite=False``) found one of that name; nothing was replaced."""
