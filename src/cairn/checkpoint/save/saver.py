"""The CheckpointSaver callback: it asks the policy *when*, builds *what*, commits it *how*, and prunes."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from cairn.checkpoint.folder import list_checkpoints, named_entries
from cairn.checkpoint.incremental.garbage import References, collect_garbage
from cairn.checkpoint.keys import check_ignore_keys
from cairn.checkpoint.naming.checks import check_local_name, check_names, check_not_a_file
from cairn.checkpoint.naming.clash import template_clash
from cairn.checkpoint.naming.templates import PROGRESS_VARIABLES, fields_of, format_name, name_pattern
from cairn.checkpoint.save.background import BackgroundSaves
from cairn.checkpoint.save.commit import atomic_symlink, remove_stale_temporaries
from cairn.checkpoint.save.content import recording_metrics
from cairn.checkpoint.save.policy import is_last_checkpoint_event, save_policy
from cairn.checkpoint.save.remote_chunks import StoreChunks
from cairn.checkpoint.save.remote_retention import StoreRetention, StoreScope
from cairn.checkpoint.save.remote_shards import FolderUpload, ShardedUploads, UploadNotes
from cairn.checkpoint.save.retention import (
    RecordCache,
    RetentionCandidate,
    RetentionRules,
    best_ranking,
    candidates_in,
    link_target,
    prune,
)
from cairn.checkpoint.save.retention_arguments import check_retention_arguments, refuse_best_pointer_that_clashes
from cairn.checkpoint.save.store_names import guard_store_names, listing_prefix
from cairn.checkpoint.save.writers import SingleFileWriter, Writer, make_writer
from cairn.core.callback import Callback
from cairn.core.event import Event
from cairn.core.interval import IntervalLike, same_on_every_rank
from cairn.core.logger import Logger, LoggerDestination, SavedCheckpoint, transfers_among
from cairn.core.state import State
from cairn.core.time import Time, TimeUnit
from cairn.names import POINTER_SUFFIX
from cairn.storage.pointer import pointer_beside
from cairn.utils.arguments import check_flag
from cairn.utils.dist import barrier, broadcast_object, get_rank, is_distributed, share_rank_zero_failure

__all__ = ["CheckpointSaver", "save_checkpoint"]

log = logging.getLogger(__name__)

_SAVE_SEQUENCE = itertools.count()


@dataclass(frozen=True)
class _Target:
    """Where one save goes, named from the state at the moment it was taken (training moves on during async saves)."""

    folder: str
    path: str
    latest_link: str | None
    best_link: str | None
    retention_pattern: str
    remote_name: str
    remote_pointer: str | None
    sharded: bool  # a folder: every rank uploads its own shards, rank 0 its cairn.pt last
    store_scopes: tuple[StoreScope, ...] = ()  # where each uploader keeps the run's checkpoints (store retention)


class CheckpointSaver(Callback):
    """Saves checkpoints of the run into ``folder`` on a schedule.

    ``folder``, ``filename`` and ``latest_filename`` are format strings (``{run_name}``, ``{epoch}``, ``{batch}``,
    ``{rank}``, ... see ``cairn.checkpoint.naming.templates.FORMAT_VARIABLES``); folders inside a name are
    created. The end of training is always saved once.

    Retention (docs/checkpointing.md, "Retention") decides from the files on disk which checkpoints matching
    ``filename`` stay: the ``num_checkpoints_to_keep`` most recent (``-1`` all; ``0`` each one once uploaded), the
    ``keep_best`` best by ``best_metric`` (a logged metric whose value at save time each checkpoint records in its
    metadata; ``best_mode`` ``"max"`` or ``"min"``), every one on a ``keep_every`` boundary (``"10ep"``), and any
    that the ``latest`` or ``best`` link names. ``best_filename`` is a link to the best one (only with
    ``keep_best``; ``None``: no link); where checkpoints are uploaded, rank 0 also keeps the store's ``best``
    pointer (:meth:`remote_best_pointer`) at the best checkpoint verified there, moving it after each verified
    upload, back in time if need be. ``remote_num_checkpoints_to_keep`` is the store's count of recent ones
    (``-1``: the store keeps everything); with it, rank 0 applies the same rules in each uploader's store once
    uploads are verified there (:attr:`remote_retention`; the metric values of an earlier run's checkpoints are
    downloaded from the store once).

    With ``async_save=True`` a save only copies the state into reused host buffers (pinned memory for GPU tensors)
    and returns; a background thread hashes, writes, fsyncs and renames the file, then moves ``latest``, hands the
    file to the uploaders and prunes. One save is in flight at a time; ``fit`` waits for the last one; a background
    failure is raised at the next event. The buffers cost host memory about the size of the checkpoint.
    """

    def __init__(
        self,
        folder: str = "{run_name}/checkpoints",
        filename: str = "ep{epoch}-ba{batch}-rank{rank}.pt",
        remote_file_name: str | None = None,
        latest_filename: str | None = "latest-rank{rank}.pt",
        latest_remote_file_name: str | None = None,
        save_interval: IntervalLike = "1ep",
        *,
        weights_only: bool = False,
        num_checkpoints_to_keep: int = -1,
        overwrite: bool = False,
        ignore_keys: Sequence[str] | None = None,
        async_save: bool = False,
        keep_best: int = 0,
        best_metric: str | None = None,
        best_mode: str = "max",
        best_filename: str | None = "best-rank{rank}.pt",
        keep_every: str | Time[Any] | None = None,
        remote_num_checkpoints_to_keep: int = -1,
        incremental: bool = False,
    ) -> None:
        self.folder, self.filename, self.latest_filename, self.remote_file_name, self.latest_remote_file_name = (
            check_names(folder, filename, latest_filename, remote_file_name, latest_remote_file_name)
        )
        self.policy = save_policy(save_interval)
        self.weights_only = check_flag(weights_only, argument="weights_only")
        if isinstance(num_checkpoints_to_keep, bool) or not isinstance(num_checkpoints_to_keep, int):
            raise ValueError(f"num_checkpoints_to_keep={num_checkpoints_to_keep!r}: use an int (-1 keeps all)")
        if num_checkpoints_to_keep < -1:
            raise ValueError(f"num_checkpoints_to_keep={num_checkpoints_to_keep}: use -1 (keep all), 0, or more")
        _refuse_latest_names_that_clash(self)
        self.num_checkpoints_to_keep = num_checkpoints_to_keep
        retention = check_retention_arguments(
            keep_best=keep_best,
            best_metric=best_metric,
            best_mode=best_mode,
            best_filename=best_filename,
            keep_every=keep_every,
            remote_num_checkpoints_to_keep=remote_num_checkpoints_to_keep,
            filename=self.filename,
            latest_filename=self.latest_filename,
        )
        self.keep_best, self.best_metric, self.best_mode, self.best_filename, self.keep_every = retention[:5]
        self.remote_num_checkpoints_to_keep: int = retention[5]
        refuse_best_pointer_that_clashes(
            keep_best=self.keep_best,
            best_filename=self.best_filename,
            remote_template=self.remote_template(),
            latest_pointer=self.latest_pointer_template(),
        )
        self._records = RecordCache()  # what each checkpoint file records, read once per file
        self._prune_lock = threading.Lock()  # the background save prunes, and so does the training thread
        self._uploaded: set[str] = set()  # local files every upload of which succeeded (num_checkpoints_to_keep=0)
        self.overwrite = check_flag(overwrite, argument="overwrite")
        self.ignore_keys = check_ignore_keys(ignore_keys, argument="ignore_keys", loading=False)
        # not written into checkpoints: the files on disk are the record, and a resumed run lists only what it saves
        self.saved_checkpoints: list[str] = []
        self.save_order: list[int] = []  # a process-wide sequence number per save, to merge several savers' lists
        self._last_saved_batch: int | None = None
        self._uploading: list[tuple[Future[str], str]] = []  # (upload, local file it came from)
        self._upload_failed: set[str] = set()  # local files whose upload failed: kept, as the error says
        self._uploading_lock = threading.Lock()  # the background save appends, the training thread prunes
        self._last_target: _Target | None = None  # the newest save's, pruned again once its uploads are done
        self._remote_of: dict[str, str] = {}  # local checkpoint -> its remote file name, while it uploads
        self.async_save = check_flag(async_save, argument="async_save")
        self.incremental = check_flag(incremental, argument="incremental")
        self._store_chunks = StoreChunks() if self.incremental else None  # what each store's chunk folder holds
        self._store_retention = StoreRetention(
            self.remote_retention, metric=self.best_metric, mode=self.best_mode, chunks=self._store_chunks
        )
        self._chunk_references = References()  # which chunks each manifest in the folder names, read once per file
        self._background = BackgroundSaves()
        self._writer: Writer | None = None  # built at the first save, when the state says which format
        self._sharded_uploads = ShardedUploads()
        # (event, batch) -> the agreed "save now?" and every rank's notes on the folders uploading, until it runs
        self._agreed: dict[tuple[Event, int], tuple[bool, UploadNotes | None]] = {}
        self._watching_uploads = False  # a save handed files to the uploaders: see watches_uploads

    @property
    def retention(self) -> RetentionRules:
        """The rules local pruning applies (docs/checkpointing.md, "Retention")."""
        return RetentionRules(
            recent=self.num_checkpoints_to_keep, best=self.keep_best, mode=self.best_mode, every=self.keep_every
        )

    @property
    def remote_retention(self) -> RetentionRules | None:
        """The rules the store side applies to this saver's objects, or None when the store keeps everything
        (``remote_num_checkpoints_to_keep=-1``, the default): the same best and boundary rules as on disk, with the
        store's own count of recent checkpoints."""
        if self.remote_num_checkpoints_to_keep < 0:
            return None
        return RetentionRules(
            recent=self.remote_num_checkpoints_to_keep, best=self.keep_best, mode=self.best_mode, every=self.keep_every
        )

    # -- events -----------------------------------------------------------------------------------------------

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        self._background.raise_failure()  # a failed background save surfaces at the next event, on this thread
        super().run_event(event, state, logger)

    def init(self, state: State, logger: Logger) -> None:
        """Check the names again with the run's own name, known only now, and that every uploader can take an
        incremental checkpoint: still inside the Trainer's constructor."""
        self._check_names_with_run_name(state, logger)
        if self.incremental:
            _refuse_uploaders_without_a_store(logger)

    def _check_names_with_run_name(self, state: State, logger: Logger) -> None:
        """At INIT, and again at FIT_START: a loaded checkpoint brings its own run name (a file's ``'../../x'``
        would otherwise put checkpoints outside the folder, or a NUL fail the first save after an epoch)."""
        try:
            check_names(
                self.folder,
                self.filename,
                self.latest_filename,
                self.remote_template() if logger.uploads_files else None,
                self.latest_remote_file_name if logger.uploads_files else None,
                run_name=state.run_name,
            )
            if self._links_best:
                check_local_name(self.best_filename, argument="best_filename", run_name=state.run_name)  # type: ignore[arg-type]
            if not any(field in PROGRESS_VARIABLES for field in fields_of(self.folder)):
                check_not_a_file(self.folder, format_name(self.folder, state, rank=0), argument="folder")
        except ValueError as err:
            raise ValueError(f"with run_name={state.run_name!r}, {err}") from None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._check_names_with_run_name(state, logger)
        if self.num_checkpoints_to_keep == 0 and not logger.uploads_files:
            raise ValueError(
                "num_checkpoints_to_keep=0 deletes each checkpoint once it is uploaded, but nothing uploads here; "
                "save to an s3://, gs:// or oci:// save_folder, add a RemoteUploaderDownloader, or keep 1 or more"
            )
        folder = format_name(self.folder, state, rank=0)
        if get_rank() == 0:
            remove_stale_temporaries(folder)
            if self.incremental:
                collect_garbage(folder, self._chunk_references)  # chunks of saves killed before their manifest
        refuse_existing = not (self.overwrite or state.resumed_from is not None)
        pointer = self.remote_names(state)[1]
        guard_store_names(logger, state, self.remote_template(), pointer, refuse_existing=refuse_existing)
        pattern = name_pattern(self.filename, state, rank=0)
        sharded = state.sharded_checkpoints
        obstacle = _in_the_way(folder, pattern, overwrite=self.overwrite, sharded=sharded) if get_rank() == 0 else None
        obstacle = broadcast_object(obstacle)  # rank 0 alone writes: what its folder holds decides for every rank
        if obstacle is not None:
            raise FileExistsError(obstacle)
        if refuse_existing:
            _refuse_existing_checkpoints(folder, pattern)
        self._writer_for(state).prepare(state)  # every rank: an async writer's buffers are made now, off the loop

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._maybe_save(state, logger, Event.BATCH_CHECKPOINT)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._maybe_save(state, logger, Event.EPOCH_CHECKPOINT)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._finish_previous_save()
        self._sharded_uploads.settle(logger, wait=True)  # every rank: the last folders get their cairn.pt
        with self._uploading_lock:
            uploads = [future for future, _ in self._uploading]
        cf.wait(uploads)
        self._wait_for_store_pointers()
        self._forget_uploaded()
        if get_rank() != 0:
            return
        if self._last_target is None and state.resumed_from is not None:
            self._apply_rules_without_a_save(state, logger)
        elif uploads:
            self._prune()  # the checkpoints kept while their uploads were in flight may go now

    def _apply_rules_without_a_save(self, state: State, logger: Logger) -> None:
        """A restart that trained nothing (its end was reached already) saved nothing, yet its rules may differ
        from the last run's (another ``keep_best``, say): they are applied to what is on disk and in the store."""
        self._last_target = self._target(state, logger)
        self._prune()
        self._prune_store()

    def close(self, state: State, logger: Logger) -> None:
        try:
            self._background.close()
        finally:
            self._close_writer()

    def _maybe_save(self, state: State, logger: Logger, event: Event) -> None:
        due, uploads = self._agreed.pop((event, int(state.timestamp.batch)), (None, None))
        if uploads is not None and uploads.records:
            self._watching_uploads = True  # a folder stored everywhere now gets its cairn.pt, on rank 0
        # every rank: folders whose shards are all stored finish (gathering notes itself when nothing was agreed)
        self._sharded_uploads.settle(logger, wait=False, agreed=uploads)
        self._forget_uploaded()
        if due is None:  # not settled by a Trainer before the event (a saver driven by hand): rank 0 decides
            due = broadcast_object(self.wants_to_save(state, event))
        if due:
            self.save(state, logger)

    def wants_to_save(self, state: State, event: Event) -> bool:
        """This rank's answer to "save now?" at ``event``: the interval's, or yes at the run's end (always saved
        once). In a distributed run rank 0's answer counts (:mod:`cairn.trainer.agreement`)."""
        due = self.policy(state, event)
        return due or (is_last_checkpoint_event(state, event) and self._last_saved_batch != state.timestamp.batch)

    def decides_alike(self, state: State) -> bool:
        """Whether every rank gives the same :meth:`wants_to_save` answers: an interval of epochs or batches in a run
        whose ``max_duration`` counts those too (its end is then reached alike); then no rank need be asked."""
        counted_alike = state.max_duration.unit in (TimeUnit.EPOCH, TimeUnit.BATCH)
        return counted_alike and same_on_every_rank(self.policy, state)

    def upload_notes(self) -> UploadNotes:
        """This rank's notes on the sharded folders still uploading, which the agreement compares in its one
        collective (none when no folder is in flight, the same on every rank)."""
        return self._sharded_uploads.notes()

    @property
    def watches_uploads(self) -> bool:
        """Whether an upload of this saver's may still be in flight on some rank (rank 0's single file, a folder's
        ``cairn.pt``), the same on every rank: from each save that hands files to the uploaders (every rank saves
        alike) until the agreement finds no rank with an upload in flight (:meth:`uploads_settled`). Meanwhile the
        agreement compares every rank's upload slots at each checkpoint event, so that one rank's failure is raised
        on every rank (:mod:`cairn.trainer.agreement`)."""
        return self._watching_uploads

    @property
    def writes_in_background(self) -> bool:
        """Whether a background save is still writing here: its uploads have not been handed over yet."""
        return self._background.busy

    def uploads_settled(self) -> None:
        """Every rank alike, when the agreement found no rank with an upload in flight: stop watching them."""
        self._watching_uploads = False

    def agree(self, state: State, event: Event, due: bool, uploads: UploadNotes | None = None) -> None:
        """What every rank agreed on for this event (:func:`cairn.trainer.agreement.settle_checkpoint_event`),
        before it runs: whether to save, and every rank's :meth:`upload_notes` reduced; the saver then asks
        nobody (without ``uploads`` it compares upload notes itself)."""
        self._agreed = {(event, int(state.timestamp.batch)): (due, uploads)}

    # -- saving -----------------------------------------------------------------------------------------------

    def save(self, state: State, logger: Logger | None = None) -> str:
        """Write a checkpoint of ``state`` now, hand it to the run's uploaders; return its path as given.

        In a distributed run every rank calls it; rank 0 writes the one file (named as rank 0), the others wait.
        With ``async_save`` it returns once the state is copied; the file appears when the background write ends.
        """
        target = self._target(state, logger)
        if self.async_save:
            self._finish_previous_save()
            self._background.start(self._take(state, logger, target))  # written and published on the saver's thread
        else:
            self._take(state, logger, target)()
            barrier()
        self.saved_checkpoints.append(target.path)
        self.save_order.append(next(_SAVE_SEQUENCE))
        self._last_saved_batch = state.timestamp.batch
        log.info("%s checkpoint %s", "saving" if self.async_save else "saved", target.path)
        return target.path

    def save_unless_saved(self, state: State, logger: Logger | None = None) -> str | None:
        """Save now unless this batch is already saved (a preemption arriving right after a scheduled save)."""
        if broadcast_object(self._last_saved_batch == state.timestamp.batch):
            return None
        return self.save(state, logger)

    def _target(self, state: State, logger: Logger | None = None) -> _Target:
        folder = format_name(self.folder, state, rank=0)
        latest = None if self.latest_filename is None else format_name(self.latest_filename, state, rank=0)
        best = None if not self._links_best else format_name(self.best_filename, state, rank=0)  # type: ignore[arg-type]
        remote_name, remote_pointer = self.remote_names(state)
        best_pointer = self.remote_best_pointer(state)
        return _Target(
            folder=folder,
            path=os.path.join(folder, format_name(self.filename, state, rank=0)),
            latest_link=None if latest is None else os.path.join(folder, latest),
            best_link=None if best is None else os.path.join(folder, best),
            retention_pattern=name_pattern(self.filename, state, rank=0),
            remote_name=remote_name,
            remote_pointer=remote_pointer,
            sharded=state.sharded_checkpoints,
            store_scopes=self._store_scopes(state, logger, remote_pointer, best_pointer),
        )

    def _store_scopes(
        self, state: State, logger: Logger | None, pointer: str | None, best_pointer: str | None
    ) -> tuple[StoreScope, ...]:
        """Where each uploader keeps this run's checkpoints, as store retention and the ``best`` pointer need it
        (none without rules and without a best pointer, or when nothing uploads)."""
        if (self.remote_retention is None and best_pointer is None) or logger is None or not logger.uploads_files:
            return ()
        scopes = []
        for transfers in transfers_among(logger.destinations):
            template = transfers.remote_template(self.remote_template())
            pattern = name_pattern(template, state, rank=0)
            prefix = listing_prefix(template, pattern, state)
            remote_pointer = None if pointer is None else transfers.remote_name(pointer)
            remote_best = None if best_pointer is None else transfers.remote_name(best_pointer)
            scopes.append(StoreScope(transfers, pattern, prefix, remote_pointer, remote_best))
        return tuple(scopes)

    def _take(self, state: State, logger: Logger | None, target: _Target) -> Callable[[], None]:
        """The training thread's part of a save, on every rank (the snapshot and every collective, a sharded
        folder's upload registered); the returned function does the rest on every rank, now or in the background:
        write and publish, start this rank's uploads of a sharded folder, and on rank 0 move ``latest``, upload a
        single file and prune."""
        with recording_metrics(self._metric_to_record(logger)):  # into the metadata the writer builds now
            write = self._start_write(state, target)
        upload = self._register_sharded_upload(logger, target)
        self._watching_uploads |= logger is not None and logger.uploads_files  # every rank: see watches_uploads

        def finish() -> None:
            try:
                write()
            except BaseException as err:
                if upload is not None:
                    self._sharded_uploads.drop(upload, err)  # every rank alike: the failure is shared
                raise
            if upload is not None and logger is not None:
                self._sharded_uploads.start(logger, upload)  # every rank its own shards, as soon as published
            if get_rank() == 0:
                self._after_write(logger, target)

        return finish

    def _start_write(self, state: State, target: _Target) -> Callable[[], None]:
        """The training thread's part of a save (every rank); the returned function writes and publishes."""
        return self._writer_for(state).start(state, target.path, folder=target.folder)

    def _metric_to_record(self, logger: Logger | None) -> dict[str, float]:
        """``{best_metric: value}`` as last logged, or nothing (no metric asked for, or none logged yet: the
        checkpoint then ranks after every one that recorded a value). Recorded in the checkpoint's metadata, so
        that the ranking of the best checkpoints is rebuilt from the files after a restart."""
        if self.best_metric is None or logger is None:
            return {}
        value = logger.latest_metric(self.best_metric)
        return {} if value is None else {self.best_metric: value}

    @property
    def _links_best(self) -> bool:
        return self.keep_best > 0 and self.best_filename is not None

    def _writer_for(self, state: State) -> Writer:
        """The saver's one writer, built at its first save: only then does the state say whether checkpoints are
        sharded. A state of the other format (a saver handed to another Trainer) gets a writer of its own."""
        sharded = state.sharded_checkpoints
        if self._writer is None or self._writer.sharded != sharded:
            self._close_writer()
            self._writer = make_writer(
                sharded=sharded,
                asynchronous=self.async_save,
                weights_only=self.weights_only,
                ignore_keys=self.ignore_keys,
                overwrite=self.overwrite,
                incremental=self.incremental,
            )
        return self._writer

    def _close_writer(self) -> None:
        """Release the writer's buffers (and DCP's stager); a later save builds a new one."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def _finish_previous_save(self) -> None:
        """Wait for the save in flight; every rank raises if rank 0's failed (else the others would wait forever)."""
        if not self.async_save:
            return  # a synchronous saver never has one
        failure: BaseException | None = None
        try:
            self._background.wait()
        except Exception as err:  # noqa: BLE001 - shared with every rank below, then raised
            failure = err
        share_rank_zero_failure(failure, "finish writing a checkpoint in the background")

    def _register_sharded_upload(self, logger: Logger | None, target: _Target) -> FolderUpload | None:
        """Every rank, on the training thread, when a sharded folder's save is taken: its upload is registered now
        (so every rank lists the same folders in the same order), and it counts as in flight from now on, so no
        prune takes it until the store holds all of it; its uploads start once it is published, and ``cairn.pt``
        follows when every rank's are stored (:mod:`~cairn.checkpoint.save.remote_shards`)."""
        if logger is None or not logger.uploads_files or not target.sharded:
            return None
        upload = self._sharded_uploads.register(
            logger, target.path, target.remote_name, pointer=target.remote_pointer, overwrite=self.overwrite
        )
        with self._uploading_lock:
            self._uploading.append((upload.settled, target.path))
            self._upload_failed.discard(target.path)  # the folder whose upload failed is being replaced
            self._remote_of[target.path] = target.remote_name
        return upload

    def _after_write(self, logger: Logger | None, target: _Target) -> None:
        """Rank 0, once the file is complete: move the latest link, start uploads, prune old files."""
        if target.latest_link is not None:
            atomic_symlink(target.latest_link, target.path)
        if logger is not None and logger.uploads_files and not target.sharded:  # a folder: every rank uploads
            futures = self._upload(logger, target)
            with self._uploading_lock:
                self._uploading.extend((future, target.path) for future in futures)
                self._upload_failed.discard(target.path)  # the file whose upload failed was just replaced
                self._remote_of[target.path] = target.remote_name
        self._last_target = target
        self._prune()
        self._announce(logger, target)

    def _announce(self, logger: Logger | None, target: _Target) -> None:
        """Rank 0, after the prune has settled which checkpoint is best: tell the experiment trackers that this one
        is complete, and keep the local file until each has stored it (as for an upload in flight)."""
        if logger is None or target.sharded or not logger.logs_checkpoints:
            return  # (reading the record back costs an unpickle of the file's structure: only for a tracker)
        record = self._records.record(target.path)
        aliases = ("latest", "best") if self._is_best(target) else ("latest",)
        batch = int(record.progress.get("batch", 0))
        futures = logger.log_checkpoint(
            SavedCheckpoint(target.path, target.remote_name, record.content_hash, aliases, batch)
        )
        if futures:
            with self._uploading_lock:
                self._uploading.extend((future, target.path) for future in futures)

    def _is_best(self, target: _Target) -> bool:
        """Whether ``target`` ranks first by ``best_metric`` among the checkpoints on disk (with ``keep_best``)."""
        if not self.keep_best or self.best_metric is None:
            return False
        candidates = candidates_in(
            target.folder, target.retention_pattern, metric=self.best_metric, cache=self._records
        )
        ranking = best_ranking(candidates, self.best_mode)
        return bool(ranking) and os.path.abspath(ranking[0].name) == os.path.abspath(target.path)

    def _upload(self, logger: Logger, target: _Target) -> list[Future[str]]:
        """Hand the new file to every uploader; one future per upload. A manifest (an incremental save) goes to each
        store only after the chunks that store lacks (:mod:`~cairn.checkpoint.save.remote_chunks`): its future
        completes when the manifest is verified there, and fails if any of its chunks failed."""
        use = self._chunk_references.of(target.path) if self._store_chunks is not None else None
        if use is None or use.folder is None:
            return logger.upload_file(
                target.remote_name, target.path, overwrite=self.overwrite, pointer_name=target.remote_pointer
            )
        relative = os.path.relpath(use.folder, os.path.realpath(os.path.dirname(target.path) or ".")).replace(
            os.sep, "/"
        )
        return [
            self._store_chunks.upload(  # type: ignore[union-attr]
                transfers,
                target.remote_name,
                target.path,
                local_chunks=use.folder,
                relative=relative,
                chunks=use.chunks,
                overwrite=self.overwrite,
                pointer_name=target.remote_pointer,
            )
            for transfers in transfers_among(logger.destinations)
        ]

    def _prune(self) -> None:
        """Apply the retention rules after the newest save (rank 0), from the files on disk: move the ``best``
        link first, then delete what no rule and no link keeps. Never deleted: the checkpoint just written, and
        every one whose upload is in flight or failed; they count among the recent ones, and go at a later prune.
        With ``num_checkpoints_to_keep=0`` only checkpoints this run has uploaded are deleted (and the ``latest``
        link then goes with its checkpoint), unless another rule keeps them."""
        target = self._last_target
        if target is None or (self.num_checkpoints_to_keep < 0 and not self._links_best):
            return  # nothing can be deleted, and no link to move
        with self._prune_lock:
            candidates = candidates_in(
                target.folder, target.retention_pattern, metric=self.best_metric, cache=self._records
            )
            self._move_best_link(target, candidates)
            if self.num_checkpoints_to_keep < 0:
                return
            links = {"best": link_target(target.best_link)}
            if self.num_checkpoints_to_keep > 0:  # with 0, the latest link goes with its checkpoint, as it always did
                links["latest"] = link_target(target.latest_link)
            named = {label: path for label, path in links.items() if path is not None}
            removed = prune(candidates, self.retention, links=named, protect=self._protected(target, candidates))
            with self._uploading_lock:
                self._uploaded -= set(removed)
            _unlink_links_to(removed)
            if removed and self.incremental:
                collect_garbage(target.folder, self._chunk_references)  # the chunks only those manifests named

    def _protected(self, target: _Target, candidates: list[RetentionCandidate]) -> set[str]:
        """What no rule may delete now: the checkpoint just written and those whose upload is in flight or failed;
        with ``num_checkpoints_to_keep=0``, every checkpoint this run has not uploaded."""
        unsettled = self._not_safely_uploaded()
        if self.num_checkpoints_to_keep > 0:
            return {target.path, *unsettled}
        with self._uploading_lock:
            uploaded = {os.path.abspath(path) for path in self._uploaded - unsettled}
        return {c.name for c in candidates if os.path.abspath(c.name) not in uploaded}

    def _move_best_link(self, target: _Target, candidates: list[RetentionCandidate]) -> None:
        """Point the ``best`` link at the best checkpoint on disk (before any prune: the old best may then go).
        Left as it is while no checkpoint has recorded the metric."""
        if target.best_link is None or not self._links_best:
            return
        ranking = best_ranking(candidates, self.best_mode)
        if ranking and link_target(target.best_link) != os.path.abspath(ranking[0].name):
            atomic_symlink(target.best_link, ranking[0].name, argument="save_best_filename (best_filename)")

    def _not_safely_uploaded(self) -> set[str]:
        """Local checkpoints whose upload is still in flight or failed: deleting one would lose the only copy."""
        with self._uploading_lock:
            unsettled = {path for future, path in self._uploading if not future.done() or _failed(future)}
            return unsettled | self._upload_failed

    def remote_template(self) -> str:
        """The format string of a checkpoint's name in the store."""
        return self.remote_file_name or f"{{run_name}}/checkpoints/{self.filename}"

    def latest_pointer_template(self) -> str | None:
        """The format string of the store's ``latest`` pointer's name: ``latest_remote_file_name``, else
        ``latest_filename`` beside the checkpoint's remote name (``.symlink`` added); None without a pointer."""
        if self.latest_remote_file_name is not None:
            return self.latest_remote_file_name
        if self.latest_filename is None:
            return None
        return pointer_beside(self.remote_template(), self.latest_filename)

    def remote_names(self, state: State) -> tuple[str, str | None]:
        """The checkpoint's name in the store, and its latest pointer's (``<latest name>.symlink``)."""
        template = self.remote_template()
        name = format_name(template, state, rank=0)
        if self.latest_remote_file_name is not None:
            return name, format_name(self.latest_remote_file_name, state, rank=0)
        if self.latest_filename is None:
            return name, None
        return name, pointer_beside(name, format_name(self.latest_filename, state, rank=0))

    def remote_best_pointer(self, state: State) -> str | None:
        """The store's ``best`` pointer (``<best name>.symlink`` beside the checkpoint's name in the store, as the
        ``latest`` pointer is named from ``latest_filename``), or None without a ``best`` link. Autoresume never
        follows it: it follows ``latest`` only."""
        if not self._links_best:
            return None
        name = format_name(self.remote_template(), state, rank=0)
        return pointer_beside(name, format_name(self.best_filename, state, rank=0))  # type: ignore[arg-type]

    def _forget_uploaded(self) -> None:
        """Forget finished uploads, remembering the failed ones (their files are kept, as their errors say); with
        ``num_checkpoints_to_keep=0``, delete the local copies whose every upload succeeded."""
        with self._uploading_lock:
            finished = [(future, path) for future, path in self._uploading if future.done()]
            self._uploading = [(future, path) for future, path in self._uploading if not future.done()]
            self._upload_failed |= {path for future, path in finished if _failed(future)}
            unsettled = self._upload_failed | {path for _, path in self._uploading}  # another uploader's, say
            verified = {path for _, path in finished} - unsettled
            self._uploaded |= verified
            remote = {path: self._remote_of.pop(path) for path in verified if path in self._remote_of}
        if get_rank() != 0 or not finished:
            return  # rank 0 alone prunes
        for path, name in remote.items():  # read now: a local prune may delete the file
            self._store_retention.note_verified(name, self._records.record(path))
        if self.num_checkpoints_to_keep == 0:
            self._prune()
        self._prune_store()

    def _wait_for_store_pointers(self) -> None:
        """At the end of fit, with store retention (rank 0): wait until each store's ``latest`` pointer has moved to
        the last upload, so the final prune sees it there and not at the checkpoint before (which it would keep).
        An upload failure is raised here, as the uploader's own wait at FIT_END would raise it; in a distributed run
        that wait raises it, on every rank (rank 0 raising it alone here would leave the others waiting for it)."""
        target = self._last_target
        if get_rank() != 0 or self.remote_retention is None or target is None:
            return
        for scope in target.store_scopes:
            if is_distributed():
                scope.transfers.drain()
            else:
                scope.transfers.wait()

    def _prune_store(self) -> None:
        """Apply the rules in each uploader's store (rank 0, once uploads settled): :class:`StoreRetention` moves
        the ``best`` pointer and deletes what no rule and no pointer keeps, never an upload in flight."""
        target = self._last_target
        if target is None or not target.store_scopes:
            return
        with self._uploading_lock:
            in_flight = {self._remote_of[path] for future, path in self._uploading if path in self._remote_of}
        self._store_retention.apply(target.store_scopes, in_flight=in_flight)


def _refuse_latest_names_that_clash(saver: CheckpointSaver) -> None:
    """The latest link (and the store's pointer) must never take a checkpoint's name: each swap would replace that
    checkpoint with a link (to itself, with one rolling file), and nothing would be left to load."""
    if saver.latest_filename is not None:
        clash = template_clash(saver.filename, saver.latest_filename)
        if clash is not None:
            raise ValueError(
                f"save_filename={saver.filename!r} and save_latest_filename={saver.latest_filename!r} (filename and "
                f"latest_filename) can both name {clash!r}, and the latest link would replace that checkpoint; give "
                "the link a name no checkpoint can take (such as 'latest-rank{rank}.pt' beside a save_filename with "
                "{epoch} or {batch}), or pass save_latest_filename=None"
            )
    remote = saver.remote_template()
    pointer = saver.latest_pointer_template()
    clash = None if pointer is None else template_clash(remote, pointer, nested=False)
    if clash is not None:
        raise ValueError(
            f"save_remote_file_name={remote!r} and the latest pointer {pointer!r} (latest_remote_file_name, or "
            f"save_latest_filename + {POINTER_SUFFIX!r}) can both name {clash!r}, and the pointer would replace that "
            "checkpoint in the store; pass a latest_remote_file_name no checkpoint name can take"
        )


def _refuse_existing_checkpoints(folder: str, pattern: re.Pattern[str]) -> None:
    """A new run (neither resumed nor allowed to overwrite) never replaces an earlier run's checkpoints."""
    existing = broadcast_object(list_checkpoints(folder, pattern))
    if existing:
        raise FileExistsError(
            f"{folder!r} already holds checkpoints of this run's name pattern ({existing[-1]!r} and "
            f"{len(existing) - 1} more); pass save_overwrite=True (overwrite=True) to replace them, use "
            "autoresume=True to continue that run, or choose another folder"
        )


def _refuse_uploaders_without_a_store(logger: Logger) -> None:
    """An incremental checkpoint goes to a store as its chunks, then its manifest, which needs the store itself
    (``LoggerDestination.transfers``); a destination that only takes whole files would get a manifest naming
    chunks it never received, so it is refused before training rather than skipped at each save."""
    plain = [
        type(destination).__name__
        for destination in logger.destinations
        if type(destination).upload_file is not LoggerDestination.upload_file and destination.transfers is None
    ]
    if plain:
        raise ValueError(
            f"incremental=True (save_incremental) uploads chunks and manifests through an object store, but the "
            f"logger {plain[0]} uploads whole files only; use a RemoteUploaderDownloader or an s3://, gs:// or "
            "oci:// save_folder, or save full checkpoints"
        )


def _in_the_way(folder: str, pattern: re.Pattern[str], *, overwrite: bool, sharded: bool) -> str | None:
    """Why the save of some name of ``pattern`` would fail after training, or None: a link (unless overwrite
    replaces it), a folder that is no checkpoint, or a FIFO, socket or device. Autoresume and the check for
    existing checkpoints list only checkpoints, so without this the first save of that name failed an epoch in."""
    for entry in named_entries(folder, pattern):
        path = entry.path
        if entry.kind == "link" and (not overwrite or (sharded and not os.path.exists(path))):
            replace = "a sharded checkpoint folder cannot replace a link that leads nowhere" if overwrite else (
                "pass save_overwrite=True (overwrite=True) to replace it"
            )
            return (
                f"{path!r} is a symbolic link named like one of this run's checkpoints, and the save of that name "
                f"would fail after training: remove or rename it, or {replace}"
            )
        if entry.kind == "folder":
            return (
                f"{path!r} is a folder named like one of this run's checkpoints but is none (it holds no cairn.pt), "
                "and no save can replace it, even with overwrite: move it away, or choose another save_folder or "
                "save_filename"
            )
        if entry.kind == "special":
            return (
                f"{path!r} is a {_special_kind(path)} named like one of this run's checkpoints, not a checkpoint, "
                "and the save of that name would fail or replace it: remove it, or choose another save_folder"
            )
    return None


def _special_kind(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return "special file"
    return "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"


def _failed(upload: Future[str]) -> bool:
    """Whether a finished upload failed (or was cancelled): its local file must stay."""
    return upload.cancelled() or upload.exception() is not None


def _unlink_links_to(removed: Sequence[str]) -> None:
    """Remove the links beside deleted checkpoints that named them (``latest`` with ``num_checkpoints_to_keep=0``):
    a link that leads nowhere would only mislead a reader."""
    gone = {os.path.abspath(path) for path in removed}
    for folder in {os.path.dirname(path) or "." for path in removed}:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() and link_target(entry.path) in gone:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def save_checkpoint(
    state: State, path: str, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), overwrite: bool = True
) -> str:
    """Write a checkpoint of ``state`` to ``path`` now, atomically; savers and manual saves both come here.

    Every rank of a distributed run must call it (the RNG states are gathered); rank 0 alone writes.
    """
    ignore_keys = check_ignore_keys(ignore_keys, argument="ignore_keys", loading=False)  # type: ignore[assignment]
    SingleFileWriter(weights_only=weights_only, ignore_keys=ignore_keys, overwrite=overwrite).start(state, path)()
    return path
