"""Finding the checkpoint a run resumes from, and wiring the Trainer's ``save_*`` / ``load_*`` arguments."""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Sequence
from typing import Any

from cairn.checkpoint.loader import apply_checkpoint, read_checkpoint
from cairn.checkpoint.naming import format_name, name_pattern
from cairn.checkpoint.remote import read_pointer, read_remote_checkpoint
from cairn.checkpoint.retention import list_checkpoints
from cairn.checkpoint.saver import CheckpointSaver
from cairn.core.state import State
from cairn.errors import CheckpointCorruptError
from cairn.loggers.remote_uploader_downloader import RemoteUploaderDownloader
from cairn.storage.base import ObjectStore
from cairn.storage.uri import is_uri, parse_uri, store_from_uri

__all__ = ["find_latest_checkpoint", "find_remote_latest", "restore", "saving_from_arguments"]

log = logging.getLogger(__name__)


def find_latest_checkpoint(saver: CheckpointSaver, state: State) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of ``saver``'s folder that reads and verifies, with its content; None if none does.

    Every file matching the saver's name pattern is complete (writes are atomic), so the newest of them wins,
    even when a crash came between its rename and the ``latest`` link's swap; the link's target is the fallback
    for names that carry no progress numbers. A damaged file falls back to the one before it.
    """
    folder = format_name(saver.folder, state, rank=0)
    candidates = list(reversed(list_checkpoints(folder, name_pattern(saver.filename, state, rank=0))))
    if saver.latest_filename is not None:
        link = os.path.join(folder, format_name(saver.latest_filename, state, rank=0))
        if os.path.islink(link):
            target = os.path.join(folder, os.readlink(link))
            if _inside(target, folder):
                candidates.append(target)
            else:
                log.warning("autoresume ignores %s: it points outside %s, to %s", link, folder, target)
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except (CheckpointCorruptError, FileNotFoundError) as err:
            log.warning("autoresume skips %s: %s", path, err)
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether ``path``, with every symlink followed, lies under ``folder``: autoresume reads nothing else."""
    real_folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), real_folder]) == real_folder


def find_remote_latest(
    saver: CheckpointSaver, state: State, uploader: RemoteUploaderDownloader, *, progress: bool
) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint the store's ``latest`` pointer names, downloaded and verified; None if there is no pointer."""
    _, pointer = saver.remote_names(state)
    if pointer is None:
        return None
    target = read_pointer(uploader.store, uploader.remote_name(pointer))
    if target is None:
        return None
    return uploader.store.get_uri(target), read_remote_checkpoint(uploader.store, target, progress=progress)


def restore(
    state: State,
    *,
    load_path: str | None,
    load_object_store: ObjectStore | RemoteUploaderDownloader | None = None,
    weights_only: bool,
    strict: bool,
    ignore_keys: Sequence[str],
    autoresume: bool,
    saver: CheckpointSaver | None,
    uploader: RemoteUploaderDownloader | None = None,
    progress: bool = True,
) -> str | None:
    """Load what the arguments ask for into ``state``; return the checkpoint's path, or None for a fresh start."""
    if autoresume:
        if saver is None:
            raise ValueError("autoresume=True needs save_folder: that is where it looks for the run's checkpoints")
        found = find_latest_checkpoint(saver, state)
        if found is None and uploader is not None:
            found = find_remote_latest(saver, state, uploader, progress=progress)
        if found is not None:
            path, checkpoint = found
            apply_checkpoint(checkpoint, state, source=path, strict=strict, ignore_keys=ignore_keys)
            log.info("autoresume: continuing from %s", path)
            return path
        log.info("autoresume: no checkpoint in %s yet; starting fresh", format_name(saver.folder, state, rank=0))
        if load_path is None:
            return None
    if load_path is None:
        return None
    checkpoint = _read(load_path, load_object_store, progress=progress)
    apply_checkpoint(
        checkpoint, state, source=load_path, weights_only=weights_only, strict=strict, ignore_keys=ignore_keys
    )
    return load_path


def _read(path: str, source: ObjectStore | RemoteUploaderDownloader | None, *, progress: bool) -> dict[str, Any]:
    """A local file, a URI, or a name inside ``load_object_store``."""
    if source is not None:
        if isinstance(source, RemoteUploaderDownloader):
            return read_remote_checkpoint(source.store, source.remote_name(path), progress=progress)
        if not isinstance(source, ObjectStore):
            raise TypeError(f"load_object_store must be an ObjectStore or RemoteUploaderDownloader, not {source!r}")
        return read_remote_checkpoint(source, path, progress=progress)
    if is_uri(path):
        store, name = store_from_uri(path)
        try:
            return read_remote_checkpoint(store, name, progress=progress)
        finally:
            store.close()
    return read_checkpoint(path)


def saving_from_arguments(
    save_folder: str | None, *, save_filename: str, save_remote_file_name: str | None, **saver_kwargs: Any
) -> tuple[CheckpointSaver | None, RemoteUploaderDownloader | None]:
    """The Trainer's ``save_*`` arguments as one saver, plus an uploader when ``save_folder`` is a URI.

    ``save_folder="s3://bucket/path"`` writes locally under ``path`` (relative to the working directory) and
    uploads each file as ``path/<save_filename>`` unless ``save_remote_file_name`` says otherwise.
    """
    if save_folder is None:
        return None, None
    uploader = None
    folder, remote_name = save_folder, save_remote_file_name
    if is_uri(save_folder):
        parsed = parse_uri(save_folder)
        folder = parsed.path or "."
        remote_name = remote_name or posixpath.join(parsed.path, save_filename)
        # Threads, not processes: uploads wait on the network, and spawned workers would re-run a user's script.
        uploader = RemoteUploaderDownloader(parsed.bucket_uri, use_procs=False)
    saver = CheckpointSaver(folder=folder, filename=save_filename, remote_file_name=remote_name, **saver_kwargs)
    return saver, uploader
