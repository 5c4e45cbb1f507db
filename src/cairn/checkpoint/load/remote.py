"""Checkpoints in object stores: downloading one to read it, following a store's ``latest`` pointer, and keeping a
run from replacing another run's checkpoints in a store (``save_overwrite=False``)."""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import string
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from cairn.atomic import NAME_MAX
from cairn.checkpoint.folder import PROGRESS_ORDER
from cairn.checkpoint.load.loader import read_checkpoint
from cairn.checkpoint.naming.templates import format_name, name_pattern
from cairn.core.logger import Logger
from cairn.core.state import State
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, ObjectNotFoundError, ObjectStoreError
from cairn.loggers.remote_uploader_downloader import RemoteUploaderDownloader, download_with_progress, read_pointer
from cairn.storage.base import ObjectStore
from cairn.utils.dist import broadcast_object, get_rank, share_rank_zero_failure
from cairn.utils.text import printable

__all__ = [
    "downloaded",
    "fixed_prefix",
    "guard_store_names",
    "progress_in_name",
    "read_pointer",
    "read_remote_checkpoint",
    "store_checkpoints",
]


def read_remote_checkpoint(
    store: ObjectStore, name: str, *, progress: bool = True, keep_damaged: Callable[[str], object] | None = None
) -> dict[str, Any]:
    """Download ``name`` to a private temporary folder, verify and read it, and delete the download.

    A download that does not verify is handed to ``keep_damaged`` (its local path) before the
    ``CheckpointCorruptError`` is raised: the only moment its bytes are at hand, to keep a copy of them.
    """
    with downloaded(store, name, progress=progress) as local:
        try:
            return read_checkpoint(local)
        except CheckpointCorruptError:
            if keep_damaged is not None:
                keep_damaged(local)
            raise


@contextlib.contextmanager
def downloaded(
    store: ObjectStore,
    name: str,
    *,
    progress: bool,
    local_name: str | None = None,
    folder_prefix: str = "cairn-download-",
    hint: str = "list the bucket to see what is there",
) -> Iterator[str]:
    """The local path of a download of ``name`` into a private temporary folder, deleted when the ``with`` ends.

    The file is called ``local_name``, else the object's own base name where it is a plain one; a missing object is
    a :class:`~cairn.errors.CheckpointNotFoundError` whose message ends with ``hint``.
    """
    with tempfile.TemporaryDirectory(prefix=folder_prefix) as folder:
        local = os.path.join(folder, local_name or _local_name(name))
        try:
            download_with_progress(store, name, local, overwrite=False, progress=progress)
        except ObjectNotFoundError:
            raise CheckpointNotFoundError(f"no checkpoint at {store.get_uri(name)}: check the name ({hint})") from None
        yield local


def _local_name(name: str) -> str:
    """The object's own base name when it is a plain one (errors then name the file the user knows), else a fixed
    one: a listing or pointer may hold ``..`` or control characters, which must never choose where a file lands,
    and a store's names may be longer than a local file name can be."""
    base = posixpath.basename(name)
    fits = len(os.fsencode(base)) <= NAME_MAX
    return base if base not in ("", ".", "..") and base.isprintable() and fits else "checkpoint.pt"


def guard_store_names(
    logger: Logger, state: State, remote_template: str, pointer_name: str | None, *, refuse_existing: bool
) -> None:
    """At fit start, for each uploader of the run: keep the store's latest pointer from moving back to a checkpoint
    older than the one it names (across runs too), and with ``refuse_existing`` raise ``FileExistsError`` when the
    store already holds objects of this saver's remote name pattern, as the local folder check does.

    ``remote_template`` is the saver's format string for remote file names; progress in names is compared as
    retention compares local files (epoch, then batch, sample, token, ...).
    """
    uploaders = [d for d in logger.destinations if isinstance(d, RemoteUploaderDownloader)]
    for uploader in uploaders:
        template = uploader.remote_template(remote_template)
        pattern = name_pattern(template, state, rank=0)
        if pointer_name is not None:
            uploader.order_pointer(pointer_name, functools.partial(progress_in_name, pattern))
        if refuse_existing:
            _refuse_existing_objects(uploader, remote_template, state, autoresume_reads=uploader is uploaders[0])


def progress_in_name(pattern: re.Pattern[str], name: str) -> tuple[float, ...] | None:
    """The progress numbers in ``name`` (epoch first), or None when ``name`` does not match ``pattern``."""
    match = pattern.match(name)
    if match is None:
        return None
    numbers = match.groupdict()
    return tuple(float(numbers[key]) for key in PROGRESS_ORDER if numbers.get(key) is not None)


def store_checkpoints(uploader: RemoteUploaderDownloader, remote_template: str, state: State) -> list[str]:
    """The names in ``uploader``'s store that the saver's ``remote_template`` can produce in this run, newest first.

    Newest by the progress numbers in the names (epoch first), as retention orders local files; equal ones in
    reverse name order. Only the template's fixed prefix is listed, never the whole bucket (unless the template
    starts with a progress field). Names are store names: a listing may hold anything, so callers never make a
    local path of one.
    """
    template = uploader.remote_template(remote_template)
    pattern = name_pattern(template, state, rank=0)
    listed = uploader.store.list_objects(fixed_prefix(template, pattern, state))
    names = [name for name in listed if pattern.match(name)]
    return sorted(names, key=lambda name: (progress_in_name(pattern, name) or (), name), reverse=True)


def _refuse_existing_objects(
    uploader: RemoteUploaderDownloader, remote_template: str, state: State, *, autoresume_reads: bool
) -> None:
    """Rank 0 lists the store; every rank raises if it holds names of this run's pattern (other than damaged ones
    that autoresume kept a copy of, which this run replaces)."""
    found: list[str] = []
    failure: BaseException | None = None
    if get_rank() == 0:
        try:
            found = [
                name
                for name in store_checkpoints(uploader, remote_template, state)
                if not uploader.is_replaceable(name)
            ]
        except ObjectStoreError as err:
            failure = ObjectStoreError(f"{uploader.bucket_uri} cannot be used: {err}")
        except Exception as err:  # shared below, so that the other ranks do not wait forever for rank 0
            failure = err
    share_rank_zero_failure(failure, f"list {uploader.bucket_uri}")
    existing = broadcast_object(found)
    if existing:
        resume = (
            "use autoresume=True to continue that run from the newest of them, pass"
            if autoresume_reads  # autoresume lists this store as this check does (resume.find_remote_latest)
            else "autoresume reads only the first uploader of the run's loggers, so pass"
        )
        raise FileExistsError(
            f"{uploader.store.get_uri(printable(existing[0]))} and {len(existing) - 1} more objects of this run's "
            f"name pattern are already in the store, and save_overwrite=False never replaces one: {resume} "
            "save_overwrite=True to replace them, or choose another run_name or remote name"
        )


def fixed_prefix(template: str, pattern: re.Pattern[str], state: State) -> str:
    """The start of every name ``template`` makes in this run: its text up to the first progress field (the fields
    ``pattern`` leaves open), with the fixed fields (run name, rank, ...) filled in. Listing under it, not the
    whole bucket, keeps the check quick."""
    fixed = ""
    for literal, field, spec, conversion in string.Formatter().parse(template):
        fixed += literal.replace("{", "{{").replace("}", "}}")
        if field is None:
            continue
        if re.split(r"[.\[!:]", field, maxsplit=1)[0] in pattern.groupindex:
            break
        fixed += "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
    return format_name(fixed, state, rank=0)
