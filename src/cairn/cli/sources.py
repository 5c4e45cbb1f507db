"""Where the ``cairn ckpt`` commands read a checkpoint from: a local file or folder, or an object in a store.

Every read goes through :func:`~cairn.checkpoint.read_checkpoint` (no code runs, the content hash must match). A
URI's object is first downloaded into a private temporary folder under a fixed name: object names come from a
listing, and a name such as ``../x`` (or one holding terminal escapes) must never choose where a file lands. The
download is deleted afterwards.

An incremental checkpoint (a manifest) is read with its chunks: from the chunk folder beside it, or for a URI from
the store's chunk folder (:class:`~cairn.checkpoint.load.remote.RemoteChunks`), one at a time. Each chunk is
checked against its key as it is read; :class:`CheckedChunks` counts them, so that a command can say how many.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.incremental.chunk_folder import ChunkFolder
from cairn.checkpoint.incremental.files import ChunkSource
from cairn.checkpoint.incremental.manifest import ChunkRef, is_manifest, manifest_chunk_folder
from cairn.checkpoint.load.remote import RemoteChunks, downloaded, is_remote_sharded_folder
from cairn.checkpoint.tools.listing import checkpoint_files, peek_checkpoint, size_on_disk
from cairn.errors import CairnError, CheckpointNotFoundError, ObjectNotFoundError
from cairn.storage.base import ObjectStore
from cairn.storage.pointer import is_pointer, pointer_of, read_pointer
from cairn.storage.settings import PROGRESS_BAR_BYTES
from cairn.storage.uri import is_uri, parse_uri, store_from_uri

__all__ = ["PROGRESS_BYTES", "CheckedChunks", "LocalCopy", "Opened", "opened", "local_copy", "store_for"]

#: Reads of at least this many bytes show a progress bar on stderr (when it is a terminal).
PROGRESS_BYTES = PROGRESS_BAR_BYTES

_stores: dict[str, ObjectStore] = {}


def store_for(uri: str) -> tuple[ObjectStore, str]:
    """The store for ``uri``'s bucket (one per bucket for the whole command), and the name inside it."""
    parsed = parse_uri(uri)
    if parsed.bucket_uri not in _stores:
        _stores[parsed.bucket_uri] = store_from_uri(parsed.bucket_uri)[0]
    return _stores[parsed.bucket_uri], parsed.path


class CheckedChunks:
    """A manifest's chunks, read from ``source`` (which checks each against its key), and remembered: the chunks a
    read checked, by key, with their sizes."""

    def __init__(self, source: ChunkSource, folder: str) -> None:
        self.source = source
        self.folder = folder  #: where they are: a local folder, or a store's URI
        self.checked: dict[str, int] = {}

    def read_into(self, ref: ChunkRef, out: memoryview, source: str) -> None:
        self.source.read_into(ref, out, source)
        self.checked[ref.key] = ref.size


@dataclass(frozen=True)
class LocalCopy:
    """A local path holding a checkpoint, the name to show for it, and where a manifest's chunks come from."""

    path: str  #: local: the path given, or the temporary download of a URI (gone once the ``with`` ends)
    label: str  #: what the user named (a URI's latest pointer replaced by the object it names)
    #: the chunks of a manifest, counted as they are read; ``None`` when ``path`` is no manifest
    chunks: CheckedChunks | None

    def read(self) -> dict[str, Any]:
        """The checkpoint, read safely and verified, a manifest's chunks each checked against its key."""
        return read_checkpoint(self.path, chunks=self.chunks)


@dataclass(frozen=True)
class Opened:
    """A verified checkpoint, the local path it was read from, and the name to show for it."""

    checkpoint: dict[str, Any]
    path: str  #: local: the path given, or the temporary download of a URI (gone once the ``with`` ends)
    label: str  #: what the user named (a URI's latest pointer replaced by the object it names)
    size: int
    chunks: CheckedChunks | None = None  #: a manifest's chunks, every one read and checked


@contextlib.contextmanager
def opened(target: str, *, progress: bool) -> Iterator[Opened]:
    """Read and verify ``target`` (path or URI); errors name ``target``, never the temporary download."""
    with local_copy(target, progress=progress) as copy:
        _read_ahead(copy.path, progress=progress)
        yield Opened(copy.read(), copy.path, copy.label, size_on_disk(copy.path), copy.chunks)


@contextlib.contextmanager
def local_copy(target: str, *, progress: bool) -> Iterator[LocalCopy]:
    """A local path holding ``target``, the label to show for it, and where its chunks are if it is a manifest. A
    local path is used as it is."""
    if not is_uri(target):
        yield LocalCopy(target, target, _local_chunks(target))
        return
    store, name = store_for(target)
    name = _follow_pointer(store, name)
    label = store.get_uri(name)
    with downloaded(
        store,
        name,
        progress=progress and sys.stderr.isatty(),
        local_name="checkpoint.pt",
        folder_prefix="cairn-cli-",
        hint="cairn ckpt ls on its prefix shows what is there",
    ) as local:
        try:
            yield LocalCopy(local, label, _remote_chunks(store, name, local))
        except CairnError as err:
            raise type(err)(str(err).replace(local, label)) from None


def _peeked_manifest(path: str) -> dict[str, Any] | None:
    """The manifest at ``path``, from a cheap unverified read, or ``None`` when it is none: only to learn where its
    chunks are; the verified read comes after, and judges the file."""
    peeked = peek_checkpoint(path) if os.path.isfile(path) else None
    return peeked if is_manifest(peeked) else None


def _local_chunks(path: str) -> CheckedChunks | None:
    """The chunk folder a local manifest names, or ``None`` (no manifest, or one whose folder entry is damaged: the
    verified read says what is wrong)."""
    manifest = _peeked_manifest(path)
    if manifest is None:
        return None
    try:
        folder = manifest_chunk_folder(manifest, path)
    except CairnError:
        return None
    return CheckedChunks(ChunkFolder(folder), folder)


def _remote_chunks(store: ObjectStore, name: str, local: str) -> CheckedChunks | None:
    """The store's chunk folder, for a manifest downloaded from ``name`` to ``local``; ``None`` for anything else."""
    manifest = _peeked_manifest(local)
    if manifest is None:
        return None
    try:
        folder = store.get_uri(manifest_chunk_folder(manifest, name))
    except CairnError:
        folder = "?"  # the verified read refuses the manifest and says why
    return CheckedChunks(RemoteChunks(store, name), folder)


def _follow_pointer(store: ObjectStore, name: str) -> str:
    """``name`` itself when it is an object or a sharded folder; the object a latest pointer names when ``name`` is
    the pointer, or the latest name that the pointer stands for (``run/latest-rank0.pt`` for
    ``run/latest-rank0.pt.symlink``)."""
    if is_pointer(name):
        pointer = name
    else:
        try:
            store.get_object_size(name)
            return name
        except ObjectNotFoundError:
            if is_remote_sharded_folder(store, name):
                return name
            pointer = pointer_of(name)
    target = read_pointer(store, pointer)
    if target is None:
        raise CheckpointNotFoundError(
            f"no checkpoint at {store.get_uri(name)}: check the name (cairn ckpt ls on its prefix shows what is there)"
        )
    return target


def _read_ahead(path: str, *, progress: bool) -> None:
    """Read a large checkpoint once with a progress bar, so that the verified read after it comes from the page
    cache: a person sees it moving instead of a silent wait. Skipped for small files, with ``--no-progress``, and
    when stderr is not a terminal (nobody would see the bar; the read would be wasted)."""
    if not progress or not sys.stderr.isatty() or not os.path.exists(path):
        return
    files = checkpoint_files(path)
    total = sum(os.path.getsize(file) for file in files)
    if total < PROGRESS_BYTES:
        return
    from tqdm import tqdm

    buffer = bytearray(16 << 20)
    name = os.path.basename(path.rstrip(os.sep))
    with tqdm(total=total, desc=f"read {name}", unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        for file in files:
            with open(file, "rb", buffering=0) as stream:
                while count := stream.readinto(buffer):
                    bar.update(count)
