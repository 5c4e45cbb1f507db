"""Incremental checkpoints in an object store: each chunk uploaded once, the manifest only after all of its chunks.

A manifest uploaded to a store keeps its chunks in the store's chunk folder: the folder the manifest records
(``.cairn-chunks``, or ``../.cairn-chunks``), resolved against the folder of the manifest's name in the store
(:func:`store_chunk_folder`). Each chunk is the object ``<chunk folder>/<key>``.

What the store holds is known without listing it per save: :class:`StoreChunks` keeps, per uploader and chunk
folder, the set of keys there, filled by one listing of the chunk folder at its first use and then kept up to date
by each verified chunk upload and each chunk this saver deletes. A save uploads only the chunks missing from that
set (a chunk another save is uploading at the moment is waited for, not uploaded twice), and its manifest goes up
only once every chunk it names is verified in the store: a manifest visible in the store never names a missing
chunk. The whole thing is one future per manifest, which the saver tracks like any upload.

Garbage: after store retention deleted manifests (:meth:`StoreChunks.collect`), the chunks those manifests named
that no manifest left in the store names, and no upload in flight relies on, are deleted; manifests always go
before their chunks, so a kill in between leaves garbage, never a manifest naming a missing chunk. Chunks that no
manifest ever named (an upload killed before its manifest) are never collected here: another process may be about
to upload the manifest naming them, and a store has no lock to tell (docs/object-stores.md says how to remove them).

Save-side code: nothing here imports ``checkpoint.load``; :mod:`cairn.checkpoint.load.remote` imports
:func:`store_chunk_folder` to read the chunks back.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import posixpath
import secrets
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cairn.checkpoint.incremental.files import peek_manifest
from cairn.checkpoint.incremental.manifest import (
    UnreadableManifest,
    chunked_tensors,
    is_manifest,
    manifest_chunk_folder,
)
from cairn.errors import CheckpointCorruptError, ObjectNotFoundError
from cairn.names import CHUNK_FOLDER, DAMAGED_MARKER, POINTER_SUFFIX, SHARD_INDEX_FILE, TEMP_MARKER
from cairn.storage.transfer import stage_file
from cairn.utils.text import printable

if TYPE_CHECKING:
    from cairn.storage.transfer import Transfers

__all__ = ["StoreChunks", "StoreManifest", "read_store_manifest", "store_chunk_folder"]

log = logging.getLogger(__name__)

def store_chunk_folder(manifest_name: str, relative: str) -> str:
    """The chunk folder, as a name in the store, of the manifest ``manifest_name`` that records ``relative``
    (``.cairn-chunks`` or ``../.cairn-chunks``); a folder above the store's root (``..`` left over) is refused."""
    folder = manifest_chunk_folder({"chunks": {"folder": relative}}, manifest_name)
    if folder == ".." or folder.startswith("../") or folder.startswith("/"):
        raise CheckpointCorruptError(
            f"the manifest {printable(manifest_name)!r} keeps its chunks in {relative!r}, which lies above the "
            "store's root from there; give the checkpoint's remote file name as many folders as its local "
            "filename has (save_remote_file_name), or save it as a full checkpoint"
        )
    return folder


@dataclass(frozen=True)
class StoreManifest:
    """What a file in the store names: its chunk folder in the store and its chunks (empty for a full checkpoint
    or any other object)."""

    folder: str | None
    chunks: frozenset[str]


_NOT_A_MANIFEST = StoreManifest(None, frozenset())


def read_store_manifest(path: str, name: str) -> StoreManifest:
    """What the local copy ``path`` of the store's object ``name`` names. Raises ``CheckpointCorruptError`` for an
    archive it cannot read: it may be a manifest, so which chunks it needs is unknown."""
    try:
        loaded = peek_manifest(path)
    except UnreadableManifest as err:
        raise CheckpointCorruptError(f"{printable(name)!r} could not be read ({err})") from None
    return _NOT_A_MANIFEST if loaded is None else manifest_of(loaded, name)


def manifest_of(loaded: Any, name: str) -> StoreManifest:
    """The :class:`StoreManifest` of a checkpoint read from the store's object ``name``."""
    if not is_manifest(loaded):
        return _NOT_A_MANIFEST
    tensors = chunked_tensors(loaded, name)
    folder = store_chunk_folder(name, loaded["chunks"].get("folder"))
    return StoreManifest(folder, frozenset(ref.key for tensor in tensors for ref in tensor.chunks))


class _Waiting:
    """One manifest's upload waiting for its chunks: when the last one settles, ``then`` runs (with the first
    failure, or None)."""

    def __init__(self, count: int, then: Callable[[BaseException | None], None]) -> None:
        self._left, self._then, self._failure = count, then, None
        self._lock = threading.Lock()
        if count == 0:
            then(None)

    def settled(self, future: cf.Future[Any]) -> None:
        error = future.exception() if not future.cancelled() else cf.CancelledError()
        with self._lock:
            if error is not None and self._failure is None:
                self._failure = error
            self._left -= 1
            done = self._left == 0
        if done:
            self._then(self._failure)


class StoreChunks:
    """One saver's chunks in its stores: which each chunk folder holds, which uploads are in flight, which chunks a
    manifest upload in flight relies on (never collected), and which chunks each manifest in the store names."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._known: dict[tuple[int, str], dict[str, int]] = {}  # (uploader, store chunk folder) -> key: size there
        self._uploading: dict[tuple[int, str], dict[str, cf.Future[str]]] = {}  # chunk uploads in flight
        self._pinned: dict[tuple[int, str], Counter[str]] = {}  # keys in-flight manifests rely on
        self._manifests: dict[tuple[int, str], tuple[int, StoreManifest]] = {}  # (uploader, object) -> (size, named)

    # -- uploads ---------------------------------------------------------------------------------------------------

    def upload(
        self,
        transfers: Transfers,
        remote_name: str,
        path: str,
        *,
        local_chunks: str,
        relative: str,
        chunks: Mapping[str, int],
        overwrite: bool,
        pointer_name: str | None,
    ) -> cf.Future[str]:
        """Upload the manifest at ``path`` as ``remote_name`` (a remote file name, as the saver names it) once each
        of its ``chunks`` (in the local folder ``local_chunks``; ``relative`` is the folder the manifest records) is
        verified in the store; return one future for the whole, which fails if any chunk upload fails.

        Runs on the saving thread: it stages the manifest and each missing chunk (by hard link) before it returns,
        as a plain upload does, so the saver may replace or collect the local files at once. The chunk folder is
        listed once, at its first use in this process."""
        folder_name, store_folder = self._chunk_folder_names(transfers, remote_name, relative)
        place = (id(transfers), store_folder)
        keys = sorted(set(chunks))
        outcome: cf.Future[str] = cf.Future()
        private = _stage_privately(transfers, path)
        with self._lock:
            known = self._known_in(transfers, store_folder)
            in_flight = self._uploading.setdefault(place, {})
            pinned = self._pinned.setdefault(place, Counter())
            pinned.update(keys)
            waits: list[cf.Future[str]] = []
            started = 0
            try:
                for key in keys:
                    if known.get(key) == chunks[key]:  # there whole: a damaged copy of another size goes up again
                        continue
                    if key not in in_flight:
                        chunk = transfers.upload(
                            f"{folder_name}/{key}", os.path.join(local_chunks, key), overwrite=True
                        )
                        in_flight[key] = chunk
                        settled = functools.partial(self._chunk_settled, place, key, chunks[key])
                        chunk.add_done_callback(settled)
                        started += 1
                    waits.append(in_flight[key])
            except BaseException:
                self._unpin(place, keys)
                _remove_quietly(private)
                raise
        log.info(
            "%s: uploading %d new chunks to %s (%d already there)",
            remote_name,
            started,
            transfers.store.get_uri(store_folder),
            len(keys) - len(waits),
        )
        size = os.path.getsize(private)

        def manifest_uploaded(done: cf.Future[str]) -> None:
            error = done.exception() if not done.cancelled() else cf.CancelledError()
            if error is None:
                named = StoreManifest(store_folder, frozenset(keys))
                with self._lock:
                    self._manifests[(id(transfers), transfers.remote_name(remote_name))] = (size, named)
            self._unpin(place, keys)
            if error is None:
                outcome.set_result(done.result())
            else:
                outcome.set_exception(error)

        def chunks_settled(failure: BaseException | None) -> None:
            try:
                if failure is not None:
                    raise failure
                manifest = transfers.upload(remote_name, private, overwrite=overwrite, pointer_name=pointer_name)
            except BaseException as err:  # noqa: BLE001 - handed to the saver through the future
                self._unpin(place, keys)
                outcome.set_exception(err)
                return
            finally:
                _remove_quietly(private)  # the upload staged its own link (or never will)
            manifest.add_done_callback(manifest_uploaded)

        waiting = _Waiting(len(waits), chunks_settled)
        for future in waits:
            future.add_done_callback(waiting.settled)
        return outcome

    def _chunk_folder_names(self, transfers: Transfers, remote_name: str, relative: str) -> tuple[str, str]:
        """The chunk folder as a remote file name (what :meth:`Transfers.upload` takes) and as the store names it
        (what a reader resolves from the manifest's name in the store); they must agree chunk by chunk."""
        folder_name = store_chunk_folder(remote_name, relative)
        store_folder = store_chunk_folder(transfers.remote_name(remote_name), relative)
        probe = "0" * 32
        if transfers.remote_name(f"{folder_name}/{probe}") != f"{store_folder}/{probe}":
            raise ValueError(
                f"the uploader's file_path_format_string={transfers.file_path_format_string!r} adds text after the "
                "remote file name, so a manifest's chunks could not be found from its name in the store; use a "
                "format string that only prefixes ('path/{remote_file_name}'), or save_incremental=False"
            )
        return folder_name, store_folder

    def _known_in(self, transfers: Transfers, store_folder: str) -> dict[str, int]:
        """The chunks in ``store_folder`` with their sizes: listed once, at first use (caller holds the lock)."""
        place = (id(transfers), store_folder)
        known = self._known.get(place)
        if known is None:
            prefix = f"{store_folder}/"
            known = {
                name[len(prefix) :]: size
                for name, size in transfers.store.list_objects_with_sizes(prefix)
                if name.startswith(prefix) and _is_chunk_name(name[len(prefix) :])
            }
            self._known[place] = known
            log.debug("%s holds %d chunks", transfers.store.get_uri(store_folder), len(known))
        return known

    def _chunk_settled(self, place: tuple[int, str], key: str, size: int, done: cf.Future[str]) -> None:
        with self._lock:
            self._uploading.get(place, {}).pop(key, None)
            if not done.cancelled() and done.exception() is None:
                self._known.setdefault(place, {})[key] = size

    def _unpin(self, place: tuple[int, str], keys: Iterable[str]) -> None:
        with self._lock:
            pinned = self._pinned.get(place)
            if pinned is not None:
                pinned.subtract(keys)
                for key in [key for key, count in pinned.items() if count <= 0]:
                    del pinned[key]

    # -- garbage ---------------------------------------------------------------------------------------------------

    def remember(self, transfers: Transfers, name: str) -> None:
        """Before store retention deletes the object ``name``: make sure which chunks it names is known (read from
        the store once, unless this saver uploaded it); raises if it cannot be read, and the object then stays."""
        with self._lock:
            if (id(transfers), name) in self._manifests:
                return
        try:
            size = transfers.store.get_object_size(name)
        except ObjectNotFoundError:
            return  # a sharded folder (no object of that name): full checkpoints, no chunks
        self._read(transfers, name, size)

    def collect(self, transfers: Transfers, deleted: Iterable[str]) -> int:
        """Delete from the store the chunks the manifests ``deleted`` (names in the store, already gone) named that
        no manifest left there names and no upload in flight relies on; return how many were deleted. A failure is
        logged: the chunks stay (garbage, never a missing chunk)."""
        doomed: dict[str, set[str]] = {}
        with self._lock:
            for name in deleted:
                entry = self._manifests.pop((id(transfers), name), None)
                if entry is not None and entry[1].folder is not None:
                    doomed.setdefault(entry[1].folder, set()).update(entry[1].chunks)
        removed = 0
        for folder, keys in doomed.items():
            try:
                removed += self._collect_in(transfers, folder, keys)
            except Exception as err:  # noqa: BLE001 - collection never stops training; the chunks stay
                log.warning(
                    "kept the chunks of deleted manifests in %s this time: %s", transfers.store.get_uri(folder), err
                )
        return removed

    def _collect_in(self, transfers: Transfers, folder: str, candidates: set[str]) -> int:
        store = transfers.store
        with self._lock:  # no upload is planned meanwhile: none can rely on a chunk about to go
            garbage = candidates - self._named_by_manifests_in(transfers, folder)
            garbage -= set(self._pinned.get((id(transfers), folder), ()))
            garbage -= set(self._uploading.get((id(transfers), folder), ()))
            known = self._known.get((id(transfers), folder))
            removed = 0
            for key in sorted(garbage):
                store.delete_object(f"{folder}/{key}")
                removed += 1
                if known is not None:
                    known.pop(key, None)
        if removed:
            log.info("deleted %d chunks no manifest names any more from %s", removed, store.get_uri(folder))
        return removed

    def _named_by_manifests_in(self, transfers: Transfers, folder: str) -> set[str]:
        """Every chunk of ``folder`` that an object in the store names: each object under the chunk folder's parent
        (the only place a manifest naming it can be) is read once per size, unless this saver uploaded it."""
        parent = posixpath.dirname(folder)
        prefix = f"{parent}/" if parent else ""
        named: set[str] = set()
        for name, size in transfers.store.list_objects_with_sizes(prefix):
            if name.startswith(f"{folder}/") or not _may_be_manifest(name):
                continue
            manifest = self._manifest(transfers, name, size)
            if manifest.folder == folder:
                named |= manifest.chunks
        return named

    def _manifest(self, transfers: Transfers, name: str, size: int) -> StoreManifest:
        known = self._manifests.get((id(transfers), name))
        if known is not None and known[0] == size:
            return known[1]
        return self._read(transfers, name, size)

    def _read(self, transfers: Transfers, name: str, size: int) -> StoreManifest:
        with tempfile.TemporaryDirectory(prefix="cairn-chunks-") as private:
            local = os.path.join(private, "object")
            transfers.store.download_object(name, local)
            manifest = read_store_manifest(local, name)
        with self._lock:
            self._manifests[(id(transfers), name)] = (size, manifest)
        if manifest.folder is not None:
            log.debug("%s names %d chunks", transfers.store.get_uri(name), len(manifest.chunks))
        return manifest


def _is_chunk_name(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _may_be_manifest(name: str) -> bool:
    """Whether an object may be a manifest: pointers, damaged copies, temporaries and a sharded folder's shard
    files never are (a sharded folder's ``cairn.pt`` is read like any object: it is small)."""
    base = posixpath.basename(name)
    if name.endswith(POINTER_SUFFIX) or DAMAGED_MARKER in name or TEMP_MARKER in name:
        return False
    return base != SHARD_INDEX_FILE and not base.endswith(".distcp") and f"/{CHUNK_FOLDER}/" not in f"/{name}"


def _stage_privately(transfers: Transfers, path: str) -> str:
    """A private link to the manifest at ``path`` (a copy where links are refused), taken now: the upload of the
    manifest starts only once its chunks are in the store, and by then a newer save may have replaced the file."""
    staged = os.path.join(transfers.staging_folder_for(path), f"{secrets.token_hex(8)}-{os.path.basename(path)}")
    stage_file(path, staged)
    return staged


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
