"""Writing a checkpoint as a manifest and its chunks, and reading one back whole.

Order is what makes a save safe: every chunk the manifest names is in the folder, fsynced, before the manifest is
written (atomically, like any checkpoint), and the folder's lock is held shared from the first chunk to the
published manifest, so that no collection can take a chunk in between. A kill at any moment leaves at worst chunks
that no manifest names yet, which the next collection removes.
"""

from __future__ import annotations

import logging
import os
import zipfile
from typing import Any, Protocol

import torch

from cairn.checkpoint.incremental.chunk_folder import ChunkFolder, Written
from cairn.checkpoint.incremental.manifest import (
    ChunkRef,
    UnreadableManifest,
    assembled_bytes,
    chunked_tensors,
    is_manifest,
    manifest_chunk_folder,
    split,
    without_chunks,
)
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.errors import CheckpointCorruptError
from cairn.names import CHUNK_FOLDER
from cairn.utils.text import human_size

__all__ = ["ChunkSource", "assemble", "chunk_folder_of", "peek_manifest", "write_incremental"]

log = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"


class ChunkSource(Protocol):
    """Where a reader finds a manifest's chunks: a local :class:`ChunkFolder`, or a store's (downloaded on demand)."""

    def read_into(self, ref: ChunkRef, out: memoryview, source: str) -> None: ...


def chunk_folder_of(root: str) -> ChunkFolder:
    """The chunk folder of a saver whose folder is ``root``."""
    return ChunkFolder(os.path.join(root, CHUNK_FOLDER))


def write_incremental(checkpoint: dict[str, Any], path: str, *, root: str, overwrite: bool = True) -> Written:
    """Write ``checkpoint`` (CPU tensors, not yet hashed) as a manifest at ``path`` whose chunks live in ``root``'s
    chunk folder; only the chunks the folder lacks are written."""
    folder = chunk_folder_of(root)
    relative = os.path.relpath(folder.path, os.path.dirname(path) or ".").replace(os.sep, "/")
    manifest, pieces = split(checkpoint, folder=relative)
    seal(manifest)
    with folder.saving():
        written = folder.write_missing(pieces)
        write_checkpoint(manifest, path, overwrite=overwrite)
    log.info(
        "incremental checkpoint %s: wrote %d new chunks (%s), reused %d (%s)",
        path,
        written.chunks,
        human_size(written.bytes),
        written.reused,
        human_size(written.reused_bytes),
    )
    return written


def assemble(manifest: dict[str, Any], path: str, chunks: ChunkSource | None = None) -> dict[str, Any]:
    """The whole checkpoint a verified manifest at ``path`` stands for, every chunk checked as it is read (from
    ``chunks``, else the chunk folder the manifest names beside the file ``path`` leads to: a ``latest`` link may
    sit in another folder than its manifest)."""
    tensors = chunked_tensors(manifest, path)
    _refuse_more_than_memory(assembled_bytes(tensors), path)
    source = chunks if chunks is not None else ChunkFolder(manifest_chunk_folder(manifest, os.path.realpath(path)))
    filled = {}
    for tensor in tensors:
        filled[tensor.index] = value = torch.empty(tensor.shape, dtype=tensor.dtype)
        view = memoryview(value.reshape(-1).view(torch.uint8).numpy())
        offset = 0
        for ref in tensor.chunks:
            source.read_into(ref, view[offset : offset + ref.size], path)
            offset += ref.size
    return without_chunks(manifest, tensors, filled, path)


def peek_manifest(path: str) -> dict[str, Any] | None:
    """The manifest stored in the file ``path``, as plain data and unverified (only its structure is read: tensors
    stay on disk), or None for any other file: not a torch archive (a zip of something else included), or a full
    checkpoint. Raises :class:`UnreadableManifest` for a torch archive that cannot be read: it may be a manifest.
    How collection, ``cairn ckpt ls`` and store retention learn which chunks a file names."""
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise
    except OSError as err:  # a file this process may not read: which chunks it names is unknown
        raise UnreadableManifest(f"{path} ({err.strerror})") from None
    if magic != _ZIP_MAGIC:
        return None  # torch.save has written zip archives since torch 1.6
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("/data.pkl") for name in archive.namelist()):
                return None  # a zip of something else (a dataset beside the checkpoints)
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - damage surfaces as almost any exception
        raise UnreadableManifest(f"{path} ({err})") from None
    return loaded if is_manifest(loaded) else None


def _refuse_more_than_memory(total: int, path: str) -> None:
    """A manifest may name one chunk many times (a tensor of zeros does), so a small file can claim any size: one
    that claims more than the machine's memory is refused before anything is allocated."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if total > memory:
        raise CheckpointCorruptError(
            f"{path!r} claims tensors of {human_size(total)}, more than this machine's memory "
            f"({human_size(memory)}); it is damaged or hostile, or needs a larger machine"
        )
