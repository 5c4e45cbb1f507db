"""Collecting the chunks no manifest names any more, and knowing which manifests name which chunks.

Retention deletes manifests; the chunks they alone named are then garbage. Which chunks are still needed is read
from the folder itself, every manifest under the saver's folder whatever its name pattern (two savers sharing a
folder share its chunks, and neither collects the other's), each read once and remembered by file identity.

Safety against a kill at any moment: collection removes only chunks that no manifest on disk names, while holding
the chunk folder's lock exclusively, which no save holds between its first chunk and its published manifest
(:mod:`~cairn.checkpoint.incremental.chunk_folder`). A manifest is deleted before its chunks are, so a kill between
the two leaves unneeded chunks (collected next time), never a manifest naming a missing one. A file that looks like
a checkpoint archive but cannot be read stops the collection (it could be a manifest): nothing is removed, and the
warning says which file.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cairn.atomic import fsync_path, is_temporary
from cairn.checkpoint.folder import FileMemo
from cairn.checkpoint.incremental.files import chunk_folder_of, peek_manifest
from cairn.checkpoint.incremental.manifest import UnreadableManifest, chunked_tensors, manifest_chunk_folder
from cairn.names import CHUNK_FOLDER, DAMAGED_MARKER, SHARD_INDEX_FILE
from cairn.utils.text import human_size

__all__ = [
    "ChunkUse",
    "References",
    "UnreadableManifest",
    "collect_garbage",
    "manifests_under",
    "read_chunk_use",
    "referenced_chunks",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkUse:
    """What one file names: the chunk folder (absolute, resolved) and each chunk's size; empty for a full
    checkpoint or any other file."""

    folder: str | None
    chunks: dict[str, int]


_NONE = ChunkUse(None, {})


class References:
    """Each file's :class:`ChunkUse`, read once per file (:class:`~cairn.checkpoint.folder.FileMemo`)."""

    def __init__(self) -> None:
        self._memo = FileMemo(read_chunk_use)

    def of(self, path: str) -> ChunkUse:
        return self._memo.get(path)


def read_chunk_use(path: str) -> ChunkUse:
    """Which chunks the file at ``path`` names. Raises :class:`UnreadableManifest` for an archive it cannot read."""
    manifest = peek_manifest(path)
    if manifest is None:
        return _NONE
    try:
        tensors = chunked_tensors(manifest, path)
        folder = os.path.realpath(manifest_chunk_folder(manifest, path))
    except Exception as err:  # noqa: BLE001 - a damaged manifest's record can fail in many ways
        raise UnreadableManifest(f"{path} ({err})") from None
    return ChunkUse(folder, {ref.key: ref.size for tensor in tensors for ref in tensor.chunks})


def manifests_under(root: str) -> Iterator[str]:
    """Every regular file under ``root`` that could be a manifest: chunk folders, temporaries, links, checkpoints
    set aside as damaged and DCP's shard files are skipped."""
    for here, folders, names in os.walk(root):
        folders[:] = [name for name in folders if name != CHUNK_FOLDER and not is_temporary(name)]
        for name in names:
            if is_temporary(name) or DAMAGED_MARKER in name or name == SHARD_INDEX_FILE or name.endswith(".distcp"):
                continue
            path = os.path.join(here, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    yield path
            except OSError:
                continue


def referenced_chunks(
    root: str, references: References | None = None, *, on_unreadable: Callable[[str], None] | None = None
) -> dict[str, dict[str, int]]:
    """For each manifest under ``root`` that keeps its chunks in ``root``'s chunk folder: the chunks it names.

    A file that may be a manifest but cannot be read raises :class:`UnreadableManifest` (collection must then
    remove nothing), unless ``on_unreadable`` is given: it is told the file's path, and the file is passed over
    (``cairn ckpt ls``, which only counts)."""
    references = references or References()
    folder = os.path.realpath(chunk_folder_of(root).path)
    found = {}
    for path in manifests_under(root):
        try:
            use = references.of(path)
        except FileNotFoundError:
            continue  # deleted while we walked
        except UnreadableManifest:
            if on_unreadable is None:
                raise
            on_unreadable(path)
            continue
        if use.folder == folder:
            found[path] = use.chunks
    return found


def collect_garbage(root: str, references: References | None = None) -> int | None:
    """Remove the chunks of ``root``'s chunk folder that no manifest under ``root`` names; return how many, or None
    when collection had to wait (a save in flight, or a file that could be a manifest could not be read)."""
    chunks = chunk_folder_of(root)
    if not os.path.isdir(chunks.path):
        return 0
    with chunks.collecting() as held:
        if not held:
            log.debug("chunk collection in %s waits: a save is writing there", chunks.path)
            return None
        try:
            named = referenced_chunks(root, references)
        except UnreadableManifest as err:
            log.warning(
                "kept every chunk in %s: %s could not be read, and it may be a manifest naming some of them; "
                "move it out of the folder if it is damaged",
                chunks.path,
                err,
            )
            return None
        live = {key for chunk_set in named.values() for key in chunk_set}
        stored = chunks.keys()
        garbage = {key: size for key, size in stored.items() if key not in live}
        removed = chunks.remove(garbage)
        if removed:
            fsync_path(chunks.path)
            log.info("removed %d unneeded chunks (%s) from %s", removed, human_size(sum(garbage.values())), chunks.path)
        return removed
