"""Uploading a sharded checkpoint folder: every rank its own shard files, then rank 0 the folder's ``cairn.pt``.

In a store, a sharded checkpoint is the prefix ``<name>/`` holding the folder's files, and it is complete when its
``cairn.pt`` is there (the loader reads ``cairn.pt`` first and then exactly the files it records). So ``cairn.pt``
goes up last: only once every rank has reported its own shard files uploaded and verified does rank 0 upload it,
and the store's ``latest`` pointer moves with that upload. A folder missing a shard is never named by the pointer,
and a run killed half-way leaves at worst a prefix without ``cairn.pt``, which nothing reads.

Every rank registers the folder on its training thread when the save is taken, so every rank's list of folders in
flight is the same, in the same order; each rank's uploads start once the folder is published (at once for a
synchronous save, from the saver's background thread for an asynchronous one) and are attached to that record. The
ranks settle at the same later moments (each checkpoint event, and the end of ``fit``) and match folders by position;
a folder whose uploads have not started on some rank is still pending there. An upload that failed on any rank fails
the folder on every rank, naming rank and file; the local folder is kept, as with a single file.

At a checkpoint event the ranks compare notes inside the Trainer's one agreement (:mod:`cairn.trainer.agreement`):
each folder adds three integers to its ``all_reduce(MAX)`` (:class:`UploadNotes`), enough to tell a folder stored
by every rank from one still uploading or forgotten everywhere. Only when some rank reports a failure do the ranks
gather their statuses (:func:`~cairn.utils.dist.all_gather_object`), so that every rank raises the same error,
naming the rank and its reason. At the end of ``fit``, and for a saver no Trainer settles, they gather statuses.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import posixpath
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cairn.core.logger import transfers_among
from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.names import METADATA_FILE
from cairn.utils.dist import all_gather_object, broadcast_object, get_rank, get_world_size

if TYPE_CHECKING:
    from cairn.core.logger import Logger

__all__ = ["FolderUpload", "ShardedUploads", "UploadNotes", "own_shard_files"]

_PENDING, _DONE, _DROPPED = "pending", "done", "dropped"
_NOT_FAILED = (_PENDING, _DONE, _DROPPED)  #: any other status is the failure of one file
_Verdict = str | tuple[int, str]  #: what the ranks' notes say of a folder: a status above, or (rank, its failure)

#: a folder's slots among the agreement's integers, each the MAX over the ranks: 1 where some rank has not stored
#: all its shards, where some rank failed, where some rank still knows the folder (has not dropped it)
_NOT_STORED, _FAILED, _KNOWN = range(3)
_SLOTS = 3

_SHARD_FILE = re.compile(r"__(0|[1-9][0-9]*)_[0-9]+\.distcp", re.ASCII)  # DCP's name for rank r's shards


def own_shard_files(folder: str, rank: int, world_size: int) -> list[str]:
    """The files of ``folder`` that ``rank`` uploads: the shards DCP wrote for it (``__<rank>_<n>.distcp``), and on
    rank 0 the shard index and every other file, a name DCP might give in another version or a rank this run does
    not have included, so that each file has exactly one uploader (never ``cairn.pt``, which goes up last)."""
    names = sorted(name for name in os.listdir(folder) if name != METADATA_FILE)
    return [name for name in names if _uploader_of(name, world_size) == rank]


def _uploader_of(name: str, world_size: int) -> int:
    """The rank that uploads the file ``name``: the shard's own rank, else rank 0."""
    match = _SHARD_FILE.fullmatch(name)
    shard_rank = int(match.group(1)) if match else 0
    return shard_rank if shard_rank < world_size else 0


@dataclass
class FolderUpload:
    """One sharded folder on its way to the store, as this rank sees it: registered on the training thread when
    the save is taken; its uploads are attached once the folder is published (maybe on the background thread)."""

    folder: str  #: the local folder
    remote: str  #: its name in the store (before the uploader's own prefix)
    pointer: str | None
    overwrite: bool
    refusal: ObjectExistsError | None = None  #: found at registration, raised when the uploads would start
    uploads: list[tuple[str, cf.Future[str]]] | None = None  #: (file, upload) for this rank's own files, once started
    failure: str | None = None  #: why starting this rank's uploads failed (file and error)
    dropped: bool = False  #: never published, or refused: nothing of it goes up
    settled: cf.Future[str] = field(default_factory=cf.Future)  #: done once the whole folder is in the store

    def status(self) -> str:
        """``pending``, ``done``, ``dropped``, or why it failed (the first failed file and its error)."""
        if self.failure is not None:
            return self.failure
        if self.dropped:
            return _DROPPED
        if self.uploads is None:
            return _PENDING  # the folder is not published yet (an async save still writing)
        for name, upload in self.uploads:
            if upload.done() and (upload.cancelled() or upload.exception() is not None):
                reason = "cancelled" if upload.cancelled() else str(upload.exception())
                return f"{name}: {reason}"
        return _DONE if all(upload.done() for _, upload in self.uploads) else _PENDING


@dataclass(frozen=True)
class UploadNotes:
    """The folders in flight at one moment, with three integers for each (``_NOT_STORED``, ``_FAILED``,
    ``_KNOWN``): this rank's (:meth:`ShardedUploads.notes`), or the MAX over every rank's once the agreement has
    reduced them (:meth:`agreed`). Every rank lists the same folders in the same order (registered at the same
    save, removed by the same settle), so the integers line up across ranks."""

    records: tuple[FolderUpload, ...]
    slots: tuple[int, ...]

    def agreed(self, slots: Sequence[int]) -> UploadNotes:
        """The same folders with every rank's integers reduced."""
        if len(slots) != len(self.slots):
            raise ValueError(f"{len(slots)} agreed integers for {len(self.records)} folders in flight")
        return UploadNotes(self.records, tuple(slots))

    def verdicts(self) -> list[_Verdict]:
        """Per folder, from reduced integers: ``done`` (every rank stored its shards), ``dropped`` (every rank
        forgot it), else ``pending``. A failure anywhere needs the statuses themselves (:meth:`any_failed`)."""
        verdicts: list[_Verdict] = []
        for start in range(0, len(self.slots), _SLOTS):
            not_stored, known = self.slots[start + _NOT_STORED], self.slots[start + _KNOWN]
            verdicts.append(_DONE if not not_stored else _DROPPED if not known else _PENDING)
        return verdicts

    @property
    def any_failed(self) -> bool:
        return any(self.slots[_FAILED::_SLOTS])


def _slots_of(status: str) -> tuple[int, int, int]:
    """One rank's integers for a folder of ``status``, ordered as ``_NOT_STORED``, ``_FAILED``, ``_KNOWN``."""
    return int(status != _DONE), int(status not in _NOT_FAILED), int(status != _DROPPED)


class ShardedUploads:
    """The sharded folders a saver has handed to the run's uploaders, until each is whole in the store.

    The list of folders changes on the training thread alone (registered at the save, removed when settled), so
    it is the same on every rank; the background thread only attaches uploads to a folder, under the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[FolderUpload] = []

    @property
    def in_flight(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def register(
        self, logger: Logger, folder: str, remote: str, *, pointer: str | None, overwrite: bool
    ) -> FolderUpload:
        """Every rank, on the training thread, when the save of ``folder`` is taken (before it is published).

        Shard files replace what a prefix holds without its ``cairn.pt`` (the leftovers of a run killed mid-upload,
        which a resumed run saves again); a complete folder of that name is replaced only with ``overwrite``. That
        is asked here (a collective, which the training thread alone may run) and the refusal kept: it is raised
        when the uploads would start, once the folder is written and kept locally.
        """
        refusal = None if overwrite else _complete_folder_refusal(logger, remote)
        record = FolderUpload(folder, remote, pointer, overwrite, refusal=refusal)
        with self._lock:
            self._pending.append(record)
        return record

    def start(self, logger: Logger, record: FolderUpload) -> None:
        """Every rank, once ``record``'s folder is published (now, or on the saver's background thread): start
        uploading this rank's own files of it. A refusal found at registration is raised here, on every rank. A
        file that cannot be handed to the uploaders fails the folder on every rank at the next settle."""
        if record.refusal is not None:
            self.drop(record, record.refusal)
            raise record.refusal
        uploads: list[tuple[str, cf.Future[str]]] = []
        failure = None
        current = record.folder
        try:
            for current in own_shard_files(record.folder, get_rank(), get_world_size()):
                source = os.path.join(record.folder, current)
                started = logger.upload_file(posixpath.join(record.remote, current), source, True)
                uploads += [(current, upload) for upload in started]
        except Exception as err:  # noqa: BLE001 - reported by settle, on every rank
            failure = f"{current}: {type(err).__name__}: {err}"
        with self._lock:
            record.uploads, record.failure = uploads, failure

    def drop(self, record: FolderUpload, reason: BaseException) -> None:
        """Every rank alike, when ``record``'s folder will not go up (its write failed, or the store refused it):
        the next settle forgets it, and the saver keeps what is left of it locally (``settled`` failed)."""
        with self._lock:
            record.dropped = True
        if not record.settled.done():
            record.settled.set_exception(reason)

    def notes(self) -> UploadNotes:
        """This rank's notes on the folders in flight now, for the agreement's one collective (every rank, at the
        same moment before a checkpoint event; no folder in flight gives no integers, and no collective is added)."""
        with self._lock:
            records = tuple(self._pending)
            slots = tuple(slot for record in records for slot in _slots_of(record.status()))
        return UploadNotes(records, slots)

    def settle(self, logger: Logger, *, wait: bool, agreed: UploadNotes | None = None) -> None:
        """Every rank, at the same moments: compare notes on the folders in flight. A folder whose shards every
        rank has stored gets its ``cairn.pt`` (rank 0, moving the pointer); one that failed anywhere raises on
        every rank. ``agreed`` is every rank's notes, reduced by the agreement before this checkpoint event: no
        collective runs here unless they report a failure (then the statuses are gathered, for its message).
        Without them, or with ``wait``, the statuses are gathered. With ``wait``, this rank's uploads are waited for
        first (the end of ``fit``, once every background write has finished, so every folder's uploads started)."""
        if agreed is not None and not wait:
            if not agreed.records:
                return
            if not agreed.any_failed:
                self._conclude(logger, agreed.records, agreed.verdicts())
                return
            records = list(agreed.records)  # the folders noted, as on every rank: their failure is gathered
        else:
            with self._lock:
                records = list(self._pending)
            if not records:
                return
        if wait:
            with self._lock:
                started = [upload for record in records for _, upload in record.uploads or ()]
            cf.wait(started)
        with self._lock:
            mine = [record.status() for record in records]
        statuses = all_gather_object(mine)  # outside the lock: the background may attach uploads meanwhile
        verdicts = [_verdict_of([ranks_statuses[index] for ranks_statuses in statuses]) for index in range(len(mine))]
        self._conclude(logger, records, verdicts)

    def _conclude(self, logger: Logger, records: Sequence[FolderUpload], verdicts: Sequence[_Verdict]) -> None:
        """Act on what every rank's notes say, the same on every rank: finish the folders stored everywhere,
        forget those dropped everywhere, fail those that failed anywhere (raising the first failure); the rest,
        and folders registered since the notes were taken, stay in flight."""
        concluded: set[int] = set()
        failure: ObjectStoreError | None = None
        for record, verdict in zip(records, verdicts, strict=True):
            if verdict == _PENDING:
                continue
            concluded.add(id(record))
            if isinstance(verdict, tuple):
                failure = failure or _folder_failed(record, *verdict)
                if not record.settled.done():  # a folder this rank dropped has its own reason already
                    record.settled.set_exception(failure)
            elif verdict == _DONE:
                self._finish(logger, record)
        with self._lock:
            self._pending = [record for record in self._pending if id(record) not in concluded]
        if failure is not None:
            raise failure

    def _finish(self, logger: Logger, record: FolderUpload) -> None:
        """Every shard is stored: rank 0 uploads ``cairn.pt`` (the pointer moves once it is verified)."""
        if get_rank() != 0:
            record.settled.set_result(record.remote)
            return
        uploads = logger.upload_file(
            posixpath.join(record.remote, METADATA_FILE),
            os.path.join(record.folder, METADATA_FILE),
            record.overwrite,
            record.pointer,
            pointer_target=record.remote,
        )
        _settle_when_done(record.settled, uploads, record.remote)


def _complete_folder_refusal(logger: Logger, remote: str) -> ObjectExistsError | None:
    """Every rank: the :class:`~cairn.errors.ObjectExistsError` to raise when a store already holds a complete
    folder of this name, else None (rank 0 asks each store once; the answer is shared, so every rank stops alike)."""
    found = None
    if get_rank() == 0:
        for transfers in transfers_among(logger.destinations):
            name = transfers.remote_name(posixpath.join(remote, METADATA_FILE))
            try:
                transfers.store.get_object_size(name)
            except ObjectNotFoundError:
                continue
            found = transfers.store.get_uri(transfers.remote_name(remote))
            break
    found = broadcast_object(found)
    if found is None:
        return None
    return ObjectExistsError(
        f"{found} already holds a complete sharded checkpoint and save_overwrite=False never replaces one, so "
        "this folder was not uploaded (it is kept): pass save_overwrite=True to replace it, or give this run "
        "another run_name or remote file name"
    )


def _settle_when_done(settled: cf.Future[str], uploads: list[cf.Future[str]], remote: str) -> None:
    """Resolve ``settled`` like the last of ``uploads`` (their failures are the uploaders' to raise)."""
    if not uploads:
        settled.set_result(remote)
        return

    def done(_: cf.Future[str]) -> None:
        if all(upload.done() for upload in uploads) and not settled.done():
            errors = [upload.exception() for upload in uploads if not upload.cancelled() and upload.exception()]
            if errors:
                settled.set_exception(errors[0])  # type: ignore[arg-type]
            else:
                settled.set_result(remote)

    for upload in uploads:
        upload.add_done_callback(done)


def _verdict_of(column: Sequence[str]) -> _Verdict:
    """What every rank's status of one folder says: its first failed rank and why, ``done`` where every rank
    stored its shards, ``dropped`` where every rank forgot it, else ``pending``."""
    failed = [(rank, status) for rank, status in enumerate(column) if status not in _NOT_FAILED]
    if failed:
        return failed[0]
    if all(status == _DONE for status in column):
        return _DONE
    return _DROPPED if all(status == _DROPPED for status in column) else _PENDING


def _folder_failed(record: FolderUpload, rank: int, status: str) -> ObjectStoreError:
    return ObjectStoreError(
        f"uploading the sharded checkpoint {record.folder!r} failed on rank {rank} ({status}); its cairn.pt was not "
        "uploaded and the store's latest pointer did not move, so nothing names the incomplete folder. The local "
        "folder is kept: check the store, then resume from it"
    )
