"""Moving files to and from an object store in the background, without losing one silently.

Who owns what: :class:`Transfers` owns a pool of workers (processes by default, threads with ``use_procs=False``)
created at the first upload. Each upload is a ``concurrent.futures.Future``. A failed upload (after
``num_attempts`` tries with backoff) is raised by :meth:`Transfers.raise_failures`, naming the file (the uploader
logger calls it at every event, so that it surfaces on the training thread); :meth:`Transfers.wait` waits for
every upload and raises the first failure; :meth:`Transfers.close` drains the pool the same way. In a distributed
run a failure must be raised on every rank together, so the run reads it instead (:attr:`Transfers.busy`,
:attr:`Transfers.has_failure`, :meth:`Transfers.drain`, :meth:`Transfers.take_failure`). The ``latest``
pointer (:mod:`cairn.storage.pointer`) is written by one more thread (``cairn-pointer``), created at the first
pointer move; its failures travel the same way.

Staging: :meth:`Transfers.upload` puts the file into a staging folder before it returns, by hard link where the
filesystem allows (no bytes are copied: a published checkpoint is never changed in place, a new save renames a new
file over its name, so the link holds the very bytes handed over), by copy across filesystems or where links are
refused. Unless the caller names one folder for all (``upload_staging_folder``), a file is staged beside itself, so
that the link is made on its own filesystem wherever ``TMPDIR`` is (a tmpfs ``/tmp`` is common): see
:meth:`Transfers.staging_folder_for`. The staging folders a :class:`Transfers` makes itself are created at the first
upload from each folder and removed by :meth:`Transfers.close`.

Every transfer lives here, below the logger that schedules uploads and the checkpoint code that downloads, so that
neither has to import the other to reach the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import functools
import json
import logging
import multiprocessing
import os
import posixpath
import secrets
import shutil
import tempfile
import threading
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from cairn.atomic import temporary_path
from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.names import METADATA_FILE
from cairn.storage.base import ObjectStore, TransientStoreError
from cairn.storage.pointer import ProgressOf, move_pointer_forward
from cairn.storage.settings import PROGRESS_BAR_BYTES, retry_wait
from cairn.storage.uri import parse_uri, store_from_uri
from cairn.utils.text import printable

__all__ = ["STAGING_NAME", "Transfers", "download_with_progress", "stage_file"]

log = logging.getLogger(__name__)

#: What ``os.link`` answers where a copy may still succeed: another filesystem (EXDEV), a filesystem or policy that
#: refuses hard links (EPERM, ENOTSUP, EOPNOTSUPP, ENOSYS), or a file with as many links as it may have (EMLINK).
_LINK_REFUSED = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})

#: The name a staging folder made beside the files it stages starts from; on disk it is a hidden temporary,
#: ``.cairn-upload-staging.cairn-tmp-<machine>-<pid>-<token>`` (see :func:`cairn.atomic.temporary_path`).
STAGING_NAME = "cairn-upload-staging"


@dataclass(frozen=True, repr=False)  # no repr: backend_kwargs may hold secrets
class _StoreSpec:
    """What a worker needs to build its own store: plain, picklable values."""

    bucket_uri: str
    backend_kwargs: dict[str, Any]

    def build(self) -> tuple[ObjectStore, str]:
        return store_from_uri(self.bucket_uri, self.backend_kwargs)

    def key(self) -> str:
        return self.bucket_uri + json.dumps(self.backend_kwargs, sort_keys=True, default=str)


class Transfers:
    """Uploads files to ``bucket_uri`` in the background, and downloads them back; the engine behind
    :class:`~cairn.loggers.RemoteUploaderDownloader`, whose constructor arguments these are.

    ``bucket_uri`` is ``s3://bucket``, ``gs://bucket``, ``oci://bucket`` or ``libcloud://container``, optionally
    with a path that prefixes every name. ``backend_kwargs`` go to the store's constructor (for libcloud:
    ``provider``, ``container``, ``provider_kwargs``). Each file is staged (by hard link where it can be, see
    :func:`stage_file`) before :meth:`upload` returns, so training may delete it or rename a new file over its name
    straight away: in ``upload_staging_folder`` when given, else beside the file (:meth:`staging_folder_for`).
    """

    def __init__(
        self,
        bucket_uri: str,
        backend_kwargs: dict[str, Any] | None = None,
        num_concurrent_uploads: int = 1,
        upload_staging_folder: str | None = None,
        use_procs: bool = True,
        num_attempts: int = 3,
        file_path_format_string: str = "{remote_file_name}",
    ) -> None:
        parsed = parse_uri(bucket_uri)  # a bad URI fails here, at construction
        if num_concurrent_uploads < 1 or num_attempts < 1:
            raise ValueError("num_concurrent_uploads and num_attempts must be at least 1")
        if "{remote_file_name}" not in file_path_format_string:
            raise ValueError(f"file_path_format_string={file_path_format_string!r} must contain {{remote_file_name}}")
        self.bucket_uri = parsed.bucket_uri + (f"/{parsed.path}" if parsed.path else "")
        self._spec = _StoreSpec(parsed.bucket_uri, _with_prefix(parsed.path, backend_kwargs))
        self.num_concurrent_uploads = num_concurrent_uploads
        self.use_procs = use_procs
        self.num_attempts = num_attempts
        self.file_path_format_string = file_path_format_string
        self._staging = upload_staging_folder  # the caller's, for every file; None: see staging_folder_for
        self._made_staging: dict[str, str] = {}  # a folder of files handed over -> the staging folder made for them
        self._copy_noted = False  # whether the log already said that staging copies instead of linking
        self._worker_finished = False  # whether any upload has finished: dead workers then are not the script's fault
        self._store: ObjectStore | None = None
        self._pool: cf.Executor | None = None
        self._uploads: list[tuple[str, str, cf.Future[str]]] = []  # (local file, remote name, future)
        self._lock = threading.Lock()
        self._sequence = 0  # uploads started
        self._pointer_sequence = 0  # the upload the pointer names
        self._handing_on = 0  # finished uploads whose pointer move is not yet handed to the pointer thread
        self._handed_on = threading.Condition(self._lock)  # notified as each of those is handed on
        self._pointer_writer: cf.ThreadPoolExecutor | None = None
        self._pointer_progress: dict[str, ProgressOf] = {}  # pointer (as in the store) -> how to order its targets
        self._replaceable: set[str] = set()  # damaged objects kept aside by autoresume (see replace_damaged)

    # -- the store, for loading and probing -----------------------------------------------------------------------

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = self._spec.build()[0]
        return self._store

    def remote_name(self, remote_file_name: str) -> str:
        return self.file_path_format_string.format(remote_file_name=remote_file_name)

    def remote_template(self, template: str) -> str:
        """The format string of the names in the store of files named by the format string ``template``: the same
        fields, inside ``file_path_format_string``'s literal text (escaped, so that it is never read as a field)."""
        marker = "\x00"
        pieces = self.remote_name(marker).split(marker)
        return template.join(piece.replace("{", "{{").replace("}", "}}") for piece in pieces)

    def order_pointer(self, pointer_name: str, progress: ProgressOf) -> None:
        """Keep the store's pointer ``pointer_name`` from moving back across runs, not only within this one.

        Before the pointer moves, the object it names now and the new target are compared with ``progress``
        (store names in, comparable tuples out): the pointer stays when the object it names exists and is further
        along. A name ``progress`` cannot order (None) never holds the pointer back.
        """
        with self._lock:
            self._pointer_progress[self.remote_name(pointer_name)] = progress

    def replace_damaged(self, object_name: str) -> None:
        """Let this run's next upload of ``object_name`` replace it even with ``overwrite=False``.

        For autoresume alone: it found the object damaged and kept a copy under another name. Stores cannot rename,
        and without this the run, which falls back to the checkpoint before it, could never save that name again.
        """
        with self._lock:
            self._replaceable.add(object_name)

    def is_replaceable(self, object_name: str) -> bool:
        """Whether autoresume handed ``object_name`` to :meth:`replace_damaged` and no upload has replaced it yet."""
        with self._lock:
            return object_name in self._replaceable

    def download(self, remote_file_name: str, destination: str, overwrite: bool = False, progress: bool = True) -> None:
        """Download ``remote_file_name`` to ``destination`` (atomically), with a progress bar for large files."""
        name = self.remote_name(remote_file_name)
        download_with_progress(self.store, name, destination, overwrite=overwrite, progress=progress)

    def probe(self) -> None:
        """Fail before the first training step when the bucket is missing or the credentials are wrong."""
        try:
            self.store.list_objects("cairn-probe-does-not-exist/")
        except ObjectStoreError as err:
            raise ObjectStoreError(f"{self.bucket_uri} cannot be used: {err}") from None

    # -- uploads --------------------------------------------------------------------------------------------------

    def upload(
        self,
        remote_file_name: str,
        file_path: str,
        overwrite: bool = False,
        pointer_name: str | None = None,
        *,
        pointer_target: str | None = None,
    ) -> cf.Future[str]:
        """Stage ``file_path`` and upload it as ``remote_file_name`` in the background.

        With ``overwrite=False`` an existing object of that name is never replaced: the upload fails with
        :class:`ObjectExistsError` (a ``FileExistsError``), raised by :meth:`raise_failures` (see
        :meth:`ObjectStore.upload_object` for which stores also refuse an object that appears during the upload).
        The one exception: a damaged object that autoresume kept a copy of (:meth:`replace_damaged`).

        With ``pointer_name``, once the upload is verified a small object of that name is written whose content is
        the uploaded object's name: the store's "latest" pointer. It never names a partial upload, and never moves
        back to an older file when uploads finish out of order (pointer writes are serialised, newest only), nor,
        once :meth:`order_pointer` said how to order them, to a file older than the one it names already. The
        pointer names ``pointer_target`` instead where given: a sharded folder, whose ``cairn.pt`` is uploaded last.
        """
        staged, refusal = self._stage(file_path)
        unchanged = _Unchanged.of(staged) if refusal is None else None  # a copy is private: nothing can change it
        remote = self.remote_name(remote_file_name)
        with self._lock:
            overwrite = overwrite or remote in self._replaceable
            self._replaceable.discard(remote)
        future = self._submit_surviving_a_dead_worker(
            _upload_task, self._spec, staged, remote, self.num_attempts, overwrite, unchanged
        )
        with self._lock:
            self._uploads.append((file_path, remote, future))
            self._sequence += 1
            sequence = self._sequence
        if pointer_name:
            pointer = self.remote_name(pointer_name)
            named = remote if pointer_target is None else self.remote_name(pointer_target)
            with self._lock:
                self._handing_on += 1  # busy until the pointer write is queued (the upload is done before that)
            future.add_done_callback(lambda done: self._move_pointer(sequence, pointer, named, file_path, done))
        return future

    def _submit_surviving_a_dead_worker(self, task: Any, *args: Any) -> cf.Future[str]:
        """Run ``task`` on the workers; if its worker process dies (killed while idle or mid-upload, out of
        memory), run it once more on a fresh pool before reporting: an upload is idempotent, and a pool of dead
        workers would otherwise fail every later upload with a bare ``BrokenProcessPool``."""
        outcome: cf.Future[str] = cf.Future()

        def attempt(retried: bool) -> None:
            try:
                running = self._executor().submit(task, *args)
            except BrokenProcessPool:
                self._replace_broken_pool()
                running = self._executor().submit(task, *args)
            running.add_done_callback(lambda done: settle(done, retried))

        def settle(done: cf.Future[str], retried: bool) -> None:
            error = done.exception()
            if isinstance(error, BrokenProcessPool) and not retried:
                log.warning("an upload worker process died; retrying its upload on a fresh one")
                self._replace_broken_pool()
                attempt(retried=True)
            elif error is not None:
                outcome.set_exception(_WorkerDied(self._worker_finished, error) if retried else error)
            else:
                self._worker_finished = True
                outcome.set_result(done.result())

        attempt(retried=False)
        return outcome

    def _replace_broken_pool(self) -> None:
        """Drop a pool whose workers died; the next upload starts a fresh one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def staging_folder_for(self, file_path: str) -> str:
        """Where ``file_path`` is staged: ``upload_staging_folder`` when the caller gave one, else a hidden folder
        beside the file, made at the first upload from its folder (:func:`_staging_home`).

        Beside the file, because a hard link can only be made on the file's own filesystem, and the temporary
        folder (``TMPDIR``) is often another one (a tmpfs ``/tmp``): staged there, every checkpoint would be copied
        whole before its upload. The folder's name is a temporary's (``.cairn-upload-staging.cairn-tmp-...``), so
        that retention, autoresume and ``cairn ckpt ls`` never take it for a checkpoint (they skip temporaries),
        and a run starting in the folder clears the one a killed run left (its process is gone). Where no folder
        can be made beside the file (a read-only folder), the staging folder is a new one in ``TMPDIR``. Nothing
        is made before the first upload: a Transfers that never uploads (a run whose construction failed, a
        download-only uploader) leaves nothing behind.
        """
        if self._staging is not None:
            return self._staging
        home = _staging_home(file_path)
        with self._lock:
            staging = self._made_staging.get(home)
            if staging is None or not os.path.isdir(staging):  # removed meanwhile (by hand, or a stale-file sweep)
                staging = self._made_staging[home] = _make_staging_folder(home)
            return staging

    def _stage(self, file_path: str) -> tuple[str, OSError | None]:
        """Stage ``file_path`` (:func:`stage_file`): the staged path, and the refusal that made it a copy, if any.

        A staging folder this Transfers made may vanish between being chosen and being used (:meth:`wait` removes
        the empty ones, a stale-file sweep of another machine may too): then a new one is made, once.
        """
        staging = self.staging_folder_for(file_path)
        try:
            return self._stage_in(staging, file_path)
        except FileNotFoundError:
            if self._staging is not None or os.path.isdir(staging):
                raise  # the file itself is missing, or the folder the caller chose is
        return self._stage_in(self.staging_folder_for(file_path), file_path)

    def _stage_in(self, staging: str, file_path: str) -> tuple[str, OSError | None]:
        staged = os.path.join(staging, f"{secrets.token_hex(8)}-{os.path.basename(file_path)}")
        refusal = stage_file(file_path, staged)
        if refusal is not None:
            self._note_copy(staging, file_path, refusal)
        return staged, refusal

    def _remove_empty_staging_folders(self) -> None:
        """Remove the staging folders this Transfers made that hold nothing: once every upload has finished (at
        :meth:`wait`, so at the end of ``fit``), the save folder holds no hidden folder of ours. One that holds a
        file (an upload started meanwhile) stays; the next upload from a removed one makes a new one."""
        with self._lock:
            for home, staging in list(self._made_staging.items()):
                try:
                    os.rmdir(staging)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                del self._made_staging[home]

    def _note_copy(self, staging: str, file_path: str, refusal: OSError) -> None:
        """Say once per uploader that staging copies files, why, and how to make it link them instead."""
        if self._copy_noted:
            return
        self._copy_noted = True
        reason = (
            "it is on another filesystem"
            if refusal.errno == errno.EXDEV
            else f"the filesystem refused a hard link ({refusal.strerror})"
        )
        log.warning(
            "the upload staging folder %s cannot hold a hard link to %s (%s), so each upload first copies its file; "
            "pass upload_staging_folder a folder on the checkpoints' filesystem (or leave it unset, to stage beside "
            "each file) to stage without copying",
            staging,
            file_path,
            reason,
        )

    def _move_pointer(self, sequence: int, pointer: str, target: str, local: str, upload: cf.Future[str]) -> None:
        """Runs when an upload finishes: point ``pointer`` at it, if it succeeded and is the newest so far."""
        try:
            self._queue_pointer_move(sequence, pointer, target, local, upload)
        finally:
            with self._handed_on:
                self._handing_on -= 1
                self._handed_on.notify_all()

    def _queue_pointer_move(self, sequence: int, pointer: str, target: str, local: str, upload: cf.Future[str]) -> None:
        if upload.cancelled() or upload.exception() is not None:
            return
        with self._lock:
            if sequence <= self._pointer_sequence:
                return
            self._pointer_sequence = sequence
            if self._pointer_writer is None:
                self._pointer_writer = cf.ThreadPoolExecutor(1, thread_name_prefix="cairn-pointer")
            progress = self._pointer_progress.get(pointer)
            write = self._pointer_writer.submit(_pointer_task, self._spec, pointer, target, self.num_attempts, progress)
            self._uploads.append((local, pointer, write))

    def wait(self) -> None:
        """Block until every upload (and pointer move) so far has finished; raise the first failure, naming the file."""
        self.drain()
        self.raise_failures()

    def drain(self) -> None:
        """Block until every upload (and pointer move) so far has finished, raising nothing: a failure stays for
        :meth:`raise_failures` or :meth:`take_failure` (in a distributed run, every rank raises it together)."""
        while True:
            with self._handed_on:
                pending = [future for _, _, future in self._uploads if not future.done()]
                if not pending and not self._handing_on:
                    break
                if not pending:
                    self._handed_on.wait()  # a finished upload's callback is queueing its pointer move
                    continue
            cf.wait(pending)
        self._remove_empty_staging_folders()

    @property
    def busy(self) -> bool:
        """Whether an upload (or a pointer move) is still in flight: its failure may yet come."""
        with self._lock:
            return self._handing_on > 0 or any(not future.done() for _, _, future in self._uploads)

    @property
    def has_failure(self) -> bool:
        """Whether a finished upload failed and no one has raised (or taken) its failure yet."""
        with self._lock:
            futures = [future for _, _, future in self._uploads if future.done()]
        return any(not future.cancelled() and future.exception() is not None for future in futures)

    def _executor(self) -> cf.Executor:
        if self._pool is None:
            if self.use_procs:
                context = multiprocessing.get_context("spawn")  # fork after torch threads start is unsafe
                self._pool = cf.ProcessPoolExecutor(self.num_concurrent_uploads, mp_context=context)
            else:
                self._pool = cf.ThreadPoolExecutor(self.num_concurrent_uploads, thread_name_prefix="cairn-upload")
        return self._pool

    def raise_failures(self) -> None:
        """Raise the first finished upload that failed, and forget the finished ones."""
        failure = self.take_failure()
        if failure is not None:
            raise failure from failure.__cause__

    def take_failure(self) -> ObjectStoreError | None:
        """The error that says why the first finished upload that failed did (naming the file and the object, its
        cause the upload's own error), or None; the finished uploads are forgotten either way."""
        with self._lock:
            finished = [entry for entry in self._uploads if entry[2].done()]
            self._uploads = [entry for entry in self._uploads if not entry[2].done()]
        for local, remote, future in finished:
            error = future.exception()
            if error is not None:
                failure = self._failure_of(local, remote, error)
                failure.__cause__ = error
                return failure
        return None

    def _failure_of(self, local: str, remote: str, error: BaseException) -> ObjectStoreError:
        """The error to raise for the upload of ``local`` as ``remote`` that failed with ``error``."""
        if isinstance(error, _WorkerDied) and error.had_worked:
            return ObjectStoreError(
                f"uploading {local!r} failed: its upload worker process died twice (killed, or out of memory?). "
                "The local file is kept: check the machine's memory, then upload it again or resume from it"
            )
        if isinstance(error, (_WorkerDied, BrokenProcessPool)):
            return ObjectStoreError(
                f"uploading {local!r} failed: the upload worker process died before finishing any upload. "
                "Worker processes re-run your script's imports: put the training code under "
                "`if __name__ == '__main__':`, or pass use_procs=False"
            )
        if isinstance(error, _ChangedInPlace):
            return _ChangedInPlace(
                f"{local!r} was rewritten in place while it was uploading to {self.store.get_uri(remote)}, so the "
                "object may not hold what was handed over (files are staged by hard link, not copied): write "
                "new content to another file and rename it over the name, or upload a copy"
            )
        if isinstance(error, ObjectExistsError):
            return ObjectExistsError(
                f"{self.store.get_uri(remote)} already exists and save_overwrite=False never replaces an object, "
                f"so {local!r} was not uploaded (it is kept): pass save_overwrite=True (overwrite=True to "
                "upload_file) to replace it, or give this run another run_name or remote file name"
            )
        return ObjectStoreError(
            f"uploading {local!r} to {self.store.get_uri(remote)} failed ({error}); transient failures were "
            f"retried up to {self.num_attempts} times. The local file is kept: check the store, then upload "
            "it again or resume from it"
        )

    def close(self) -> None:
        """Wait for every upload (raising the first failure), then release the workers, the staging folders it
        made and the store."""
        try:
            self.wait()
        finally:
            for pool in (self._pool, self._pointer_writer):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._pool = self._pointer_writer = None
            with self._lock:
                made, self._made_staging = list(self._made_staging.values()), {}  # a later upload makes new ones
            for staging in made:
                shutil.rmtree(staging, ignore_errors=True)
            if self._store is not None:
                self._store.close()
                self._store = None


class _WorkerDied(ObjectStoreError):
    """An upload whose worker process died, twice: the second time on a fresh pool."""

    def __init__(self, had_worked: bool, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.had_worked = had_worked  #: an upload had finished before: the workers start fine, so not the script


def _staging_home(file_path: str) -> str:
    """The folder beside which ``file_path`` is staged: its own, or, for a file of a sharded checkpoint folder
    (one holding ``cairn.pt``), the folder holding that one, so that a checkpoint folder holds only its own files
    (``cairn ckpt verify`` checks them all) and one staging folder serves all of its shards."""
    folder = os.path.dirname(os.path.abspath(file_path))
    if os.path.isfile(os.path.join(folder, METADATA_FILE)):
        return os.path.dirname(folder)
    return folder


def _make_staging_folder(home: str) -> str:
    """A new hidden staging folder in ``home`` (named as a temporary of this process), else, where ``home`` takes
    no new folder (read-only, or gone), a new one in the temporary folder, where staging may have to copy."""
    staging = temporary_path(os.path.join(home, STAGING_NAME))
    try:
        os.mkdir(staging)
    except OSError as err:
        log.info("cannot make an upload staging folder in %s (%s); staging in the temporary folder", home, err)
        return tempfile.mkdtemp(prefix=f"{STAGING_NAME}-")
    return staging


def _with_prefix(path: str, backend_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The store's arguments, with the URI's path as its key prefix unless the caller gave one."""
    kwargs = dict(backend_kwargs or {})
    if path:
        kwargs.setdefault("prefix", path)
    return kwargs


_worker_local = threading.local()


def _worker_store(spec: _StoreSpec) -> ObjectStore:
    """One store per worker thread (some SDK clients, libcloud's among them, must not be shared across threads),
    built on first use and reused for that worker's later uploads."""
    stores: dict[str, ObjectStore] = _worker_local.__dict__.setdefault("stores", {})
    key = spec.key()
    if key not in stores:
        store = spec.build()[0]
        store.num_attempts = 1  # retries happen around upload + verify, below
        stores[key] = store
    return stores[key]


def _retrying(num_attempts: int) -> Retrying:
    return Retrying(
        stop=stop_after_attempt(num_attempts),
        wait=retry_wait(),
        retry=retry_if_exception_type((TransientStoreError, ObjectNotFoundError)),
        reraise=True,
    )


def stage_file(source: str, staged: str) -> OSError | None:
    """Put ``source`` at ``staged`` for an upload: a hard link (no byte copied, however large the file) where the
    filesystem allows, else a copy. Returns None for a link, or the ``OSError`` that refused one (and made it a copy).

    A link is safe because a published checkpoint is never changed in place: a new save renames a new file over
    the name, and the link keeps the old bytes for the upload. A copy is made only where ``os.link`` is refused in
    a way a copy overcomes (:data:`_LINK_REFUSED`: another filesystem, links not allowed, too many links); any
    other failure (a missing file, a full or read-only staging folder) is raised as it is.
    """
    try:
        os.link(source, staged)
        return None
    except OSError as err:
        if err.errno not in _LINK_REFUSED:
            raise
        refusal = err
    try:
        shutil.copyfile(source, staged)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(staged)  # a partial copy (a full disk) must not stay behind in the staging folder
        raise
    return refusal


class _ChangedInPlace(ObjectStoreError):
    """A file staged by hard link was rewritten in place before its upload was verified."""


@dataclass(frozen=True)
class _Unchanged:
    """What a linked staged file looked like when it was staged; if it differs after the upload was verified, the
    file was rewritten in place (the link sees every write) and the object may hold other bytes than handed over."""

    inode: int
    size: int
    modified_ns: int

    @classmethod
    def of(cls, path: str) -> _Unchanged:
        info = os.stat(path)
        return cls(info.st_ino, info.st_size, info.st_mtime_ns)

    def check(self, path: str, remote: str) -> None:
        if _Unchanged.of(path) != self:
            raise _ChangedInPlace(f"the file uploaded as {remote!r} was rewritten in place")


def _upload_task(
    spec: _StoreSpec, staged: str, remote: str, num_attempts: int, overwrite: bool, unchanged: _Unchanged | None
) -> str:
    """Upload and verify; retried as a whole on transient failures. The staged link or copy is removed either way.
    A linked file is checked to be as it was when staged, after success and after failure alike: a rewrite in place
    is what made a failure (a checksum mismatch, then a retry refused by ``overwrite=False``) and must be named."""
    try:
        _retrying(num_attempts)(_upload_and_verify, _worker_store(spec), staged, remote, overwrite)
    except Exception:
        if unchanged is not None:
            unchanged.check(staged, remote)
        raise
    else:
        if unchanged is not None:
            unchanged.check(staged, remote)
    finally:
        os.remove(staged)
    return remote


def _pointer_task(spec: _StoreSpec, pointer: str, target: str, num_attempts: int, progress: ProgressOf | None) -> str:
    """Read, compare and write the pointer; retried as a whole on transient failures."""
    upload = functools.partial(_upload_and_verify, overwrite=True)  # a pointer always replaces the one before
    _retrying(num_attempts)(move_pointer_forward, _worker_store(spec), pointer, target, progress, upload)
    return pointer


def _upload_and_verify(store: ObjectStore, filename: str, name: str, overwrite: bool) -> None:
    size = os.path.getsize(filename)
    with _progress(f"upload {os.path.basename(name)}", size) as callback:
        store.upload_object(name, filename, callback=callback, overwrite=overwrite)
    try:
        store.verify_upload(name, filename)
    except ObjectStoreError as err:
        raise TransientStoreError(str(err)) from None  # a damaged upload is worth another try


def download_with_progress(store: ObjectStore, name: str, destination: str, *, overwrite: bool, progress: bool) -> None:
    """Download ``name`` to ``destination`` (the store's atomic download), with a progress bar for a large object
    when ``progress`` asks for one; without it the object's size is not even asked for."""
    size = store.get_object_size(name) if progress else 0
    with _progress(f"download {printable(posixpath.basename(name))}", size if progress else 0) as callback:
        store.download_object(name, destination, overwrite=overwrite, callback=callback)


class _progress:
    """A tqdm bar in bytes for transfers of at least ``PROGRESS_BAR_BYTES``; nothing for small ones."""

    def __init__(self, description: str, total: int) -> None:
        self.description, self.total, self.bar = description, total, None

    def __enter__(self) -> Any:
        if self.total < PROGRESS_BAR_BYTES:
            return None
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, desc=self.description, unit="B", unit_scale=True, leave=False)
        bar = self.bar

        def update(done: int, total: int) -> None:
            bar.update(done - bar.n)

        return update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
