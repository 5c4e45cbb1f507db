"""Finding the checkpoint a run resumes from, and wiring the Trainer's ``save_*`` / ``load_*`` arguments."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from cairn.checkpoint.folder import list_checkpoints
from cairn.checkpoint.load.loader import apply_checkpoint, read_checkpoint
from cairn.checkpoint.load.remote import RemoteShards, opened_remote_checkpoint
from cairn.checkpoint.naming.templates import PROGRESS_ORDER, format_name, name_pattern, progress_in_name
from cairn.checkpoint.save.saver import CheckpointSaver
from cairn.checkpoint.save.store_names import store_checkpoints
from cairn.core.logger import LoggerDestination, transfers_among
from cairn.core.state import State
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, ObjectStoreError
from cairn.names import DAMAGED_MARKER
from cairn.storage.base import ObjectStore
from cairn.storage.pointer import read_pointer
from cairn.storage.uri import is_uri, parse_uri, store_from_uri
from cairn.utils.dist import get_rank
from cairn.utils.text import printable

if TYPE_CHECKING:
    from cairn.storage.transfer import Transfers

__all__ = [
    "check_autoresume_names",
    "find_latest_checkpoint",
    "find_remote_latest",
    "Found",
    "opened_load_path",
    "read_load_path",
    "restore",
    "saving_from_arguments",
    "first_uploader_transfers",
]

log = logging.getLogger(__name__)


class Found(NamedTuple):
    """A checkpoint autoresume or ``load_path`` found: where it is, what it holds, and (for one from a store) where
    a sharded folder's shards are read from while it is applied: each rank fetches the files its own plan reads
    (:class:`~cairn.checkpoint.load.remote.RemoteShards`)."""

    path: str
    checkpoint: dict[str, Any]
    shards_at: str | RemoteShards | None = None


def find_latest_checkpoint(saver: CheckpointSaver, state: State) -> Found | None:
    """The newest checkpoint of ``saver``'s folder that reads and verifies, with its content; None if none does.

    Every file matching the saver's name pattern is complete (writes are atomic), so the newest of them wins,
    even when a crash came between its rename and the ``latest`` link's swap; the link's target is the fallback
    for names that carry no progress numbers, taken only when this saver could have named it (another run sharing
    the folder may have moved the link to its own file). A damaged file falls back to the one before it, and is
    set aside so that the save which takes its name again can be written.
    """
    folder = format_name(saver.folder, state, rank=0)
    pattern = name_pattern(saver.filename, state, rank=0)
    candidates = list(reversed(list_checkpoints(folder, pattern)))
    if saver.latest_filename is not None:
        link = os.path.join(folder, format_name(saver.latest_filename, state, rank=0))
        target = _link_target(link, folder, pattern)
        if target is not None:
            candidates.append(target)
    for path in candidates:
        try:
            return Found(path, read_checkpoint(path, for_resume=True))  # applied whole: see read_checkpoint
        except (CheckpointCorruptError, FileNotFoundError) as err:
            log.warning("autoresume skips %s: %s", path, err)
            if isinstance(err, CheckpointCorruptError) and get_rank() == 0:
                set_aside_damaged(path, folder, pattern)
    return None


def _link_target(link: str, folder: str, pattern: re.Pattern[str]) -> str | None:
    """Where the ``latest`` link points, when that is inside ``folder`` under a name of this saver's pattern."""
    if not os.path.islink(link):
        return None
    target = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
    if not _inside(target, folder):
        log.warning("autoresume ignores %s: it points outside %s, to %s", link, folder, target)
        return None
    if pattern.match(_relative_name(target, folder)) is None:
        log.warning(
            "autoresume ignores %s: it points to %s, which this run's save_filename does not name", link, target
        )
        return None
    return target


def _relative_name(path: str, folder: str) -> str:
    return os.path.relpath(path, folder).replace(os.sep, "/")


def set_aside_damaged(path: str, folder: str, pattern: re.Pattern[str]) -> str | None:
    """Rename a damaged checkpoint to ``<name>.damaged-<UTC time>-<token>``, beside it; return the new path.

    Kept, never deleted (it may be the only copy of hours of work, and a tool may salvage it), but under a name no
    checkpoint pattern takes: retention and autoresume no longer see it, and the save that comes to its name again
    (the run falls back to the checkpoint before it) is not refused by overwrite=False forever. Only a checkpoint of
    this saver's pattern in its own folder is touched, never a link or anything a link leads to.
    """
    if os.path.islink(path) or not _inside(path, folder) or pattern.match(_relative_name(path, folder)) is None:
        return None
    aside = _damaged_name(path)
    if pattern.match(_relative_name(aside, folder)) is not None:  # a pattern that takes any ending: leave it be
        return None
    try:
        os.rename(path, aside)
    except OSError as err:
        log.warning("could not set the damaged checkpoint %s aside (%s); it stays under its name", path, err)
        return None
    log.warning("set the damaged checkpoint %s aside as %s: it is kept, and no longer read or pruned", path, aside)
    return aside


def _inside(path: str, folder: str) -> bool:
    """Whether ``path``, with every symlink followed, lies under ``folder``: autoresume reads nothing else."""
    real_folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), real_folder]) == real_folder


def find_remote_latest(
    saver: CheckpointSaver,
    state: State,
    transfers: Transfers,
    *,
    progress: bool,
    listed: list[str] | None = None,
    downloads: contextlib.ExitStack | None = None,
    skip: frozenset[str] = frozenset(),
) -> Found | None:
    """The newest checkpoint of ``saver``'s remote names in the store of ``transfers`` (the run's first uploader's)
    that downloads and verifies, with its content; None if none does.

    As in a local folder: uploads are verified before the pointer moves, and objects appear whole, so every object
    of the saver's remote name pattern is complete, and the newest of them wins even when a run died between an
    upload and the pointer's move (following the pointer alone restarted it from the one before, whose next upload
    ``save_overwrite=False`` then refused forever). The pointer's target comes first among names with the same
    progress numbers (names without any), and last when the listing lacks it; it is taken only when this run's
    remote template could have produced it (another run may share the pointer). A damaged object falls back to
    the one before it, and is kept aside (:func:`_set_aside_damaged_object`) so that the run can save that name
    again. Tries the newest first and stops at the first that verifies: no more is downloaded than needed.
    ``listed`` is the store's listing (:func:`store_checkpoints`) when the caller already has it. With
    ``downloads``, the download is kept until that stack closes: a sharded folder's ``cairn.pt`` and index are
    downloaded and verified here, and each rank fetches the shard files its own plan reads when it is applied, so
    a shard damaged in the store is found then (:func:`restore` then asks again, with that folder's URI in
    ``skip``: the URIs of checkpoints not to take).
    """
    store = transfers.store
    if listed is None:
        listed = store_checkpoints(transfers, saver.remote_template(), state)
    pointed = _pointer_target(saver, state, transfers)
    pattern = name_pattern(transfers.remote_template(saver.remote_template()), state, rank=0)
    candidates = sorted(listed, key=lambda name: (progress_in_name(pattern, name) or (), name == pointed), reverse=True)
    if pointed is not None and pointed not in listed:
        candidates.append(pointed)
    for name in [name for name in candidates if store.get_uri(name) not in skip]:
        keep = functools.partial(_set_aside_damaged_object, transfers, name, pattern) if get_rank() == 0 else None
        try:
            opened = opened_remote_checkpoint(
                store,
                name,
                progress=progress,
                keep_damaged=keep,
                shards_on_demand=downloads is not None,
                for_resume=True,  # autoresume applies what it finds whole
            )
            with contextlib.ExitStack() as attempt:
                checkpoint, local = attempt.enter_context(opened)
                if downloads is not None:
                    downloads.enter_context(attempt.pop_all())
                return Found(store.get_uri(name), checkpoint, local if downloads is not None else None)
        except (CheckpointCorruptError, CheckpointNotFoundError) as err:
            log.warning("autoresume skips %s: %s", store.get_uri(printable(name)), err)
    return None


def _pointer_target(saver: CheckpointSaver, state: State, transfers: Transfers) -> str | None:
    """The object the store's ``latest`` pointer names, when this run's remote name template could have produced
    it; None when there is no pointer, or it names another run's object (said in the log). A pointer that holds no
    object name (``..``, an absolute name) raises ``CheckpointCorruptError``: someone tampered with the store."""
    _, pointer = saver.remote_names(state)
    if pointer is None:
        return None
    target = read_pointer(transfers.store, transfers.remote_name(pointer))  # a poisoned one raises: loud, as before
    if target is None:
        return None
    name = _remote_file_name(transfers, target)
    if name is None or name_pattern(saver.remote_template(), state, rank=0).match(name) is None:
        log.warning(
            "autoresume ignores the latest pointer %s: it names %s, which this run's remote file name does not name",
            transfers.store.get_uri(transfers.remote_name(pointer)),
            printable(target),
        )
        return None
    return target


def _set_aside_damaged_object(transfers: Transfers, name: str, pattern: re.Pattern[str], downloaded: str) -> None:
    """Keep a copy of the damaged object ``name`` (its download at ``downloaded``) as
    ``<name>.damaged-<UTC time>-<token>``, and let this run's next save of ``name`` replace it.

    The store's form of :func:`set_aside_damaged`: stores cannot rename, and cairn never deletes an object, so
    the bytes are copied under a name no checkpoint pattern takes (autoresume, the fit-start check and the pointer
    no longer see it), and only then may the run's upload of ``name`` replace the original, once, even with
    ``save_overwrite=False``. When the copy fails, nothing is replaced and the run's save of that name is refused
    (loudly), as before.
    """
    aside = _damaged_name(name)
    if pattern.match(aside) is not None:  # a pattern that takes any ending: leave it be
        return
    store = transfers.store
    try:
        store.upload_object(aside, downloaded, overwrite=False)
        store.verify_upload(aside, downloaded)
    except (ObjectStoreError, OSError) as err:
        log.warning(
            "could not keep a copy of the damaged checkpoint %s (%s); it stays, and this run will not replace it",
            store.get_uri(printable(name)),
            err,
        )
        return
    transfers.replace_damaged(name)
    log.warning(
        "kept a copy of the damaged checkpoint %s as %s; this run's save of that name replaces it",
        store.get_uri(printable(name)),
        store.get_uri(printable(aside)),
    )


def _damaged_name(name: str) -> str:
    """``<name>.damaged-<UTC time>-<token>``: where a damaged checkpoint is kept, locally or in a store."""
    return f"{name}{DAMAGED_MARKER}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(2)}"


def _remote_file_name(transfers: Transfers, object_name: str) -> str | None:
    """The ``remote_file_name`` that ``transfers.remote_name`` turns into ``object_name`` (its format string may add
    a prefix or a suffix), or None when none does."""
    parts = transfers.remote_name("\0").split("\0")
    length, remainder = divmod(len(object_name) - sum(map(len, parts)), len(parts) - 1)
    if length < 0 or remainder:
        return None
    name = object_name[len(parts[0]) : len(parts[0]) + length]
    return name if transfers.remote_name(name) == object_name else None


def first_uploader_transfers(destinations: Sequence[object]) -> Transfers | None:
    """The transfers of the first uploader among the run's loggers: the store autoresume reads, and whose names it
    must find again. Found through :attr:`LoggerDestination.transfers`: checkpoint code knows no logger class."""
    return next(iter(transfers_among(destinations)), None)


def check_autoresume_names(
    saver: CheckpointSaver | None, destinations: Sequence[object], *, autoresume: bool, run_name: str | None
) -> None:
    """Refuse ``autoresume=True`` when the checkpoint names hold ``{run_name}`` and no run name is given: each
    restart would make up a new name, and look for its checkpoints where none were ever written."""
    if autoresume and run_name is None and saver is not None and "{run_name}" in _name_templates(saver, destinations):
        raise ValueError("autoresume=True with {run_name} in the checkpoint names needs an explicit run_name")


def _name_templates(saver: CheckpointSaver, destinations: Sequence[object]) -> str:
    """Every name template autoresume must find again: local ones, and remote ones when something uploads."""
    uploads = first_uploader_transfers(destinations) is not None
    remote = (saver.remote_file_name or "{run_name}/checkpoints/") if uploads else ""
    return saver.folder + saver.filename + remote


def restore(
    state: State,
    *,
    load_path: str | None,
    load_object_store: ObjectStore | LoggerDestination | None = None,
    weights_only: bool,
    strict: bool,
    ignore_keys: Sequence[str],
    autoresume: bool,
    saver: CheckpointSaver | None,
    destinations: Sequence[object] = (),
    progress: bool = True,
) -> str | None:
    """Load what the arguments ask for into ``state``; return the checkpoint's path, or None for a fresh start.

    ``destinations`` are the run's loggers: autoresume also looks in the store of the first uploader among them.
    """
    with contextlib.ExitStack() as downloads:  # what came from a store stays on disk until it is applied
        if autoresume:
            resumed = _autoresume(saver, state, destinations, progress=progress, downloads=downloads)
            if resumed is not None:
                _note_ignored_load_options(load_path, weights_only=weights_only, strict=strict, ignore_keys=ignore_keys)
                return resumed
        if load_path is None:
            return None
        opened = opened_load_path(load_path, load_object_store, progress=progress, for_resume=not weights_only)
        checkpoint, local = downloads.enter_context(opened)
        apply_checkpoint(
            checkpoint,
            state,
            source=load_path,
            weights_only=weights_only,
            strict=strict,
            ignore_keys=ignore_keys,
            shards_at=local,
        )
        return load_path


def _autoresume(
    saver: CheckpointSaver | None,
    state: State,
    destinations: Sequence[object],
    *,
    progress: bool,
    downloads: contextlib.ExitStack,
) -> str | None:
    """Restore the run's newest good checkpoint (the run's own: everything comes back); its path, or None.

    A sharded folder in a store has only its ``cairn.pt`` and index verified before it is chosen; a shard that
    fails its digest is found as it is applied, before any of the model changes (every rank fetches and checks its
    files before DCP reads any), so that folder is skipped for the one before it, as a damaged file is."""
    skip: set[str] = set()
    while (
        found := _autoresume_target(
            saver, state, destinations, progress=progress, downloads=downloads, skip=frozenset(skip)
        )
    ) is not None:
        try:
            apply_checkpoint(found.checkpoint, state, source=found.path, shards_at=found.shards_at)
        except CheckpointCorruptError as err:
            if not isinstance(found.shards_at, RemoteShards) or found.path in skip:
                raise
            log.warning("autoresume skips %s: %s", printable(found.path), err)
            skip.add(found.path)
            continue
        log.info("autoresume: continuing from %s", found.path)
        return found.path
    return None


def _autoresume_target(
    saver: CheckpointSaver | None,
    state: State,
    destinations: Sequence[object],
    *,
    progress: bool,
    downloads: contextlib.ExitStack,
    skip: frozenset[str] = frozenset(),
) -> Found | None:
    """The checkpoint autoresume continues from: the newest good one here, unless the store of the run's first
    uploader holds one further along; None for a fresh start."""
    if saver is None:
        raise ValueError("autoresume=True needs save_folder: that is where it looks for the run's checkpoints")
    found = find_latest_checkpoint(saver, state)
    transfers = first_uploader_transfers(destinations)
    if transfers is not None:
        found = _local_unless_store_is_ahead(
            found, saver, state, transfers, progress=progress, downloads=downloads, skip=skip
        )
    if found is None:
        log.info("autoresume: no checkpoint in %s yet; starting fresh", format_name(saver.folder, state, rank=0))
    return found


def _local_unless_store_is_ahead(
    found: Found | None,
    saver: CheckpointSaver,
    state: State,
    transfers: Transfers,
    *,
    progress: bool,
    downloads: contextlib.ExitStack,
    skip: frozenset[str] = frozenset(),
) -> Found | None:
    """The local checkpoint, unless the store holds one further along (or there is no local one); none whose URI
    is in ``skip``.

    A node that comes back with an old local folder (ep1) while the store holds ep3 must not resume behind its
    store: it would redo ep2 and ep3, and with ``save_overwrite=False`` its upload of ep2 would be refused at
    every restart. Names are compared first (no download); the store's checkpoint is taken only when its
    timestamp is really ahead of the local one's once downloaded and verified.
    """
    listed = [  # listed once, for both steps below
        name
        for name in store_checkpoints(transfers, saver.remote_template(), state)
        if transfers.store.get_uri(name) not in skip
    ]
    if found is not None and not _store_may_be_ahead(found[0], listed, saver, state, transfers):
        return found
    remote = find_remote_latest(
        saver, state, transfers, progress=progress, listed=listed, downloads=downloads, skip=skip
    )
    if found is None or (remote is not None and _batches(remote[1]) > _batches(found[1])):
        if found is not None and remote is not None:
            log.warning(
                "autoresume: %s in the store is further along than %s here; resuming from the store",
                printable(remote[0]),
                found[0],
            )
        return remote
    return found


def _store_may_be_ahead(
    local: str, listed: list[str], saver: CheckpointSaver, state: State, transfers: Transfers
) -> bool:
    """Whether the newest name of the run in the store carries higher progress numbers than the local file's
    (both templates must number the same things; otherwise the names cannot tell, and the local file stands)."""
    folder = format_name(saver.folder, state, rank=0)
    local_numbers = _numbers(name_pattern(saver.filename, state, rank=0), _relative_name(local, folder))
    remote_pattern = name_pattern(transfers.remote_template(saver.remote_template()), state, rank=0)
    if not listed or not local_numbers:
        return False
    remote_numbers = _numbers(remote_pattern, listed[0])
    if set(remote_numbers) != set(local_numbers):
        return False
    order = [key for key in PROGRESS_ORDER if key in local_numbers]
    return [remote_numbers[key] for key in order] > [local_numbers[key] for key in order]


def _numbers(pattern: re.Pattern[str], name: str) -> dict[str, float]:
    match = pattern.match(name)
    return {} if match is None else {k: float(v) for k, v in match.groupdict().items() if v is not None}


def _batches(checkpoint: dict[str, Any]) -> int:
    timestamp = checkpoint["state"].get("timestamp")
    return int(timestamp.get("batch", 0)) if isinstance(timestamp, dict) else 0


def _note_ignored_load_options(
    load_path: str | None, *, weights_only: bool, strict: bool, ignore_keys: Sequence[str]
) -> None:
    """The ``load_*`` options shape a first load; resuming a run's own checkpoint restores all of it
    (docs/checkpointing.md, "Autoresume")."""
    ignored = [
        name
        for name, given in (
            ("load_path", load_path is not None),
            ("load_weights_only", weights_only),
            ("load_strict_model_weights=False", not strict),
            ("load_ignore_keys", bool(ignore_keys)),
        )
        if given
    ]
    if ignored:
        log.info(
            "autoresume found the run's own checkpoint, so %s is ignored: all of it is restored", ", ".join(ignored)
        )


def read_load_path(path: str, source: ObjectStore | LoggerDestination | None, *, progress: bool) -> dict[str, Any]:
    """The checkpoint ``load_path`` names: a local file or sharded folder, a URI, or a name inside
    ``load_object_store`` (a store, or an uploader: the name then goes inside its path and
    ``file_path_format_string``). A sharded folder in a store is downloaded whole, and every shard verified."""
    with opened_load_path(path, source, progress=progress, shards_on_demand=False) as (checkpoint, _):
        return checkpoint


@contextlib.contextmanager
def opened_load_path(
    path: str,
    source: ObjectStore | LoggerDestination | None,
    *,
    progress: bool,
    shards_on_demand: bool = True,
    for_resume: bool = False,
) -> Iterator[tuple[dict[str, Any], str | RemoteShards | None]]:
    """As :func:`read_load_path`, and, while the ``with`` lasts, where a checkpoint from a store is read from when
    it is applied: the local download, or for a sharded folder (with ``shards_on_demand``) the folder in the store,
    from which each rank fetches the shard files its own plan reads; None for a local checkpoint. ``for_resume``:
    a single file's optimizer state (local, or the download of one from a store) is copied out while it is read
    (:func:`read_checkpoint`)."""
    opened = functools.partial(
        opened_remote_checkpoint, progress=progress, shards_on_demand=shards_on_demand, for_resume=for_resume
    )
    if source is not None:
        located = source.checkpoint_source(path) if isinstance(source, LoggerDestination) else None
        if located is not None:
            with opened(*located) as found:
                yield found
            return
        if not isinstance(source, ObjectStore):
            raise TypeError(
                "load_object_store must be an ObjectStore, a RemoteUploaderDownloader or an experiment tracker's "
                f"logger (WandBLogger, MLFlowLogger), not {source!r}"
            )
        with opened(source, path) as found:
            yield found
        return
    if is_uri(path):
        store, name = store_from_uri(path)
        try:
            with opened(store, name) as found:
                yield found
        finally:
            store.close()
        return
    yield read_checkpoint(path, for_resume=for_resume), None


def saving_from_arguments(
    save_folder: str | None, *, save_filename: str, save_remote_file_name: str | None, **saver_kwargs: Any
) -> tuple[CheckpointSaver | None, str | None]:
    """The Trainer's ``save_*`` arguments as one saver, plus the bucket to upload to when ``save_folder`` is a URI
    (the Trainer builds the uploader for it: checkpoint code knows no logger class).

    ``save_folder="s3://bucket/path"`` writes locally under ``path`` (relative to the working directory) and
    uploads each file as ``path/<save_filename>`` unless ``save_remote_file_name`` says otherwise.
    """
    if save_folder is None:
        return None, None
    bucket_uri = None
    folder, remote_name = save_folder, save_remote_file_name
    if is_uri(save_folder):
        parsed = parse_uri(save_folder)
        folder = parsed.path or "."
        remote_name = remote_name or posixpath.join(parsed.path, save_filename)
        bucket_uri = parsed.bucket_uri
    saver = CheckpointSaver(folder=folder, filename=save_filename, remote_file_name=remote_name, **saver_kwargs)
    return saver, bucket_uri
