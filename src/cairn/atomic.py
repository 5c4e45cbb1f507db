"""The one way cairn puts a file or a folder on disk, checkpoint or download: nobody ever sees half of it.

A leaf module (it imports only :mod:`cairn.errors` and :mod:`cairn.names`), so that both the checkpoint writers
(:mod:`cairn.checkpoint.save.commit`, which builds the checkpoint forms on top of it, and the sharded writer,
:mod:`cairn.checkpoint.save.sharded`) and the object stores' downloads (:mod:`cairn.storage.base`) commit through it
without closing an import circle.

Data goes to a hidden temporary name in the target's own folder (same filesystem, so the rename is atomic), is
fsynced, then renamed over the target; the folder is fsynced so the rename survives a power cut. The file form is
:func:`atomic_write`; the folder form (a sharded checkpoint, which many processes fill) is :func:`temporary_folder`,
filled by its writers, then :func:`publish_folder`. A temporary's name says who writes it:
``.<target>.cairn-tmp-<machine>-<pid>-<token>``, a folder's as a file's (see :mod:`cairn.checkpoint.save.commit`
for who clears the ones an interrupted writer leaves).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable

from cairn.errors import CheckpointWriteError
from cairn.names import TEMP_MARKER

__all__ = [
    "NAME_MAX",
    "RETIRED_SUFFIX",
    "TEMPORARY_NAME_EXTRA",
    "WRITER_PATTERN",
    "atomic_write",
    "fsync_path",
    "is_temporary",
    "publish_folder",
    "remove_quietly",
    "temporary_folder",
    "temporary_path",
    "temporary_suffix",
    "this_machine",
    "write_failed",
]

#: What follows :data:`TEMP_MARKER` in a temporary's name, as :func:`temporary_suffix` writes it.
WRITER_PATTERN = re.compile(r"(?P<machine>[0-9a-f]{8})-(?P<pid>\d{1,10})-[0-9a-f]{8}\Z")
NAME_MAX = 255  #: bytes in one file name on the usual filesystems (ext4, xfs, btrfs, tmpfs, APFS)
TEMPORARY_NAME_EXTRA = len(f".{TEMP_MARKER}{'0' * 8}-{2**22}-{'0' * 8}")  # what it adds to a name (pids < 2**22)
RETIRED_SUFFIX = "-old"  #: a folder being replaced is set aside as ``<temporary>-old`` until the new one is in place


def temporary_suffix() -> str:
    """What follows :data:`TEMP_MARKER` in a temporary's name: this machine, this process, and a random token."""
    return f"{this_machine()}-{os.getpid()}-{secrets.token_hex(4)}"


def this_machine() -> str:
    """This host and pid namespace, as 8 hex digits: where a pid means something.

    Containers on one host may share a host name, and a pid names a process only inside its namespace; a hash keeps
    the name short, whatever the host is called.
    """
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux: the host name alone
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def temporary_path(target: str, *, room: int = 0, suffix: str | None = None) -> str:
    """A fresh temporary name beside ``target`` (same folder, so renaming it over ``target`` is atomic).

    The target's name is cut short where the temporary's would not fit in :data:`NAME_MAX` bytes, less ``room``
    (what a writer adds to the name it is given): any name that fits can be written. Readers of a temporary's name
    need only the marker and what follows it. ``suffix`` (a :func:`temporary_suffix`) is given where several
    processes must agree on one name; otherwise this process draws a fresh one.
    """
    folder, name = os.path.split(target)
    end = f"{TEMP_MARKER}{temporary_suffix() if suffix is None else suffix}"
    while name and len(os.fsencode(f".{name}{end}")) + room > NAME_MAX:
        name = name[:-1]
    return os.path.join(folder, f".{name}{end}")


def is_temporary(name: str) -> bool:
    return TEMP_MARKER in os.path.basename(name)


def atomic_write(
    target: str,
    write: Callable[[str], None],
    *,
    overwrite: bool = True,
    explain_failure: bool = True,
    room: int = 0,
    sync_folder: bool = True,
) -> None:
    """Create ``target`` atomically: ``write(temporary)`` creates the file at a temporary path beside it, which is then
    fsynced and renamed over ``target`` (the folder fsynced too, unless ``sync_folder=False``: a caller writing many
    files into one folder, a save's chunks, fsyncs it once after the last). With ``overwrite=False`` an existing
    file is kept.

    A failed write is reported as a :class:`~cairn.errors.CheckpointWriteError` naming the free space; with
    ``explain_failure=False`` (a download, whose store errors already say what went wrong) it propagates as raised.
    Either way the temporary is removed and ``target`` is untouched. ``room``: see :func:`temporary_path`.
    """
    folder = os.path.dirname(target) or "."
    os.makedirs(folder, exist_ok=True)
    temporary = temporary_path(target, room=room)
    try:
        try:
            write(temporary)
            fsync_path(temporary)
        except (OSError, RuntimeError) as err:  # torch reports a failed write as RuntimeError
            if not explain_failure:
                raise
            raise write_failed(target, folder, err) from err
        if overwrite:
            os.replace(temporary, target)
        else:
            _rename_without_replacing(temporary, target)
    except BaseException:
        remove_quietly(temporary)
        raise
    if sync_folder:
        fsync_path(folder)


def temporary_folder(target: str, suffix: str) -> str:
    """The temporary name of a folder that becomes ``target`` through :func:`publish_folder`, named as a file's.

    ``suffix`` is the :func:`temporary_suffix` of the process that publishes it (a new run removes the folder only
    once that process is gone); in a distributed save every rank fills the same folder, so the name is drawn by one
    process and handed to the others, never drawn here. Room is left for :data:`RETIRED_SUFFIX`.
    """
    return temporary_path(target, room=len(RETIRED_SUFFIX), suffix=suffix)


def publish_folder(temporary: str, target: str, *, overwrite: bool) -> None:
    """Rename the finished folder ``temporary`` into place as ``target``; an existing one is replaced only with
    ``overwrite``, and refused otherwise (the temporary is then removed).

    Two folders cannot be swapped in one step: the old one is first set aside under the temporary's name (still a
    temporary, so an interrupted swap leaves nothing a reader takes for a checkpoint), then removed.
    """
    if os.path.exists(target):
        if not overwrite:
            shutil.rmtree(temporary, ignore_errors=True)
            raise FileExistsError(
                f"{target} already exists and overwrite is off; pass save_overwrite=True to replace it"
            )
        retired = f"{temporary}{RETIRED_SUFFIX}"
        os.replace(target, retired)
        os.replace(temporary, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, target)
    fsync_path(os.path.dirname(target) or ".")


def write_failed(target: str, folder: str, err: BaseException) -> CheckpointWriteError:
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


def fsync_path(path: str) -> None:
    """fsync a file's data, or a folder's entries (so a rename in it survives a power cut)."""
    descriptor = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_quietly(path: str) -> None:
    """Remove a file or link that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
