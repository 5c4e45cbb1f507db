"""Checkpoints in object stores: downloading one to read it, and following a store's ``latest`` pointer."""

from __future__ import annotations

import os
import posixpath
import tempfile
from typing import Any

from cairn.checkpoint.loader import read_checkpoint
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, ObjectNotFoundError
from cairn.loggers.remote_uploader_downloader import download_with_progress
from cairn.storage.base import ObjectStore

__all__ = ["read_pointer", "read_remote_checkpoint"]

_POINTER_LIMIT = 4096  # a pointer holds one object name


def read_remote_checkpoint(store: ObjectStore, name: str, *, progress: bool = True) -> dict[str, Any]:
    """Download ``name`` to a private temporary folder, verify and read it, and delete the download."""
    with tempfile.TemporaryDirectory(prefix="cairn-download-") as folder:
        local = os.path.join(folder, _local_name(name))
        try:
            download_with_progress(store, name, local, overwrite=False, progress=progress)
        except ObjectNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint at {store.get_uri(name)}: check the name (list the bucket to see what is there)"
            ) from None
        checkpoint = read_checkpoint(local)
    return checkpoint


def _local_name(name: str) -> str:
    """The object's own base name when it is a plain one (errors then name the file the user knows), else a fixed
    one: a listing or pointer may hold ``..`` or control characters, which must never choose where a file lands."""
    base = posixpath.basename(name)
    return base if base not in ("", ".", "..") and base.isprintable() else "checkpoint.pt"


def read_pointer(store: ObjectStore, pointer: str) -> str | None:
    """The object name a ``latest`` pointer names, or None when the store has no pointer yet."""
    with tempfile.TemporaryDirectory(prefix="cairn-pointer-") as folder:
        local = os.path.join(folder, "pointer")
        try:
            if store.get_object_size(pointer) > _POINTER_LIMIT:
                raise CheckpointCorruptError(f"{store.get_uri(pointer)} is too large to be a latest pointer")
            store.download_object(pointer, local)
        except ObjectNotFoundError:
            return None
        with open(local, encoding="utf-8", errors="replace") as file:
            target = file.read().strip()
    if not target or target.startswith("/") or ".." in target.split("/") or "\n" in target:
        raise CheckpointCorruptError(f"{store.get_uri(pointer)} does not hold an object name: {target[:100]!r}")
    return target
