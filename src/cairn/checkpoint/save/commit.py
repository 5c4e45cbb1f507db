"""The one way cairn puts a checkpoint on disk: nobody ever sees half of it.

The file form (:func:`atomic_write`) and the folder form (``temporary_folder`` then ``publish_folder``, for sharded
checkpoints) live in the leaf module :mod:`cairn.atomic`, so that downloads commit through it too; this module adds
the checkpoint file writer, the latest link, and the clearing of interrupted writers' leftovers.

Data goes to a hidden temporary name in the target's own folder (same filesystem, so the rename is atomic), is
flushed and fsynced, then renamed over the target; the folder is fsynced so the rename survives a power cut.
A crash at any moment leaves either the old file or the new one, never a mix, plus at worst a temporary file
that :func:`remove_stale_temporaries` clears on the next run.

A temporary's name says who writes it: ``.<target>.cairn-tmp-<machine>-<pid>-<token>``. ``<machine>`` is 8 hex
digits hashed from the host name and the process-id namespace (containers on one host may share a host name, and a
pid names a process only inside its namespace); a hash keeps the name short, whatever the host is called. A run
starting in a folder removes only the temporaries whose writer is certainly gone: one of this machine whose pid no
longer runs. A temporary of another machine sharing the folder (or of the old ``cairn-tmp-<pid>-<token>`` form, or
any name it cannot read) may belong to a live writer it cannot see; it is kept until nothing in it has changed for
:data:`STALE_AFTER_S` (a live writer keeps writing; one silent that long is dead; the same limit ends the hold of a
reused pid on a dead writer's temporary).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import torch

from cairn.atomic import (
    WRITER_PATTERN,
    atomic_write,
    fsync_path,
    is_temporary,
    remove_quietly,
    temporary_path,
    this_machine,
)
from cairn.checkpoint.save.direct import DirectFile, storage_alignment
from cairn.checkpoint.tree import leaves
from cairn.names import TEMP_MARKER

__all__ = ["STALE_AFTER_S", "atomic_symlink", "remove_stale_temporaries", "write_checkpoint"]

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600  # a temporary of a writer this machine cannot see is removed once silent this long


def write_checkpoint(checkpoint: dict[str, Any], path: str, *, overwrite: bool = True) -> None:
    """Serialize ``checkpoint`` with ``torch.save`` into ``path`` through :func:`atomic_write`.

    torch's writer hands each tensor's bytes over whole, in one call per record, to a :class:`DirectFile`, which
    writes them past the page cache: the kernel's copying, reclaim and write-back cost the training threads more
    than the write itself (:mod:`cairn.checkpoint.save.direct`).
    """

    tensor_bytes = sum(leaf.nbytes for _, leaf in leaves(checkpoint) if isinstance(leaf, torch.Tensor))

    def save(temporary: str) -> None:
        with _without_zip_crc(), storage_alignment(tensor_bytes), DirectFile(temporary) as file:
            torch.save(checkpoint, file)

    atomic_write(path, save, overwrite=overwrite)


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    """Skip the CRC32 torch's zip writer computes per record: a second full pass over the data (a quarter of a
    second per GiB) that buys nothing, since the content hash inside the file already covers every byte and is
    checked on every load. torch.load does not check the CRC; zip tools would report it missing."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None:  # torch < 2.6 always computes it
        yield
        return
    before = get()
    set_(False)
    try:
        yield
    finally:
        set_(before)


def atomic_symlink(link: str, target: str, *, argument: str = "save_latest_filename (latest_filename)") -> None:
    """Point ``link`` at ``target`` (stored relative to the link's folder), replacing any old link atomically.
    ``argument`` names the setting that chose the link's name, for the error when a file is in its way."""
    folder = os.path.dirname(link) or "."
    os.makedirs(folder, exist_ok=True)
    if os.path.lexists(link) and not os.path.islink(link):
        raise FileExistsError(
            f"{link} is a file, not a link, and the link would replace it (it may be a checkpoint): move it "
            f"away, or choose a {argument} that no checkpoint name can take"
        )
    relative = os.path.relpath(target, folder)
    temporary = temporary_path(link)
    os.symlink(relative, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        remove_quietly(temporary)
        raise
    fsync_path(folder)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files and folders (unfinished sharded saves) under ``folder`` whose writer is gone.

    Returns what was removed. A live writer's temporary, here or on another machine, is kept (module docstring).
    """
    removed = []
    now = time.time()
    for root, folders, names in os.walk(folder):
        temporary_folders = [name for name in folders if is_temporary(name)]
        folders[:] = [name for name in folders if name not in temporary_folders]  # never walked into
        for name in [*temporary_folders, *(n for n in names if is_temporary(n))]:
            path = os.path.join(root, name)
            try:
                gone = _writer_is_gone(path, now)
            except FileNotFoundError:  # its writer just renamed it into place
                continue
            if gone:
                _remove_tree_quietly(path)
                removed.append(path)
            else:
                log.info("kept %s: its writer may still be running", path)
    if removed:
        log.info("removed %d temporaries of interrupted saves under %s", len(removed), folder)
    return removed


def _writer_is_gone(path: str, now: float) -> bool:
    """Whether no process can still be writing ``path``: its pid is gone (this machine), or it fell silent."""
    match = WRITER_PATTERN.match(os.path.basename(path).rsplit(TEMP_MARKER, 1)[1])
    if match is not None and match["machine"] == this_machine() and not _process_is_running(int(match["pid"])):
        return True
    return now - _last_change(path) > STALE_AFTER_S  # also ends a reused pid's hold on a dead writer's file


def _process_is_running(pid: int) -> bool:
    """Signal 0 asks the kernel whether ``pid`` exists; on Windows ``os.kill`` would end it, so it counts as alive."""
    if os.name != "posix":
        return True
    if pid <= 0:
        return False  # no writer has such a pid (and kill(0) would ask about our own process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _last_change(path: str) -> float:
    """The newest modification time of ``path`` and, for a folder, of everything in it (links not followed)."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, folders, names in os.walk(path):
            for name in [*folders, *names]:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _remove_tree_quietly(path: str) -> None:
    """A folder with everything in it, or a file or link (a link to a folder is removed, not followed)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_quietly(path)
