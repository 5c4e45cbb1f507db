"""Checkpoints in object stores: downloading one into a private temporary folder to read it.

The transfer itself is the storage layer's (:func:`~cairn.storage.transfer.download_with_progress`); the store's
``latest`` pointer is :mod:`cairn.storage.pointer`'s, and the save-time checks of a store's names are
:mod:`cairn.checkpoint.save.store_names`'."""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from cairn.atomic import NAME_MAX
from cairn.checkpoint.load.loader import read_checkpoint
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, ObjectNotFoundError
from cairn.storage.base import ObjectStore
from cairn.storage.transfer import download_with_progress

__all__ = ["downloaded", "read_remote_checkpoint"]


def read_remote_checkpoint(
    store: ObjectStore, name: str, *, progress: bool = True, keep_damaged: Callable[[str], object] | None = None
) -> dict[str, Any]:
    """Download ``name`` to a private temporary folder, verify and read it, and delete the download.

    A download that does not verify is handed to ``keep_damaged`` (its local path) before the
    ``CheckpointCorruptError`` is raised: the only moment its bytes are at hand, to keep a copy of them.
    """
    with downloaded(store, name, progress=progress) as local:
        try:
            return read_checkpoint(local)
        except CheckpointCorruptError:
            if keep_damaged is not None:
                keep_damaged(local)
            raise


@contextlib.contextmanager
def downloaded(
    store: ObjectStore,
    name: str,
    *,
    progress: bool,
    local_name: str | None = None,
    folder_prefix: str = "cairn-download-",
    hint: str = "list the bucket to see what is there",
) -> Iterator[str]:
    """The local path of a download of ``name`` into a private temporary folder, deleted when the ``with`` ends.

    The file is called ``local_name``, else the object's own base name where it is a plain one; a missing object is
    a :class:`~cairn.errors.CheckpointNotFoundError` whose message ends with ``hint``.
    """
    with tempfile.TemporaryDirectory(prefix=folder_prefix) as folder:
        local = os.path.join(folder, local_name or _local_name(name))
        try:
            download_with_progress(store, name, local, overwrite=False, progress=progress)
        except ObjectNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint at {store.get_uri(name)}: check the name ({hint})") from None
        yield local


def _local_name(name: str) -> str:
    """The object's own base name when it is a plain one (errors then name the file the user knows), else a fixed
    one: a listing or pointer may hold ``..`` or control characters, which must never choose where a file lands,
    and a store's names may be longer than a local file name can be."""
    base = posixpath.basename(name)
    fits = len(os.fsencode(base)) <= NAME_MAX
    return base if base not in ("", ".", "..") and base.isprintable() and fits else "checkpoint.pt"
