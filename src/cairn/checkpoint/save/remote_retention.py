"""Deleting a run's old checkpoints in its object store: what the retention rules doomed, and nothing else.

The rules (which checkpoints to keep) are decided elsewhere (:mod:`cairn.checkpoint.save.retention`); this module
lists the run's checkpoints in the store (:func:`list_store_checkpoints`) and deletes the doomed ones
(:func:`prune_store`), enforcing on its own, whatever it is handed, what must never happen in a store:

- it deletes only names this run's remote name pattern could have produced: never another run's objects, never a
  damaged copy autoresume kept aside (``<name>.damaged-...``), never a pointer object (``....symlink``);
- it never deletes the checkpoint a store pointer (``latest``, ``best``) names, read from the store just before;
- it deletes nothing until a newer checkpoint that stays is verified in the store, so the store never holds less
  to resume from than before the prune;
- a sharded folder (the prefix ``<name>/``, complete when its ``cairn.pt`` is there) loses its ``cairn.pt`` first:
  from that moment it is no complete folder, so neither a loader nor autoresume takes it, wherever a crash stops
  the rest. Its other objects follow. A folder left without ``cairn.pt`` is listed as incomplete and its objects go
  at a later prune.

A failed delete is logged with the object's URI and never raised: training goes on, and the checkpoint, still
listed, is doomed again at the next prune. The prune stops at the first failure (a store that is down or refuses
would refuse the rest too, each after its retries).

Names here are names in the store, as the store lists them: for a saver's remote file name ``n``, that is
``transfers.remote_name(n)``. Save-side code: nothing here imports ``checkpoint.load``, so the one check of a
complete folder (its ``cairn.pt`` in a listing) is made here again.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cairn.checkpoint.naming.templates import PROGRESS_ORDER
from cairn.checkpoint.save.remote_chunks import StoreChunks
from cairn.checkpoint.save.retention import (
    PROGRESS_KEYS,
    CheckpointRecord,
    RetentionCandidate,
    RetentionRules,
    best_ranking,
    deletable,
    read_record,
)
from cairn.errors import CheckpointCorruptError, ObjectStoreError
from cairn.names import DAMAGED_MARKER, METADATA_FILE, POINTER_SUFFIX, TEMP_MARKER
from cairn.storage.pointer import point_at, read_pointer
from cairn.utils.text import printable

if TYPE_CHECKING:
    from cairn.storage.base import ObjectStore
    from cairn.storage.transfer import Transfers

__all__ = [
    "MetricOf",
    "StoreCheckpoint",
    "StoreRecords",
    "StoreRetention",
    "StoreScope",
    "apply_store_retention",
    "list_store_checkpoints",
    "move_store_best",
    "prune_store",
]

log = logging.getLogger(__name__)

#: reads the metric value a checkpoint recorded when it was saved, given its name in the store (None: it recorded
#: none, so it ranks last)
MetricOf = Callable[[str], "float | None"]


@dataclass(frozen=True)
class StoreCheckpoint:
    """One of the run's checkpoints in the store, with what retention needs to judge it.

    ``name`` is the object's name (a single file) or the folder's (a sharded folder, without the trailing ``/``);
    ``progress`` the numbers in the name, epoch first (the order retention sorts by); ``sharded`` whether it is a
    folder; ``complete`` False for a folder without its ``cairn.pt`` (an upload in flight, or a delete that was cut
    short: never a checkpoint to keep or to count); ``metric`` what ``metric_of`` read (None without one).
    """

    name: str
    progress: tuple[float, ...]
    sharded: bool
    complete: bool
    metric: float | None = None


def list_store_checkpoints(
    transfers: Transfers, pattern: re.Pattern[str], prefix: str = "", *, metric_of: MetricOf | None = None
) -> list[StoreCheckpoint]:
    """The run's checkpoints in the store, oldest first (by the progress in their names, then by name), as
    :func:`cairn.checkpoint.folder.list_checkpoints` orders local files.

    ``pattern`` matches the store names the run's remote name template makes (``name_pattern`` of
    ``transfers.remote_template(template)``); ``prefix`` is where to list (``store_names.listing_prefix``; the
    whole store when empty). A name counts if it is an object matching ``pattern``, or a folder matching it
    (``<name>/...``); damaged copies, pointers and temporaries never count, whatever the pattern says.

    ``metric_of`` (optional) is called for each complete checkpoint to read the metric it recorded: reading it
    from the store means a download, so a saver may pass the values it kept when it saved, and fall back to the
    store only for checkpoints of earlier runs. Its exceptions propagate: a metric that could not be read must not
    rank a checkpoint last and get it deleted.
    """
    files: set[str] = set()
    folders: dict[str, set[str]] = {}
    for name in transfers.store.list_objects(prefix):
        if _is_ours(name, pattern):
            files.add(name)
            continue
        folder, _, member = name.rpartition("/")
        if folder and _is_ours(folder, pattern):
            folders.setdefault(folder, set()).add(member)
    found = [StoreCheckpoint(name, _progress(pattern, name), False, True) for name in files - folders.keys()]
    found += [
        StoreCheckpoint(name, _progress(pattern, name), True, METADATA_FILE in members)
        for name, members in folders.items()
    ]
    found.sort(key=lambda checkpoint: (checkpoint.progress, checkpoint.name))
    if metric_of is None:
        return found
    return [
        StoreCheckpoint(c.name, c.progress, c.sharded, c.complete, metric_of(c.name) if c.complete else None)
        for c in found
    ]


def prune_store(
    transfers: Transfers,
    doomed: Iterable[str],
    *,
    pattern: re.Pattern[str],
    verified: Collection[str],
    pointers: Collection[str] = (),
    protect: Collection[str] = (),
    before_delete: Callable[[str], object] | None = None,
) -> list[str]:
    """Delete the checkpoints named in ``doomed`` from ``transfers``' store; return the names deleted whole.

    What the caller passes, all as names in the store:

    - ``doomed``: checkpoints the retention rules gave up (a folder by its name, with or without ``/``);
    - ``pattern``: the run's remote name pattern; a doomed name it does not match in full is never touched;
    - ``verified``: checkpoints known to be complete and verified in the store: for a single file, its upload
      finished (an upload is verified before it counts as done); for a sharded folder, its ``cairn.pt``, uploaded
      last, finished. A doomed checkpoint is deleted only when one of these, newer by the progress in its name,
      stays after this prune (it is not doomed, or it is protected). So a saver passes what its finished uploads
      tell it, and a prune right after a save whose upload is still in flight deletes nothing yet;
    - ``pointers``: the store's pointer objects (``latest``, ``best``; e.g. ``transfers.remote_name(pointer)``).
      Each is read now, and the checkpoint it names is never deleted; a pointer that cannot be read (the store
      failed, or it holds no name) stops the prune, since what it protects is unknown;
    - ``protect``: checkpoints never to delete whatever else holds (uploads in flight, for instance);
    - ``before_delete``: called with each name just before it is deleted (an incremental saver reads which chunks
      a manifest names while it is still there); if it raises, the prune stops there, as after a failed delete.

    The caller moves a pointer away from a checkpoint before dooming it. Deletes run here, on the calling thread,
    one object at a time; failures are logged (with the object's URI) and the rest waits for the next prune.
    """
    store = transfers.store
    wanted = _doomed_of_ours(doomed, pattern, store)
    if not wanted:
        return []
    try:
        kept = set(_pointer_targets(store, pointers)) | {name.rstrip("/") for name in protect}
    except (ObjectStoreError, CheckpointCorruptError, OSError) as err:
        log.warning("nothing deleted from %s this time: could not read its pointers (%s)", transfers.bucket_uri, err)
        return []
    wanted = [name for name in wanted if not _named_by_any(name, kept)]
    staying = {name.rstrip("/") for name in verified} - set(wanted)
    newest_staying = max((_progress(pattern, name) for name in staying if pattern.fullmatch(name)), default=None)
    deleted = []
    for name in sorted(wanted, key=lambda name: (_progress(pattern, name), name)):
        if newest_staying is None or not _progress(pattern, name) < newest_staying:
            log.info("%s stays in the store until a newer checkpoint is verified there", store.get_uri(name))
            continue
        if before_delete is not None and not _prepared(before_delete, store, name):
            break
        if not _delete_checkpoint(store, name):
            break
        deleted.append(name)
    return deleted


def _doomed_of_ours(doomed: Iterable[str], pattern: re.Pattern[str], store: ObjectStore) -> list[str]:
    """The doomed names this run's pattern could have produced, each once; the others are named in the log (as
    text only: such a name may not even be a valid one in this store)."""
    ours = []
    for name in dict.fromkeys(name.rstrip("/") for name in doomed):
        if _is_ours(name, pattern):
            ours.append(name)
        else:
            log.warning("not deleting %r from %s: not a name of this run's checkpoints", printable(name), store)
    return ours


def _is_ours(name: str, pattern: re.Pattern[str]) -> bool:
    """Whether ``name`` is one the run's pattern produces, and none of the names kept beside checkpoints."""
    if name.endswith(POINTER_SUFFIX) or DAMAGED_MARKER in name or TEMP_MARKER in name:
        return False
    return pattern.fullmatch(name) is not None


def _progress(pattern: re.Pattern[str], name: str) -> tuple[float, ...]:
    match = pattern.fullmatch(name)
    if match is None:
        return ()
    numbers = match.groupdict()
    return tuple(float(numbers[key]) for key in PROGRESS_ORDER if numbers.get(key) is not None)


def _pointer_targets(store: ObjectStore, pointers: Collection[str]) -> list[str]:
    """What each pointer names now, without a trailing ``/``; a pointer not (yet) in the store names nothing."""
    targets = []
    for pointer in pointers:
        target = read_pointer(store, pointer)
        if target is not None:
            targets.append(target.rstrip("/"))
    return targets


def _named_by_any(name: str, targets: set[str]) -> bool:
    """Whether a pointer names ``name``, or an object inside it (a folder's ``cairn.pt``)."""
    return any(target == name or target.startswith(f"{name}/") for target in targets)


def _prepared(before_delete: Callable[[str], object], store: ObjectStore, name: str) -> bool:
    """Run ``before_delete`` for ``name``; False (logged) when it failed, and ``name`` then stays."""
    try:
        before_delete(name)
    except Exception as err:  # noqa: BLE001 - retention never stops training; the next prune tries again
        log.warning(
            "%s stays in the store this time: which chunks it names could not be read (%s)",
            printable(store.get_uri(name)),
            err,
        )
        return False
    return True


def _delete_checkpoint(store: ObjectStore, name: str) -> bool:
    """Delete the single object ``name``, or the folder ``name/`` with ``cairn.pt`` first; False after a failure,
    which is logged with the object's URI.

    Inside a folder, a damaged copy or a pointer (no save puts one there) is left alone, as everywhere.
    """
    current = name
    try:
        members = store.list_objects(f"{name}/")
        if not members:
            store.delete_object(name)
            log.info("deleted %s from the store", printable(store.get_uri(name)))
            return True
        metadata = f"{name}/{METADATA_FILE}"
        left = [member for member in members if member.endswith(POINTER_SUFFIX) or DAMAGED_MARKER in member]
        doomed = sorted(set(members) - set(left), key=lambda member: member != metadata)  # cairn.pt first
        for current in doomed:
            store.delete_object(current)
            log.debug("deleted %s", printable(store.get_uri(current)))
        log.info(
            "deleted the sharded folder %s from the store (%d objects)", printable(store.get_uri(name)), len(doomed)
        )
        if left:
            log.warning("left %s in %s: a damaged copy or a pointer is never deleted", left, store.get_uri(name))
        return True
    except (ObjectStoreError, OSError) as err:
        log.warning(
            "could not delete %s from the store (%s); training goes on, and it is tried again at the next prune",
            printable(store.get_uri(current)),
            err,
        )
        return False


# -- applying the retention rules in a store ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoreScope:
    """Where one uploader keeps the run's checkpoints, fixed when a save is taken (the names need the run's state):
    its ``transfers``, the ``pattern`` of the run's names in its store, the ``prefix`` to list them under, the
    store name of the run's ``latest`` pointer (None without one), and that of its ``best`` pointer (None unless
    ``keep_best`` and ``best_filename`` ask for one)."""

    transfers: Transfers
    pattern: re.Pattern[str]
    prefix: str
    pointer: str | None
    best_pointer: str | None = None


class StoreRecords:
    """What checkpoints of earlier runs recorded (their progress and metric values), read from the store once per
    object: the object (a sharded folder's ``cairn.pt`` alone) is downloaded into a private temporary folder, read
    and deleted. Checkpoints the saver uploaded itself need no download: it hands their records in."""

    def __init__(self) -> None:
        self._records: dict[str, CheckpointRecord] = {}
        self._lock = threading.Lock()

    def record(self, store: ObjectStore, checkpoint: StoreCheckpoint) -> CheckpointRecord:
        """The record of a complete ``checkpoint`` in ``store``; a store failure raises (the prune is then skipped:
        a value that could not be read must not rank a checkpoint last and get it deleted)."""
        name = f"{checkpoint.name}/{METADATA_FILE}" if checkpoint.sharded else checkpoint.name
        key = store.get_uri(name)
        with self._lock:
            known = self._records.get(key)
        if known is not None:
            return known
        with tempfile.TemporaryDirectory(prefix="cairn-retention-") as private:
            local = os.path.join(private, METADATA_FILE)
            store.download_object(name, local)
            found = read_record(local)
        with self._lock:
            self._records[key] = found
        return found


def apply_store_retention(
    scope: StoreScope,
    rules: RetentionRules,
    *,
    metric: str | None,
    own: Mapping[str, CheckpointRecord],
    records: StoreRecords,
    protect: Collection[str] = (),
    before_delete: Callable[[str], object] | None = None,
) -> list[str]:
    """Apply ``rules`` to the run's checkpoints in ``scope``'s store; return the store names deleted
    (``before_delete`` as :func:`prune_store` takes it).

    ``own`` holds, by store name, the records of the checkpoints this saver uploaded and saw verified (they are
    also the ``verified`` names :func:`prune_store` needs); the records of the others are read from the store
    (:class:`StoreRecords`), only when a rule needs them (``best`` or ``every``). With a ``best`` pointer in
    ``scope``, it is moved first to the best of this ranking (:func:`move_store_best`), so that the old best is
    doomed only once the pointer has left it. The pointers' targets count as links (never deleted); a folder left
    incomplete is a leftover and doomed, unless in ``protect`` (uploads in flight). Store failures raise: the
    caller logs them.
    """
    transfers, store = scope.transfers, scope.transfers.store
    listed = list_store_checkpoints(transfers, scope.pattern, scope.prefix)
    needs_records = rules.best > 0 or rules.every is not None
    candidates = _candidates(scope, listed, metric=metric, own=own, records=records, needs_records=needs_records)
    if scope.best_pointer is not None:
        move_store_best(scope, _verified(candidates, own, protect), rules.mode)
    pointers = [pointer for pointer in (scope.pointer, scope.best_pointer) if pointer is not None]
    links = {
        label: target
        for label, pointer in (("latest", scope.pointer), ("best", scope.best_pointer))
        if pointer is not None and (target := _pointer_target(store, pointer)) is not None
    }
    doomed = deletable(candidates, rules, links) + [c.name for c in listed if not c.complete]
    if not doomed:
        return []
    # the latest pointer moves only once its target is verified, so what it names counts as verified (an earlier
    # run's upload, when this run has uploaded nothing yet)
    verified = {*own, *([links["latest"]] if "latest" in links else [])}
    return prune_store(
        transfers,
        doomed,
        pattern=scope.pattern,
        verified=verified,
        pointers=pointers,
        protect=protect,
        before_delete=before_delete,
    )


def point_best_in_store(
    scope: StoreScope,
    *,
    mode: str,
    metric: str | None,
    own: Mapping[str, CheckpointRecord],
    records: StoreRecords,
) -> str | None:
    """Without store retention: move ``scope``'s ``best`` pointer to the best of the checkpoints this saver saw
    verified in the store (``own``, by store name) and the one the pointer names now (an earlier run's best, whose
    record is read from the store once); return what the pointer names after. The store is not listed whole: it
    keeps everything, and ranking every earlier checkpoint would download each of them."""
    pointer = scope.best_pointer
    if pointer is None:
        return None
    current = _pointer_target(scope.transfers.store, pointer)
    ours = [name for name in own if _is_ours(name, scope.pattern)]
    checkpoints = [StoreCheckpoint(name, _progress(scope.pattern, name), False, True) for name in ours]
    if current is not None and current not in own and _is_ours(current, scope.pattern):
        listed = list_store_checkpoints(scope.transfers, scope.pattern, current)
        checkpoints += [c for c in listed if c.name == current and c.complete]  # gone or incomplete: not ranked
    candidates = _candidates(scope, checkpoints, metric=metric, own=own, records=records, needs_records=True)
    return move_store_best(scope, candidates, mode)


def move_store_best(scope: StoreScope, candidates: list[RetentionCandidate], mode: str) -> str | None:
    """Point ``scope``'s ``best`` pointer at the best of ``candidates`` (checkpoints verified in the store, ranked
    by the value each recorded; it may move back in time, unlike ``latest``); return what it names after. Left as
    it is while none of them recorded a value."""
    pointer = scope.best_pointer
    if pointer is None:
        return None
    ranking = best_ranking(candidates, mode)
    if not ranking:
        return _pointer_target(scope.transfers.store, pointer)
    point_at(scope.transfers.store, pointer, ranking[0].name)
    return ranking[0].name


def _candidates(
    scope: StoreScope,
    checkpoints: Iterable[StoreCheckpoint],
    *,
    metric: str | None,
    own: Mapping[str, CheckpointRecord],
    records: StoreRecords,
    needs_records: bool,
) -> list[RetentionCandidate]:
    """The complete ``checkpoints`` as the rules see them: the record of each from ``own`` (this saver's uploads),
    else (only when ``needs_records``) read from the store once."""
    candidates = []
    for checkpoint in (c for c in checkpoints if c.complete):
        record = own.get(checkpoint.name)
        if record is None:
            record = records.record(scope.transfers.store, checkpoint) if needs_records else CheckpointRecord({}, {})
        progress = dict(record.progress) or _counts_in_name(scope.pattern, checkpoint.name)
        value = None if metric is None else record.metrics.get(metric)
        candidates.append(RetentionCandidate(checkpoint.name, checkpoint.progress, progress, value))
    return candidates


def _verified(
    candidates: list[RetentionCandidate], own: Mapping[str, CheckpointRecord], protect: Collection[str]
) -> list[RetentionCandidate]:
    """The candidates the ``best`` pointer may name: this saver's verified uploads, and the complete checkpoints of
    earlier runs; never one whose upload is in flight (its object may be listed before it is verified)."""
    in_flight = {name.rstrip("/") for name in protect}
    return [c for c in candidates if c.name in own or c.name not in in_flight]


def _pointer_target(store: ObjectStore, pointer: str) -> str | None:
    """What ``pointer`` names now, without a trailing ``/`` (None: no pointer yet)."""
    target = read_pointer(store, pointer)
    return None if target is None else target.rstrip("/")


def _counts_in_name(pattern: re.Pattern[str], name: str) -> dict[str, int]:
    """The progress counts a store name holds, for a checkpoint whose record says none."""
    match = pattern.fullmatch(name)
    numbers = {} if match is None else match.groupdict()
    return {key: int(number) for key, number in numbers.items() if key in PROGRESS_KEYS and number}


class StoreRetention:
    """One saver's rules applied in its stores, and what it knows there: the records of its own uploads once each
    is verified (by remote file name, as the saver names it), and what earlier runs' checkpoints recorded (read
    from the store once, :class:`StoreRecords`). Rank 0 calls :meth:`apply` after uploads settle; a failure is
    logged, never raised: training goes on, and the next call tries again."""

    def __init__(
        self, rules: RetentionRules | None, *, metric: str | None, mode: str, chunks: StoreChunks | None = None
    ) -> None:
        self._rules, self._metric, self._mode = rules, metric, mode
        self._chunks = chunks  # an incremental saver's: the chunks only deleted manifests named go after them
        self._verified: dict[str, CheckpointRecord] = {}
        self._records = StoreRecords()

    def note_verified(self, name: str, record: CheckpointRecord) -> None:
        """The saver's upload of ``name`` (its remote file name) is verified in every store; it recorded ``record``."""
        self._verified[name] = record

    def apply(self, scopes: Sequence[StoreScope], *, in_flight: Collection[str]) -> None:
        """In each scope's store: with rules (``remote_num_checkpoints_to_keep``), move the ``best`` pointer and
        delete what no rule and no pointer keeps, never an upload ``in_flight`` (remote file names), and only once
        a newer checkpoint is verified there; without, move only the ``best`` pointer (:func:`point_best_in_store`)."""
        own = dict(self._verified)
        for scope in scopes:
            in_store = scope.transfers.remote_name
            verified = {in_store(name): record for name, record in own.items()}
            if self._rules is None:
                self._point_best(scope, verified)
                continue
            chunks = self._chunks
            try:
                deleted = apply_store_retention(
                    scope,
                    self._rules,
                    metric=self._metric,
                    own=verified,
                    records=self._records,
                    protect={in_store(name) for name in in_flight},
                    before_delete=None if chunks is None else functools.partial(chunks.remember, scope.transfers),
                )
            except Exception as err:  # noqa: BLE001 - retention never stops training; the next prune tries again
                log.warning("store retention skipped in %s this time: %s", scope.transfers.bucket_uri, err)
                continue
            gone = set(deleted)
            for name in [name for name in own if in_store(name) in gone]:
                self._verified.pop(name, None)
            if chunks is not None and deleted:
                chunks.collect(scope.transfers, deleted)  # after the manifests: a kill between leaves only garbage

    def _point_best(self, scope: StoreScope, verified: Mapping[str, CheckpointRecord]) -> None:
        try:
            point_best_in_store(scope, mode=self._mode, metric=self._metric, own=verified, records=self._records)
        except Exception as err:  # noqa: BLE001 - the pointer never stops training; the next upload tries again
            log.warning("the best pointer in %s did not move this time: %s", scope.transfers.bucket_uri, err)
