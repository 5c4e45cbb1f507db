"""Looking at checkpoints without training: what a folder or bucket prefix holds, and what one checkpoint holds.

Two questions come up when a run misbehaves: *which checkpoints are there, and which one would a resume pick?*
(:func:`list_checkpoints_at`) and *what is inside this one?* (:func:`summarize`). Both serve ``cairn ckpt ls`` and
``cairn ckpt show`` and are plain functions for Python users.

Listing reads as little as it can. A local file is opened with ``torch.load(weights_only=True, mmap=True)``: only
its small pickled structure is read (tensors stay on disk) and its hash is *not* checked, so a listing costs
milliseconds per checkpoint whatever its size; ``cairn ckpt verify`` is the command that checks. A listed object in
a store is not downloaded at all: its size comes from the store's listing (one request per page of names, none per
object) and its epoch and batch from its name.

An incremental checkpoint (a manifest whose large tensors are chunks in the saver's chunk folder) is listed with
its *own* bytes (the manifest, and the chunks no other manifest of that chunk folder names: what deleting it
would free) and its *shared* bytes (chunks other manifests name too): :func:`chunk_sharing`. A full checkpoint's
own bytes are its size. In a store these stay unknown: telling them needs every manifest there.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cairn.atomic import is_temporary
from cairn.checkpoint.folder import folder_entries
from cairn.checkpoint.format import is_sharded, is_weights_only
from cairn.checkpoint.incremental.garbage import References, UnreadableManifest, referenced_chunks
from cairn.checkpoint.incremental.manifest import is_manifest
from cairn.checkpoint.load.archive import check_archive
from cairn.checkpoint.save.retention import PROGRESS_KEYS, RetentionCandidate, RetentionRules, reasons_to_keep
from cairn.checkpoint.shards import is_sharded_folder
from cairn.errors import CairnError, CheckpointNotFoundError, ObjectNotFoundError
from cairn.names import CHUNK_FOLDER, LOADER_STATES, METADATA_FILE
from cairn.storage.base import ObjectStore
from cairn.storage.pointer import is_pointer, latest_name_of, read_pointer
from cairn.utils.text import human_size

__all__ = [
    "CheckpointSummary",
    "ChunkSharing",
    "Listing",
    "ListedCheckpoint",
    "ModuleSize",
    "checkpoint_files",
    "checkpoint_kind",
    "chunk_sharing",
    "list_checkpoints_at",
    "list_local_checkpoints",
    "list_remote_checkpoints",
    "model_tensor_sizes",
    "peek_checkpoint",
    "progress_from_name",
    "recorded_metric_names",
    "retention_reasons",
    "size_on_disk",
    "summarize",
]

#: A file with one of these suffixes is listed even when it cannot be read (as ``unreadable``), so that damage is
#: seen; any other file that is not a checkpoint is left out of a listing.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")

_PROGRESS_KEYS = ("epoch", "batch", "sample", "token")


# -- listing ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedCheckpoint:
    """One checkpoint in a listing. Fields that could not be learnt cheaply are ``None``."""

    name: str  #: relative to the listed folder or prefix, ``/``-separated; for display only
    location: str  #: a local path or a URI, to pass to ``cairn ckpt show`` or :func:`~cairn.checkpoint.read_checkpoint`
    kind: str  #: ``full``, ``weights-only``, ``sharded``, ``unreadable`` (a damaged file) or ``?`` (not read)
    size: int | None  #: bytes (a sharded folder: all its files)
    created_at: float | None  #: when the run wrote it (the checkpoint's metadata), else the file's mtime
    epoch: int | None
    batch: int | None
    latest: tuple[str, ...] = ()  #: the ``latest`` links or pointers that name it
    modified: float | None = field(default=None, compare=False, repr=False)  #: the file's mtime (local only)
    progress: tuple[int, ...] = field(default=(), compare=False, repr=False)  #: epoch, batch, sample, token
    #: the metric values the run recorded in it when saving (``best_metric``), by logged name; local only
    metrics: Mapping[str, float] = field(default_factory=dict, compare=False)
    #: the progress counts it records (epoch, batch, batch_in_epoch, ...), or those its name holds in a store
    counts: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    #: a manifest whose tensors are in a chunk folder; ``None`` when not known (a store's, an unreadable file)
    incremental: bool | None = field(default=None, compare=False)
    #: bytes only this checkpoint holds: its size, or a manifest's size plus the chunks no other manifest names
    own: int | None = field(default=None, compare=False)
    #: a manifest's chunks that other manifests name too (0 for a full checkpoint); ``None`` when not known
    shared: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Listing:
    """Checkpoints newest first, and anything worth telling about the listing itself (a broken pointer)."""

    entries: list[ListedCheckpoint]
    notes: list[str]


def list_checkpoints_at(target: str, *, recursive: bool = False) -> Listing:
    """The checkpoints in a local folder, or under a ``scheme://bucket/prefix`` URI, newest first.

    Newest means furthest in training (epoch, batch, sample, token), then most recently written. A path or URI that
    names one checkpoint lists just that one, as ``ls`` does with a file.
    """
    from cairn.storage.uri import is_uri, store_from_uri

    if not is_uri(target):
        return list_local_checkpoints(target, recursive=recursive)
    store, path = store_from_uri(target)
    try:
        return list_remote_checkpoints(store, path, recursive=recursive)
    finally:
        store.close()


def list_local_checkpoints(folder: str, *, recursive: bool = False) -> Listing:
    """Files torch can open as cairn checkpoints, and sharded checkpoint folders, in ``folder``.

    Symlinks are never listed themselves: a link (such as ``latest-rank0.pt``) marks the checkpoint it points to.
    Temporary files of unfinished writes are skipped.
    """
    if os.path.isfile(folder) or is_sharded_folder(folder):
        entry = _local_entry(os.path.basename(folder.rstrip(os.sep)), folder)
        entries, notes = _with_sharing([entry] if entry else [])
        return Listing(entries, notes)
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(f"no folder or checkpoint at {folder!r}: check the path")
    candidates, links = _scan(folder, recursive=recursive)
    entries = [entry for path in candidates if (entry := _local_entry(_relative(path, folder), path))]
    latest: dict[str, list[str]] = {}
    for link in links:
        latest.setdefault(os.path.realpath(link), []).append(_relative(link, folder))
    entries = [_with_latest(e, latest.get(os.path.realpath(e.location), [])) for e in entries]
    entries, notes = _with_sharing(entries)
    return Listing(_newest_first(entries), notes)


def _scan(folder: str, *, recursive: bool) -> tuple[list[str], list[str]]:
    """Candidate checkpoint paths and symlinks under ``folder``; a sharded folder is one candidate. A folder that
    cannot be read is an error (a listing that silently left it out would mislead)."""
    candidates: list[str] = []
    links: list[str] = []
    for entry in folder_entries(folder, recursive=recursive, on_error=_raise):
        if _in_chunk_folder(entry.path, folder):
            continue  # chunks are parts of checkpoints, never checkpoints themselves
        if entry.kind == "link":
            links.append(entry.path)
        elif entry.kind in ("file", "sharded"):
            candidates.append(entry.path)
    return candidates, links


def _raise(error: OSError) -> None:
    raise error


def _in_chunk_folder(path: str, folder: str) -> bool:
    return CHUNK_FOLDER in _relative(path, folder).split("/")


def _relative(path: str, folder: str) -> str:
    return os.path.relpath(path, folder).replace(os.sep, "/")


def _local_entry(name: str, path: str) -> ListedCheckpoint | None:
    checkpoint = peek_checkpoint(path)
    size = size_on_disk(path)
    if checkpoint is None:
        if not name.endswith(CHECKPOINT_SUFFIXES):
            return None  # some other file: a log, a config
        modified = os.path.getmtime(path)
        return ListedCheckpoint(name, path, "unreadable", size, modified, None, None, modified=modified)
    state = checkpoint["state"]
    timestamp = state.get("timestamp") if isinstance(state.get("timestamp"), dict) else {}
    created = state["metadata"].get("created_at")
    modified = os.path.getmtime(path)
    progress = tuple(_count(timestamp.get(key)) for key in _PROGRESS_KEYS)
    recorded = state["metadata"].get("progress")
    counts = recorded if isinstance(recorded, dict) else timestamp
    return ListedCheckpoint(
        name=name,
        location=path,
        kind=checkpoint_kind(checkpoint),
        size=size,
        created_at=float(created) if _is_number(created) else modified,
        epoch=_count(timestamp.get("epoch"), None),
        batch=_count(timestamp.get("batch"), None),
        modified=modified,
        progress=progress,
        metrics=_recorded_metrics(state["metadata"].get("metrics")),
        counts={key: counts[key] for key in PROGRESS_KEYS if _count(counts.get(key), None) is not None},
        incremental=is_manifest(checkpoint),
        own=None if is_manifest(checkpoint) else size,
        shared=None if is_manifest(checkpoint) else 0,
    )


def _recorded_metrics(metrics: Any) -> dict[str, float]:
    """The metric values a checkpoint recorded (``metadata["metrics"]``), numbers only: the file is not verified."""
    if not isinstance(metrics, dict):
        return {}
    return {str(name): float(value) for name, value in metrics.items() if _is_number(value)}


def recorded_metric_names(listing: Listing) -> list[str]:
    """Every metric name the listed checkpoints recorded, sorted."""
    return sorted({name for entry in listing.entries for name in entry.metrics})


def retention_reasons(listing: Listing, rules: RetentionRules, *, metric: str | None) -> dict[str, tuple[str, ...]]:
    """Why the retention ``rules`` would keep each listed checkpoint (by location), in the words of
    :func:`~cairn.checkpoint.save.retention.reasons_to_keep`; an empty tuple: a save under these rules would delete
    it. ``metric`` is the recorded metric the best are ranked by. A link or pointer whose name starts with ``best``
    counts as the ``best`` link, any other as ``latest``. All the listed checkpoints are ranked together, as one
    saver's would be: list one saver's folder.

    A store's listing downloads nothing, so the values its checkpoints recorded are unknown there: with a ``best``
    rule, one that nothing else keeps gets ``?`` (the saver, which reads the values, may keep it), never a
    verdict the listing cannot back."""
    candidates = [
        RetentionCandidate(
            name=entry.location,
            order=(*entry.progress, entry.created_at or 0.0, entry.modified or 0.0),
            progress=entry.counts,
            value=None if metric is None else entry.metrics.get(metric),
        )
        for entry in listing.entries
    ]
    reasons = reasons_to_keep(candidates, rules)
    found = {entry.location: (*_link_labels(entry.latest), *reasons[entry.location]) for entry in listing.entries}
    if rules.best > 0:
        for entry in listing.entries:
            if not found[entry.location] and _value_unknown_here(entry):
                found[entry.location] = (UNKNOWN,)
    return found


#: why a store's checkpoint may be kept, when the listing cannot tell: its recorded value is not read there
UNKNOWN = "?"


def _value_unknown_here(entry: ListedCheckpoint) -> bool:
    """A checkpoint in a store: its metadata (so its recorded values) is not read by a listing."""
    return not entry.metrics and "://" in entry.location


def _link_labels(links: Iterable[str]) -> list[str]:
    labels = {"best" if posixpath.basename(link).startswith("best") else "latest" for link in links}
    return sorted(labels, key=("latest", "best").index)


def peek_checkpoint(path: str) -> dict[str, Any] | None:
    """A checkpoint's structure, read cheaply and safely but *not verified*; ``None`` when it is not a checkpoint.

    Tensors are memory-mapped, not read, and the content hash is not checked: use it to describe, never to trust.
    For a sharded folder this is its ``cairn.pt`` (the tensors are in the shards).
    """
    file = os.path.join(path, METADATA_FILE) if os.path.isdir(path) else path
    if not _is_plain_torch_archive(file):
        return None
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - damage can surface as almost any exception; the file is then unreadable
        return None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("state"), dict):
        return None
    if not isinstance(loaded["state"].get("metadata"), dict):
        return None
    return loaded


def _is_plain_torch_archive(path: str) -> bool:
    """What torch writes, checked as the loader checks it: a listing never inflates a zip bomb or parses an
    old-style pickle."""
    try:
        return os.path.isfile(path) and check_archive(path)
    except CairnError:
        return False


def checkpoint_files(path: str) -> list[str]:
    """The files a checkpoint's bytes are in: the file itself, or a sharded folder's regular files (links not
    followed), sorted."""
    if not os.path.isdir(path):
        return [path]
    with os.scandir(path) as scan:
        return sorted(item.path for item in scan if item.is_file(follow_symlinks=False))


def size_on_disk(path: str) -> int:
    """A checkpoint's bytes on disk (a sharded folder: all its files); 0 when nothing is at ``path``."""
    return sum(os.path.getsize(file) for file in checkpoint_files(path)) if os.path.exists(path) else 0


def list_remote_checkpoints(store: ObjectStore, prefix: str, *, recursive: bool = False) -> Listing:
    """The checkpoints under ``prefix`` in ``store``, without downloading any of them.

    A store cannot say what an object holds without a download, so checkpoints are told by their names: objects
    ending in ``.pt``, ``.pth`` or ``.ckpt`` (the others are counted in a note), and sharded folders (a prefix
    holding ``cairn.pt``, listed as one checkpoint of kind ``sharded`` with the size of all its files). ``kind`` is
    otherwise ``?``, ``created_at`` is ``None``, and epoch and batch come from the name (``ep3``, ``ba24``) where it
    has them. A latest pointer (``<name>.symlink``) marks the object it names; temporary names are skipped.
    Incremental checkpoints' chunks (objects in a ``.cairn-chunks`` folder) are not checkpoints: a note says how
    many there are and their bytes; which checkpoint owns which is not known without downloading every manifest.
    """
    folder = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    sizes = dict(store.list_objects_with_sizes(folder))  # the listing's own sizes: no request per object
    chunk_notes = _chunk_folder_notes(store, sizes, folder, recursive=recursive)
    sizes = {name: size for name, size in sizes.items() if not _is_chunk_object(name)}
    names = sorted(sizes)
    if not names and prefix and not prefix.endswith("/"):
        return _single_object(store, prefix)
    if prefix and not prefix.endswith("/") and folder + METADATA_FILE in sizes:  # the prefix is one sharded folder
        shown = posixpath.basename(prefix.rstrip("/"))
        return Listing([_remote_entry(store, prefix.rstrip("/"), shown, (), sum(sizes.values()), "sharded")], [])
    folders = _remote_sharded_folders(sizes, folder, recursive=recursive)
    names = [name for name in names if not any(name.startswith(f"{inside}/") for inside in folders)]
    if not recursive:
        names = [name for name in names if "/" not in name[len(folder) :]]
    pointers = [name for name in names if is_pointer(name)]
    objects = [name for name in names if name.endswith(CHECKPOINT_SUFFIXES) and not is_temporary(name)]
    latest, notes = _pointer_targets(store, pointers, folder)
    others = [name for name in names if not is_pointer(name) and not name.endswith(CHECKPOINT_SUFFIXES)]
    if others:
        endings = ", ".join(CHECKPOINT_SUFFIXES)
        notes.append(f"{len(others)} other object(s) not listed: their names do not end in {endings}")
    entries = [
        _remote_entry(store, name, name[len(folder) :], tuple(latest.get(name, ())), sizes[name]) for name in objects
    ]
    entries += [
        _remote_entry(store, name, name[len(folder) :], tuple(latest.get(name, ())), size, "sharded")
        for name, size in folders.items()
    ]
    return Listing(_newest_first(entries), [*notes, *chunk_notes])


def _is_chunk_object(name: str) -> bool:
    return CHUNK_FOLDER in name.split("/")[:-1]


def _chunk_folder_notes(store: ObjectStore, sizes: Mapping[str, int], folder: str, *, recursive: bool) -> list[str]:
    """One note per chunk folder in ``folder`` (with ``recursive``, under it): how many chunks it holds, and their
    bytes."""
    found: dict[str, list[int]] = {}
    for name, size in sizes.items():
        if _is_chunk_object(name) and not is_temporary(name) and not posixpath.basename(name).startswith("."):
            parts = name.split("/")
            last = max(i for i, part in enumerate(parts[:-1]) if part == CHUNK_FOLDER)
            chunk_folder = "/".join(parts[: last + 1])
            if not recursive and chunk_folder != folder + CHUNK_FOLDER:
                continue
            totals = found.setdefault(chunk_folder, [0, 0])
            totals[0] += 1
            totals[1] += size
    return [
        f"{store.get_uri(chunk_folder)}/ holds {count} chunk(s), {human_size(total)}, of incremental checkpoints; "
        "a store listing does not read manifests, so their own and shared bytes are unknown here"
        for chunk_folder, (count, total) in sorted(found.items())
    ]


def _remote_sharded_folders(sizes: Mapping[str, int], folder: str, *, recursive: bool) -> dict[str, int]:
    """The sharded checkpoint folders under ``folder`` (each a prefix holding ``cairn.pt``, which is uploaded last,
    so only complete ones), with the bytes of everything under them; with ``recursive`` off, only those directly
    under ``folder``."""
    found: dict[str, int] = {}
    for name in sizes:
        inside = name[: -len(METADATA_FILE) - 1]
        if not name.endswith(f"/{METADATA_FILE}") or not inside.startswith(folder) or inside == folder.rstrip("/"):
            continue
        if recursive or "/" not in inside[len(folder) :]:
            found[inside] = 0
    for name, size in sizes.items():
        for inside in found:
            if name.startswith(f"{inside}/"):
                found[inside] += size
    return found


def _single_object(store: ObjectStore, name: str) -> Listing:
    try:
        entry = _remote_entry(store, name, posixpath.basename(name), (), store.get_object_size(name))
    except ObjectNotFoundError:
        raise CheckpointNotFoundError(f"nothing at {store.get_uri(name)}: check the bucket and prefix") from None
    return Listing([entry], [])


def _pointer_targets(
    store: ObjectStore, pointers: Iterable[str], folder: str
) -> tuple[dict[str, list[str]], list[str]]:
    """Which object each latest pointer names (pointer names shown without ``.symlink``), and broken pointers."""
    targets: dict[str, list[str]] = {}
    notes: list[str] = []
    for pointer in pointers:
        try:
            target = read_pointer(store, pointer)
        except CairnError as err:
            notes.append(str(err))
            continue
        if target is not None:
            targets.setdefault(target, []).append(latest_name_of(pointer)[len(folder) :])
    return targets, notes


def _remote_entry(
    store: ObjectStore, name: str, shown: str, latest: tuple[str, ...], size: int, kind: str = "?"
) -> ListedCheckpoint:
    epoch, batch = progress_from_name(name)
    counts = {key: value for key, value in (("epoch", epoch), ("batch", batch)) if value is not None}
    return ListedCheckpoint(
        name=shown,
        location=store.get_uri(name),
        kind=kind,
        size=size,
        created_at=None,
        epoch=epoch,
        batch=batch,
        latest=latest,
        progress=(_count(epoch), _count(batch)),
        counts=counts,
    )


_EPOCH_IN_NAME = re.compile(r"(?<![A-Za-z])ep(\d+)(?!\d)")
_BATCH_IN_NAME = re.compile(r"(?<![A-Za-z])ba(\d+)(?!\d)")


def progress_from_name(name: str) -> tuple[int | None, int | None]:
    """Epoch and batch as cairn's default names carry them (``ep3-ba24-rank0.pt``), from the last path part."""
    base = posixpath.basename(name)
    epoch, batch = _EPOCH_IN_NAME.search(base), _BATCH_IN_NAME.search(base)
    return (int(epoch.group(1)) if epoch else None, int(batch.group(1)) if batch else None)


def _with_latest(entry: ListedCheckpoint, links: list[str]) -> ListedCheckpoint:
    if not links:
        return entry
    return dataclasses.replace(entry, latest=tuple(sorted(links)))


def _newest_first(entries: list[ListedCheckpoint]) -> list[ListedCheckpoint]:
    """Furthest in training first; among equals (a checkpoint and its converted copy), the latest written."""
    return sorted(entries, key=lambda e: (e.progress, e.created_at or 0.0, e.modified or 0.0, e.name), reverse=True)


def _count(value: Any, default: int | None = -1) -> Any:
    """An unverified progress number, or ``default`` when it is not a non-negative int."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- incremental checkpoints: own and shared bytes ----------------------------------------------------------------


@dataclass(frozen=True)
class ChunkSharing:
    """An incremental checkpoint's chunks, and how many of them other manifests of its chunk folder name too.

    Its *own* bytes are what deleting it would free (the manifest, and the chunks nobody else names); its
    *shared* bytes stay on disk for the others. Chunks are counted once each, however often the manifest names one.
    """

    folder: str  #: the chunk folder (resolved), or a store's URI for it
    manifest_bytes: int
    chunks: int  #: distinct chunks the manifest names
    chunk_bytes: int
    shared_chunks: int | None  #: ``None``: not known (a manifest in a store)
    shared_bytes: int | None

    @property
    def own_bytes(self) -> int | None:
        if self.shared_bytes is None:
            return None
        return self.manifest_bytes + self.chunk_bytes - self.shared_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "chunk_folder": self.folder,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "manifest_bytes": self.manifest_bytes,
            "own_bytes": self.own_bytes,
            "shared_bytes": self.shared_bytes,
            "shared_chunks": self.shared_chunks,
        }


def chunk_sharing(paths: Iterable[str]) -> tuple[dict[str, ChunkSharing], list[str]]:
    """For each of ``paths`` that is a manifest: its :class:`ChunkSharing`, from every manifest under the folder
    that holds its chunk folder (each read once, unverified, as :func:`peek_checkpoint` reads). Also notes about
    files there that could not be read: chunks only they might name count as own.

    Other paths (full checkpoints, files that cannot be read) are left out of the answer, and so are manifests
    whose chunk folder is not there: their chunks are all missing (``cairn ckpt verify`` says so), and the folder
    above it, which a damaged or hostile manifest may place anywhere up to ``/``, is not walked."""
    references = References()
    uses: dict[str, tuple[str, dict[str, int]]] = {}
    for path in paths:
        try:
            use = references.of(path)
        except (UnreadableManifest, OSError):
            continue
        if use.folder is not None and os.path.isdir(use.folder):
            uses[path] = (use.folder, use.chunks)
    named_by_folder: dict[str, dict[str, set[str]]] = {}
    notes: list[str] = []
    found = {}
    for path, (folder, chunks) in uses.items():
        if folder not in named_by_folder:
            named_by_folder[folder] = _manifests_naming(folder, references, notes)
        mine = os.path.realpath(path)
        elsewhere = set().union(*(keys for other, keys in named_by_folder[folder].items() if other != mine))
        shared = {key: size for key, size in chunks.items() if key in elsewhere}
        found[path] = ChunkSharing(
            folder=folder,
            manifest_bytes=os.path.getsize(path),
            chunks=len(chunks),
            chunk_bytes=sum(chunks.values()),
            shared_chunks=len(shared),
            shared_bytes=sum(shared.values()),
        )
    return found, notes


def _manifests_naming(folder: str, references: References, notes: list[str]) -> dict[str, set[str]]:
    """Every manifest under the saver folder holding the chunk folder ``folder`` that keeps its chunks there (by
    resolved path), with the keys it names; a file there that cannot be read is noted and passed over."""

    def note(path: str) -> None:
        notes.append(f"{path} could not be read: chunks that only it might name are counted as own bytes")

    named = referenced_chunks(os.path.dirname(folder), references, on_unreadable=note)
    return {os.path.realpath(path): set(chunks) for path, chunks in named.items()}


def _with_sharing(entries: list[ListedCheckpoint]) -> tuple[list[ListedCheckpoint], list[str]]:
    """The listed manifests with their own and shared bytes filled in (left unknown where they cannot be told)."""
    manifests = [entry.location for entry in entries if entry.incremental]
    if not manifests:
        return entries, []
    sharing, notes = chunk_sharing(manifests)
    filled = []
    for entry in entries:
        known = sharing.get(entry.location) if entry.incremental else None
        if known is not None:
            entry = dataclasses.replace(entry, own=known.own_bytes, shared=known.shared_bytes)
        filled.append(entry)
    return filled, notes


# -- one checkpoint -----------------------------------------------------------------------------------------------


def checkpoint_kind(checkpoint: Mapping[str, Any]) -> str:
    """``sharded`` (a folder of shards), ``weights-only`` (model and metadata) or ``full`` (everything to resume)."""
    if is_sharded(dict(checkpoint)):
        return "sharded"
    return "weights-only" if is_weights_only(dict(checkpoint)) else "full"


@dataclass(frozen=True)
class ModuleSize:
    """Elements and bytes of the tensors under one top-level module (parameters and buffers alike)."""

    parameters: int
    bytes: int


@dataclass(frozen=True)
class CheckpointSummary:
    """What ``cairn ckpt show`` prints; :meth:`to_json` gives its ``--json`` form (keys documented in docs/cli.md)."""

    source: str
    kind: str
    weights_only: bool
    size: int | None
    created_at: float | None
    run_name: str | None
    timestamp: dict[str, Any]
    versions: dict[str, Any]
    world_size: int | None
    modules: dict[str, ModuleSize]
    optimizers: list[str]
    schedulers: list[str]
    rng_ranks: int
    content_hash: str
    #: the data-loader state each rank saved (the names of its stateful parts; empty for a rank with none)
    loader_parts: list[list[str]] = field(default_factory=list)
    shard_files: int = 0  #: a sharded folder: files vouched for by digests in its ``cairn.pt`` (the index included)
    #: an incremental checkpoint: its chunks, and how many of them other checkpoints share
    incremental: ChunkSharing | None = None
    chunks_checked: int = 0  #: an incremental checkpoint: chunks read and checked against their keys

    @property
    def parameters(self) -> int:
        return sum(size.parameters for size in self.modules.values())

    @property
    def parameter_bytes(self) -> int:
        return sum(size.bytes for size in self.modules.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "weights_only": self.weights_only,
            "size_bytes": self.size,
            "created_at": self.created_at,
            "run_name": self.run_name,
            "timestamp": self.timestamp,
            "versions": self.versions,
            "world_size": self.world_size,
            "modules": {name: {"parameters": s.parameters, "bytes": s.bytes} for name, s in self.modules.items()},
            "parameters": self.parameters,
            "parameter_bytes": self.parameter_bytes,
            "optimizers": self.optimizers,
            "schedulers": self.schedulers,
            "rng": {"present": self.rng_ranks > 0, "ranks": self.rng_ranks},
            "data_loader": {"ranks": len(self.loader_parts), "parts": self.loader_parts},
            "incremental": None if self.incremental is None else self.incremental.to_json(),
            "hash": {
                "value": self.content_hash,
                "status": "ok",
                "shard_files": self.shard_files,
                "chunks": self.chunks_checked,
            },
        }


def summarize(
    checkpoint: Mapping[str, Any],
    *,
    source: str,
    size: int | None = None,
    tensor_sizes: Mapping[str, tuple[int, int]] | None = None,
    incremental: ChunkSharing | None = None,
    chunks_checked: int = 0,
) -> CheckpointSummary:
    """Describe a checkpoint that :func:`~cairn.checkpoint.read_checkpoint` returned (so its hash was verified).

    ``tensor_sizes`` (name -> elements, bytes) describes the model when its tensors are elsewhere: a sharded
    folder's are in its shards (:func:`model_tensor_sizes` reads them from the shard index). Optimizer names of a
    sharded folder come from ``parameter_names`` in its metadata, since their state is in the shards too.
    ``incremental`` describes a manifest's chunks (:func:`chunk_sharing`), ``chunks_checked`` how many the read
    checked against their keys.
    """
    state = checkpoint["state"]
    metadata = state["metadata"]
    if tensor_sizes is None:
        tensor_sizes = {name: _tensor_size(t) for name, t in (state.get("model") or {}).items()}
    in_shards = metadata.get("parameter_names") if is_sharded(dict(checkpoint)) else None
    optimizers = state.get("optimizers") or in_shards or {}
    return CheckpointSummary(
        source=source,
        kind=checkpoint_kind(checkpoint),
        weights_only=bool(metadata.get("weights_only")) or is_weights_only(dict(checkpoint)),
        size=size,
        created_at=metadata["created_at"] if _is_number(metadata.get("created_at")) else None,
        run_name=state["run_name"] if isinstance(state.get("run_name"), str) else None,
        timestamp=dict(state.get("timestamp") or {}),
        versions={
            "cairn": metadata.get("cairn_version"),
            "torch": metadata.get("torch_version"),
            "format": metadata.get("format_version"),
        },
        world_size=_count(metadata.get("world_size"), None),
        modules=_by_module(tensor_sizes),
        optimizers=[str(key) for key in optimizers],
        schedulers=[str(key) for key in state.get("schedulers") or {}],
        rng_ranks=len(checkpoint.get("rng") or []),
        content_hash=metadata["content_hash"],
        loader_parts=_loader_parts(state.get("dataset_state")),
        shard_files=len(metadata.get("shards") or {}) if is_sharded(dict(checkpoint)) else 0,
        incremental=incremental,
        chunks_checked=chunks_checked,
    )


def _loader_parts(position: Any) -> list[list[str]]:
    """Which parts of each rank's data loader saved their state (``dataset_state["loader_states"]``)."""
    states = position.get(LOADER_STATES) if isinstance(position, dict) else None
    if not isinstance(states, list):
        return []
    return [sorted(str(part) for part in state) if isinstance(state, dict) else [] for state in states]


def _tensor_size(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.numel(), tensor.numel() * tensor.element_size()


def _by_module(tensor_sizes: Mapping[str, tuple[int, int]]) -> dict[str, ModuleSize]:
    """Sizes summed per top-level module: the first part of each state-dict name (``encoder`` of ``encoder.0.w``)."""
    totals: dict[str, list[int]] = {}
    for name, (elements, nbytes) in tensor_sizes.items():
        total = totals.setdefault(name.split(".", 1)[0], [0, 0])
        total[0] += elements
        total[1] += nbytes
    return {name: ModuleSize(elements, nbytes) for name, (elements, nbytes) in totals.items()}


def model_tensor_sizes(folder: str) -> dict[str, tuple[int, int]]:
    """A sharded folder's model tensors (name -> elements, bytes), from its shard index alone: no shard is read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from cairn.checkpoint.load.shard_index import read_shard_index  # torch.distributed.checkpoint is slow to import

    sizes = {}
    for key, meta in read_shard_index(folder).state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            elements = math.prod(meta.size)
            sizes[key.removeprefix("model.")] = (elements, elements * meta.properties.dtype.itemsize)
    return sizes
