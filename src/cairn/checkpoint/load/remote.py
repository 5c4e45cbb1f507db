"""Checkpoints in object stores: downloading one into a private temporary folder to read it.

A sharded checkpoint in a store is the prefix ``<name>/`` holding the folder's files; its ``cairn.pt`` is uploaded
last, so a prefix with a ``cairn.pt`` is a complete folder, and that file says which shard files belong to it.

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
from cairn.names import METADATA_FILE
from cairn.storage.base import ObjectStore
from cairn.storage.transfer import download_with_progress

__all__ = [
    "download_sharded_folder",
    "downloaded",
    "is_remote_sharded_folder",
    "opened_remote_checkpoint",
    "read_remote_checkpoint",
]

#: More shard files than any job writes (one per rank, plus the index): a larger list is not one cairn wrote.
_MAX_SHARD_FILES = 1 << 20


def read_remote_checkpoint(
    store: ObjectStore, name: str, *, progress: bool = True, keep_damaged: Callable[[str], object] | None = None
) -> dict[str, Any]:
    """Download ``name`` to a private temporary folder, verify and read it, and delete the download.

    A download that does not verify is handed to ``keep_damaged`` (its local path) before the
    ``CheckpointCorruptError`` is raised: the only moment its bytes are at hand, to keep a copy of them.
    """
    with opened_remote_checkpoint(store, name, progress=progress, keep_damaged=keep_damaged) as (checkpoint, _):
        return checkpoint


@contextlib.contextmanager
def opened_remote_checkpoint(
    store: ObjectStore, name: str, *, progress: bool = True, keep_damaged: Callable[[str], object] | None = None
) -> Iterator[tuple[dict[str, Any], str]]:
    """As :func:`read_remote_checkpoint`, and the local download too, kept until the ``with`` ends: a sharded
    folder's shards are read from it when the checkpoint is applied to a model."""
    with downloaded(store, name, progress=progress) as local:
        try:
            checkpoint = read_checkpoint(local)
        except CheckpointCorruptError:
            if keep_damaged is not None:
                keep_damaged(local)
            raise
        yield checkpoint, local


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
            if not is_remote_sharded_folder(store, name):
                raise CheckpointNotFoundError(
                    f"no checkpoint at {store.get_uri(name)}: check the name ({hint})"
                ) from None
            download_sharded_folder(store, name, local, progress=progress)
        yield local


def is_remote_sharded_folder(store: ObjectStore, name: str) -> bool:
    """Whether ``name`` is a sharded checkpoint folder in the store: its ``cairn.pt`` (uploaded last) is there."""
    try:
        store.get_object_size(posixpath.join(name, METADATA_FILE))
    except ObjectNotFoundError:
        return False
    return True


def download_sharded_folder(store: ObjectStore, name: str, local: str, *, progress: bool) -> None:
    """Download the sharded folder ``name`` into the new local folder ``local``: ``cairn.pt`` first, verified, then
    exactly the files it records digests of, each under its recorded name.

    Nothing else under the prefix is fetched, and no name from the store chooses where a file lands unchecked;
    the caller's :func:`~cairn.checkpoint.read_checkpoint` of the folder then checks every shard's digest.
    """
    os.mkdir(local)
    metadata_file = os.path.join(local, METADATA_FILE)
    download_with_progress(store, posixpath.join(name, METADATA_FILE), metadata_file, overwrite=False, progress=False)
    recorded = read_checkpoint(metadata_file)["state"]["metadata"].get("shards")
    for shard in _shard_names(recorded, store.get_uri(name)):
        try:
            download_with_progress(
                store, posixpath.join(name, shard), os.path.join(local, shard), overwrite=False, progress=progress
            )
        except ObjectNotFoundError:
            raise CheckpointCorruptError(
                f"{store.get_uri(name)} is missing its shard {shard!r}: the folder is incomplete or was tampered "
                "with; load an earlier checkpoint"
            ) from None


def _shard_names(recorded: Any, uri: str) -> list[str]:
    """The shard files ``cairn.pt`` records, each a plain file name (never a path, never ``cairn.pt`` itself)."""
    if not isinstance(recorded, dict) or not recorded or len(recorded) > _MAX_SHARD_FILES:
        raise CheckpointCorruptError(
            f"{uri}/{METADATA_FILE} records no usable list of shard files; load an earlier checkpoint"
        )
    names = list(recorded)
    for shard in names:
        plain = isinstance(shard, str) and posixpath.basename(shard) == shard and "\\" not in shard
        if not plain or shard in ("", ".", "..", METADATA_FILE) or not shard.isprintable():
            raise CheckpointCorruptError(
                f"{uri}/{METADATA_FILE} names a shard file {shard!r} that is not a plain file name; the folder was "
                "tampered with: load an earlier checkpoint"
            )
        if len(os.fsencode(shard)) > NAME_MAX:
            raise CheckpointCorruptError(f"{uri}/{METADATA_FILE} names a shard file too long for a file name")
    return names


def _local_name(name: str) -> str:
    """The object's own base name when it is a plain one (errors then name the file the user knows), else a fixed
    one: a listing or pointer may hold ``..`` or control characters, which must never choose where a file lands,
    and a store's names may be longer than a local file name can be."""
    base = posixpath.basename(name)
    fits = len(os.fsencode(base)) <= NAME_MAX
    return base if base not in ("", ".", "..") and base.isprintable() and fits else "checkpoint.pt"
