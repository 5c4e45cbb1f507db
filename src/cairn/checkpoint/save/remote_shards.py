"""Uploading a sharded checkpoint folder: every rank its own shard files, then rank 0 the folder's ``cairn.pt``.

In a store, a sharded checkpoint is the prefix ``<name>/`` holding the folder's files, and it is complete when its
``cairn.pt`` is there (the loader reads ``cairn.pt`` first and then exactly the files it records). So ``cairn.pt``
goes up last: only once every rank has reported its own shard files uploaded and verified does rank 0 upload it,
and the store's ``latest`` pointer moves with that upload. A folder missing a shard is never named by the pointer,
and a run killed half-way leaves at worst a prefix without ``cairn.pt``, which nothing reads.

Every rank starts its uploads at the same save and settles them at the same later moments (each checkpoint event,
and the end of ``fit``), so the one collective that compares notes (:func:`~cairn.utils.dist.all_gather_object`)
runs on every rank alike. An upload that failed on any rank fails the folder on every rank, naming rank and file;
the local folder is kept, as with a single file.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cairn.core.logger import transfers_among
from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.names import METADATA_FILE
from cairn.utils.dist import all_gather_object, broadcast_object, get_rank

if TYPE_CHECKING:
    from cairn.core.logger import Logger

__all__ = ["ShardedUploads", "own_shard_files"]

_PENDING, _DONE = "pending", "done"


def own_shard_files(folder: str, rank: int) -> list[str]:
    """The files of ``folder`` that ``rank`` uploads: the shards DCP wrote for it (``__<rank>_<n>.distcp``), and on
    rank 0 the shard index and any other file (never ``cairn.pt``, which goes up last)."""
    names = sorted(name for name in os.listdir(folder) if name != METADATA_FILE)
    if rank == 0:
        return [name for name in names if not _is_shard_file(name) or _shard_rank(name) == 0]
    return [name for name in names if _is_shard_file(name) and _shard_rank(name) == rank]


def _is_shard_file(name: str) -> bool:
    return name.startswith("__") and name.endswith(".distcp") and name[2:].split("_", 1)[0].isdigit()


def _shard_rank(name: str) -> int:
    return int(name[2:].split("_", 1)[0])


@dataclass
class _FolderUpload:
    """One sharded folder on its way to the store, as this rank sees it."""

    folder: str  #: the local folder
    remote: str  #: its name in the store (before the uploader's own prefix)
    pointer: str | None
    overwrite: bool
    uploads: list[tuple[str, cf.Future[str]]]  #: (file, upload) for this rank's own files
    settled: cf.Future[str] = field(default_factory=cf.Future)  #: done once the whole folder is in the store

    def status(self) -> str:
        """``pending``, ``done``, or why it failed (the first failed file and its error)."""
        for name, upload in self.uploads:
            if upload.done() and (upload.cancelled() or upload.exception() is not None):
                reason = "cancelled" if upload.cancelled() else str(upload.exception())
                return f"{name}: {reason}"
        return _DONE if all(upload.done() for _, upload in self.uploads) else _PENDING


class ShardedUploads:
    """The sharded folders a saver has handed to the run's uploaders, until each is whole in the store."""

    def __init__(self) -> None:
        self._pending: list[_FolderUpload] = []

    @property
    def in_flight(self) -> bool:
        return bool(self._pending)

    def start(
        self, logger: Logger, folder: str, remote: str, *, pointer: str | None, overwrite: bool
    ) -> list[tuple[cf.Future[str], str]]:
        """Every rank, once ``folder`` is published: start uploading this rank's own files of it. Returns
        ``(upload, folder)`` pairs for the saver to track: they settle once the whole folder is in the store.

        Shard files replace what a prefix holds without its ``cairn.pt`` (the leftovers of a run killed mid-upload,
        which a resumed run saves again); a complete folder of that name is replaced only with ``overwrite``.
        """
        if not overwrite:
            _refuse_a_complete_folder(logger, remote)
        uploads = [
            (name, upload)
            for name in own_shard_files(folder, get_rank())
            for upload in logger.upload_file(posixpath.join(remote, name), os.path.join(folder, name), True)
        ]
        record = _FolderUpload(folder, remote, pointer, overwrite, uploads)
        self._pending.append(record)
        return [(upload, folder) for _, upload in uploads] + [(record.settled, folder)]

    def settle(self, logger: Logger, *, wait: bool) -> None:
        """Every rank, at the same moments: compare notes on the folders in flight. A folder whose shards every
        rank has stored gets its ``cairn.pt`` (rank 0, moving the pointer); one that failed anywhere raises on
        every rank. With ``wait``, this rank's uploads are waited for first (the end of ``fit``)."""
        if not self._pending:
            return
        if wait:
            cf.wait([upload for record in self._pending for _, upload in record.uploads])
        statuses = all_gather_object([record.status() for record in self._pending])
        still: list[_FolderUpload] = []
        failure: ObjectStoreError | None = None
        for index, record in enumerate(self._pending):
            column = [ranks_statuses[index] for ranks_statuses in statuses]
            failed = [(rank, status) for rank, status in enumerate(column) if status not in (_PENDING, _DONE)]
            if failed:
                failure = failure or _folder_failed(record, *failed[0])
                record.settled.set_exception(failure)
            elif all(status == _DONE for status in column):
                self._finish(logger, record)
            else:
                still.append(record)
        self._pending = still
        if failure is not None:
            raise failure

    def _finish(self, logger: Logger, record: _FolderUpload) -> None:
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


def _refuse_a_complete_folder(logger: Logger, remote: str) -> None:
    """Every rank: raise :class:`~cairn.errors.ObjectExistsError` when a store already holds a complete folder of
    this name (rank 0 asks each store once; the answer is shared, so every rank stops alike)."""
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
    if found is not None:
        raise ObjectExistsError(
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


def _folder_failed(record: _FolderUpload, rank: int, status: str) -> ObjectStoreError:
    return ObjectStoreError(
        f"uploading the sharded checkpoint {record.folder!r} failed on rank {rank} ({status}); its cairn.pt was not "
        "uploaded and the store's latest pointer did not move, so nothing names the incomplete folder. The local "
        "folder is kept: check the store, then resume from it"
    )
