"""The one way cairn puts a file on disk: nobody ever sees half of it.

Data goes to a hidden temporary name in the target's own folder (same filesystem, so the rename is atomic), is
flushed and fsynced, then renamed over the target; the folder is fsynced so the rename survives a power cut.
A crash at any moment leaves either the old file or the new one, never a mix, plus at worst a temporary file
that :func:`remove_stale_temporaries` clears on the next run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import torch

from cairn.errors import CheckpointWriteError

__all__ = [
    "TEMP_MARKER",
    "atomic_symlink",
    "atomic_write",
    "write_checkpoint",
    "fsync_path",
    "is_temporary",
    "remove_stale_temporaries",
]

TEMP_MARKER = ".cairn-tmp-"


def _temporary_name(target: str) -> str:
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def is_temporary(name: str) -> bool:
    return TEMP_MARKER in os.path.basename(name)


def atomic_write(target: str, write: Callable[[str], None], *, overwrite: bool = True) -> None:
    """Create ``target`` atomically: ``write(temporary)`` creates the file at a temporary path beside it, which is then
    fsynced and renamed over ``target`` (the folder fsynced too). With ``overwrite=False`` an existing file is kept.
    """
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    temporary = _temporary_name(target)
    try:
        try:
            write(temporary)
            fsync_path(temporary)
        except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
            raise _write_failed(target, folder, err) from err
        if overwrite:
            os.replace(temporary, target)
        else:
            _rename_without_replacing(temporary, target)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_path(folder)


def _write_failed(target: str, folder: str, err: BaseException) -> CheckpointWriteError:
    """One sentence on what happened and what to do; the free space is the usual suspect, so it is stated."""
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CheckpointWriteError(
        f"could not write the checkpoint {target} ({reason}; {free}): the disk may be full, a file size limit "
        "reached or the folder not writable. Nothing was replaced, earlier checkpoints are intact; free space or "
        "choose another save_folder, then resume"
    )


def _rename_without_replacing(source: str, target: str) -> None:
    """``link`` then ``unlink`` fails with FileExistsError instead of silently replacing ``target``."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise FileExistsError(
            f"{target} already exists and overwrite is off; pass overwrite=True (save_overwrite=True) to replace it, "
            "or choose a save_filename that includes {batch}"
        ) from None
    except OSError:  # a filesystem without hard links: fall back to a check, then an atomic rename
        if os.path.exists(target):
            raise FileExistsError(f"{target} already exists and overwrite is off") from None
        os.replace(source, target)
        return
    os.unlink(source)


def write_checkpoint(checkpoint: dict[str, Any], path: str, *, overwrite: bool = True) -> None:
    """Serialize ``checkpoint`` with ``torch.save`` into ``path`` through :func:`atomic_write`.

    Given a path, torch's C++ writer streams each tensor's bytes straight from its memory to the file in large
    sequential writes: no second copy of the state is built, and it runs at the disk's speed (a Python file object
    would route every record through Python).
    """

    def save(temporary: str) -> None:
        with _without_zip_crc():
            torch.save(checkpoint, temporary)

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


def atomic_symlink(link: str, target: str) -> None:
    """Point ``link`` at ``target`` (stored relative to the link's folder), replacing any old link atomically."""
    folder = os.path.dirname(link) or "."
    os.makedirs(folder, exist_ok=True)
    relative = os.path.relpath(target, folder)
    temporary = _temporary_name(link)
    os.symlink(relative, temporary)
    try:
        os.replace(temporary, link)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_path(folder)


def fsync_path(path: str) -> None:
    """fsync a file's data, or a folder's entries (so a rename in it survives a power cut)."""
    descriptor = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete temporary files and folders (unfinished sharded saves) that interrupted saves left under ``folder``.

    Returns what was removed. Call it only when no save into ``folder`` is in flight (the savers do, at fit start).
    """
    removed = []
    for root, folders, names in os.walk(folder):
        for name in [n for n in folders if is_temporary(n)]:
            folders.remove(name)  # not walked into: removed whole
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
        for name in names:
            if is_temporary(name):
                path = os.path.join(root, name)
                _remove_quietly(path)
                removed.append(path)
    return removed


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
