"""Checkpoints in object stores: downloading one into a private temporary folder to read it.

A sharded checkpoint in a store is the prefix ``<name>/`` holding the folder's files; its ``cairn.pt`` is uploaded
last, so a prefix with a ``cairn.pt`` is a complete folder, and that file says which shard files belong to it.
Loaded into a model, such a folder is not downloaded whole: ``cairn.pt`` and the shard index come first, verified,
and each rank then fetches only the shard files its own load plan reads (:class:`RemoteShards`). The tools, which
need all of it, download it whole (:func:`download_sharded_folder`).

The transfer itself is the storage layer's (:func:`~cairn.storage.transfer.download_with_progress`); the store's
``latest`` pointer is :mod:`cairn.storage.pointer`'s, and the save-time checks of a store's names are
:mod:`cairn.checkpoint.save.store_names`'."""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cairn.atomic import NAME_MAX
from cairn.checkpoint.format import file_digest
from cairn.checkpoint.incremental.manifest import ChunkRef, chunk_key
from cairn.checkpoint.load.loader import read_checkpoint
from cairn.checkpoint.save.remote_chunks import store_chunk_folder
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, ObjectNotFoundError
from cairn.names import METADATA_FILE, SHARD_INDEX_FILE
from cairn.storage.base import ObjectStore
from cairn.storage.transfer import download_with_progress
from cairn.utils.dist import get_rank
from cairn.utils.text import printable

__all__ = [
    "RemoteChunks",
    "RemoteShards",
    "download_sharded_folder",
    "downloaded",
    "is_remote_sharded_folder",
    "opened_remote_checkpoint",
    "read_remote_checkpoint",
]

log = logging.getLogger(__name__)

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
    store: ObjectStore,
    name: str,
    *,
    progress: bool = True,
    keep_damaged: Callable[[str], object] | None = None,
    shards_on_demand: bool = False,
    for_resume: bool = False,
) -> Iterator[tuple[dict[str, Any], str | RemoteShards]]:
    """As :func:`read_remote_checkpoint`, and the local download too, kept until the ``with`` ends: a sharded
    folder's shards are read from it when the checkpoint is applied to a model.

    With ``shards_on_demand`` (loading into a model), a sharded folder comes as :class:`RemoteShards`: only its
    ``cairn.pt`` and shard index are downloaded and verified here, and each rank fetches the shard files its own
    load plan reads when the checkpoint is applied. With ``for_resume`` (the caller applies it whole), a single
    file's optimizer state is copied out while the download is read, as for a local file (:func:`read_checkpoint`)."""
    with downloaded(store, name, progress=progress, whole_folder=not shards_on_demand) as local:
        opened: str | RemoteShards = local
        try:
            if shards_on_demand and os.path.isdir(local):  # a sharded folder: only the files a plan reads are fetched
                checkpoint, opened = _open_remote_shards(store, name, local, progress=progress)
            else:
                checkpoint = read_checkpoint(local, chunks=RemoteChunks(store, name), for_resume=for_resume)
        except CheckpointCorruptError:
            if keep_damaged is not None:
                keep_damaged(local)
            raise
        yield checkpoint, opened


@contextlib.contextmanager
def downloaded(
    store: ObjectStore,
    name: str,
    *,
    progress: bool,
    local_name: str | None = None,
    folder_prefix: str = "cairn-download-",
    hint: str = "list the bucket to see what is there",
    whole_folder: bool = True,
) -> Iterator[str]:
    """The local path of a download of ``name`` into a private temporary folder, deleted when the ``with`` ends.

    The file is called ``local_name``, else the object's own base name where it is a plain one; a missing object is
    a :class:`~cairn.errors.CheckpointNotFoundError` whose message ends with ``hint``. A sharded folder is
    downloaded whole; without ``whole_folder``, the local folder is made empty, for the caller to fill.
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
            if whole_folder:
                download_sharded_folder(store, name, local, progress=progress)
            else:
                os.mkdir(local)
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
    recorded = _read_folder_metadata(store, name, local)["state"]["metadata"].get("shards")
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


def _read_folder_metadata(store: ObjectStore, name: str, local: str) -> dict[str, Any]:
    """The folder's ``cairn.pt``, downloaded into ``local`` and verified (its content hash vouches for the shards'
    recorded digests)."""
    metadata_file = os.path.join(local, METADATA_FILE)
    download_with_progress(store, posixpath.join(name, METADATA_FILE), metadata_file, overwrite=False, progress=False)
    return read_checkpoint(metadata_file)


def _open_remote_shards(
    store: ObjectStore, name: str, local: str, *, progress: bool
) -> tuple[dict[str, Any], RemoteShards]:
    """The sharded folder ``name``'s ``cairn.pt``, and the folder as :class:`RemoteShards`, with its index
    downloaded into the empty folder ``local`` and checked; no shard file is fetched yet."""
    checkpoint = _read_folder_metadata(store, name, local)
    digests = checkpoint["state"]["metadata"].get("shards")
    uri = store.get_uri(name)
    names = _shard_names(digests, uri)
    if SHARD_INDEX_FILE not in names:
        raise CheckpointCorruptError(
            f"{uri}/{METADATA_FILE} records no digest of its shard index, so the shards cannot be verified; it was "
            "not written by this version of cairn: load an earlier checkpoint"
        )
    shards = RemoteShards(store, name, local, digests, _listed_sizes(store, name, names), progress=progress)
    shards.check_index()
    return checkpoint, shards


def _listed_sizes(store: ObjectStore, name: str, names: list[str]) -> dict[str, int]:
    """The size of each recorded file of the folder ``name``, from one listing of its prefix; a recorded file the
    store does not hold is refused before anything else is downloaded."""
    prefix = name.rstrip("/") + "/"
    listed = {
        object_name[len(prefix) :]: size
        for object_name, size in store.list_objects_with_sizes(prefix)
        if object_name.startswith(prefix)
    }
    for shard in names:
        if shard not in listed:
            raise CheckpointCorruptError(
                f"{store.get_uri(name)} is missing its shard {shard!r}: the folder is incomplete or was tampered "
                "with; load an earlier checkpoint"
            )
    return {shard: listed[shard] for shard in names}


class RemoteShards:
    """A sharded folder in a store, being loaded into a model: ``cairn.pt`` and the shard index are in ``folder``
    (a private temporary folder) already, verified; each shard file is fetched into it only when this rank's load
    plan reads from it (:class:`~cairn.checkpoint.load.shard_index.SafeReader` asks), and checked against the size
    the store listed and the digest ``cairn.pt`` recorded before any of its bytes are read.

    Only the names ``cairn.pt`` records, each checked to be a plain file name, are ever fetched: no name from the
    store chooses where a file lands."""

    def __init__(
        self,
        store: ObjectStore,
        name: str,
        folder: str,
        digests: dict[str, str],
        sizes: dict[str, int],
        *,
        progress: bool,
    ) -> None:
        self.store, self.name, self.progress = store, name, progress
        self._folder, self._digests, self._sizes = folder, digests, sizes
        self._fetched: set[str] = set()

    @property
    def folder(self) -> str:
        return self._folder

    @property
    def label(self) -> str:
        return self.store.get_uri(self.name)

    @property
    def sizes(self) -> dict[str, int]:
        return self._sizes

    def check_index(self) -> None:
        """Fetch the shard index, verified, and check it: every file it names is one ``cairn.pt`` recorded, and
        every entry lies inside the size the store lists for its file."""
        from cairn.checkpoint.load.shard_index import read_shard_index, recorded_shard_files  # slow to import

        self._fetch_one(SHARD_INDEX_FILE)
        index = read_shard_index(self._folder, sizes=self._sizes)
        recorded_shard_files(self.label, index, self._digests)

    def fetch(self, names: Iterable[str]) -> None:
        """Fetch each file of ``names`` not fetched yet, each verified; say which this rank fetched, and which it
        did not need."""
        wanted = sorted(set(names) - self._fetched)
        for shard in wanted:
            self._fetch_one(shard)
        if wanted:
            unread = sorted(set(self._digests) - self._fetched)
            log.info(
                "rank %d fetched shard files %s of folder %s; its load plan reads nothing from %s",
                get_rank(),
                [printable(shard) for shard in wanted],
                self.label,
                [printable(shard) for shard in unread],
            )

    def _fetch_one(self, shard: str) -> None:
        if shard not in self._digests or shard == METADATA_FILE:
            raise CheckpointCorruptError(
                f"the shard index of {self.label} names {printable(shard)!r}, which {METADATA_FILE} does not record; "
                "the folder was tampered with: load an earlier checkpoint"
            )
        local, uri = os.path.join(self._folder, shard), self.store.get_uri(posixpath.join(self.name, shard))
        try:
            download_with_progress(
                self.store, posixpath.join(self.name, shard), local, overwrite=False, progress=self.progress
            )
        except ObjectNotFoundError:
            raise CheckpointCorruptError(
                f"{self.label} is missing its shard {shard!r}: the folder is incomplete or was tampered with; load "
                "an earlier checkpoint"
            ) from None
        if not self._holds_recorded_bytes(shard, local):
            os.remove(local)  # never read: the folder is private, and this name is never fetched again
            raise CheckpointCorruptError(
                f"{uri} fails its digest: its bytes are not those {METADATA_FILE} recorded when the folder was "
                "written (damage, or an object replaced in the store); load an earlier checkpoint"
            )
        self._fetched.add(shard)

    def _holds_recorded_bytes(self, shard: str, local: str) -> bool:
        """The download is a regular file of the listed size and of the digest ``cairn.pt`` recorded."""
        info = os.lstat(local)
        if not stat.S_ISREG(info.st_mode) or info.st_size != self._sizes[shard]:
            return False
        return file_digest(local) == self._digests[shard]


class RemoteChunks:
    """Where a manifest downloaded from a store finds its chunks: the store's chunk folder, resolved from the
    manifest's name in the store (``manifest_name``) and the folder the manifest records
    (:func:`~cairn.checkpoint.save.remote_chunks.store_chunk_folder`). A :class:`ChunkSource` for
    :func:`~cairn.checkpoint.read_checkpoint`: each chunk is downloaded into a private temporary file, checked
    against its size and key, read into the tensor's memory and deleted. Chunks are fetched one at a time, as they
    are read, so a load needs no disk beyond the largest chunk."""

    def __init__(self, store: ObjectStore, manifest_name: str) -> None:
        self.store, self.manifest_name = store, manifest_name
        self._folder: str | None = None

    def folder(self, manifest_path: str) -> str:
        """The chunk folder in the store (a name), read once from the verified manifest at ``manifest_path``."""
        if self._folder is None:
            import torch

            loaded = torch.load(manifest_path, map_location="cpu", weights_only=True, mmap=True)
            self._folder = store_chunk_folder(self.manifest_name, loaded["chunks"].get("folder"))
        return self._folder

    def read_into(self, ref: ChunkRef, out: memoryview, source: str) -> None:
        name = f"{self.folder(source)}/{ref.key}"
        uri = self.store.get_uri(name)
        try:
            size = self.store.get_object_size(name)  # asked first: an object of any other size is never downloaded
        except ObjectNotFoundError:
            raise self._bad_chunk(ref, uri, "is missing from the store") from None
        if size != ref.size:
            raise self._bad_chunk(ref, uri, "has another size than the manifest records")
        with tempfile.TemporaryDirectory(prefix="cairn-chunk-") as private:
            local = os.path.join(private, ref.key)
            try:
                download_with_progress(self.store, name, local, overwrite=False, progress=False)
            except ObjectNotFoundError:
                raise self._bad_chunk(ref, uri, "is missing from the store") from None
            with open(local, "rb", buffering=0) as file:
                if os.fstat(file.fileno()).st_size != ref.size:
                    raise self._bad_chunk(ref, uri, "has another size than the manifest records")
                read = file.readinto(out)
        if read != ref.size or chunk_key(out) != ref.key:
            raise self._bad_chunk(ref, uri, "does not match its key (its bytes changed after it was uploaded)")

    def _bad_chunk(self, ref: ChunkRef, uri: str, why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"{self.store.get_uri(self.manifest_name)} is incomplete: its chunk {ref.key} ({uri}) {why}. The "
            "store's chunk folder was damaged or pruned by hand; load an earlier checkpoint (autoresume falls back "
            "to one by itself)"
        )


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
