"""What a checkpoint folder holds: the one walker that retention, resume and ``cairn ckpt ls`` share."""

from __future__ import annotations

import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Generic, NamedTuple, TypeVar

from cairn.atomic import is_temporary
from cairn.checkpoint.naming.templates import progress_of
from cairn.names import METADATA_FILE

__all__ = [
    "ENTRY_KINDS",
    "FileMemo",
    "FolderEntry",
    "NamedEntry",
    "folder_entries",
    "list_checkpoints",
    "named_entries",
]




class NamedEntry(NamedTuple):
    """One entry under a save folder whose relative name matches a checkpoint name pattern."""

    path: str
    match: re.Match[str]
    kind: str  # one of ENTRY_KINDS
    modified: float  # of the entry itself (a link's own time, not its target's)


ENTRY_KINDS = ("file", "sharded", "link", "folder", "special")  # the first two are checkpoints


class FolderEntry(NamedTuple):
    """One entry under a folder, and what it is (one of :data:`ENTRY_KINDS`)."""

    path: str
    kind: str
    modified: float  # of the entry itself (a link's own time, not its target's)


def folder_entries(
    folder: str, *, recursive: bool = True, on_error: Callable[[OSError], None] | None = None
) -> Iterator[FolderEntry]:
    """Every entry under ``folder``, with what it is: a regular ``file``, a ``sharded`` checkpoint folder (one holding
    ``cairn.pt``), a ``link``, a plain ``folder``, or a ``special`` file (FIFO, socket, device). Temporaries are
    skipped; with ``recursive``, plain folders are walked into, but links to folders, sharded checkpoints and
    temporary folders never are, so the walk stays inside ``folder``. A folder that cannot be read is skipped, or
    handed to ``on_error`` (which may raise). The one folder walker: retention, resume and ``cairn ckpt ls`` use it."""
    if not os.path.isdir(folder):
        return
    for root, folders, files in os.walk(folder, onerror=on_error):  # os.walk never follows a link to a folder
        entries = [(name, _kind(os.path.join(root, name))) for name in [*folders, *files] if not is_temporary(name)]
        folders[:] = [name for name, (kind, _) in entries if kind == "folder"] if recursive else []
        for name, (kind, modified) in entries:
            if kind is not None:  # else gone since the folder was listed
                yield FolderEntry(os.path.join(root, name), kind, modified)


def named_entries(folder: str, pattern: re.Pattern[str]) -> Iterator[NamedEntry]:
    """Every entry under ``folder`` (see :func:`folder_entries`, walked recursively: names may hold folders) whose
    relative name matches ``pattern``, with what it is."""
    for entry in folder_entries(folder):
        match = pattern.match(os.path.relpath(entry.path, folder).replace(os.sep, "/"))
        if match is not None:
            yield NamedEntry(entry.path, match, entry.kind, entry.modified)


def _kind(path: str) -> tuple[str | None, float]:
    """What ``path`` is, from its own ``lstat`` (a link is a link, wherever it leads), and when it last changed."""
    try:
        info = os.lstat(path)
    except OSError:
        return None, 0.0
    if stat.S_ISLNK(info.st_mode):
        return "link", info.st_mtime
    if stat.S_ISREG(info.st_mode):
        return "file", info.st_mtime
    if not stat.S_ISDIR(info.st_mode):
        return "special", info.st_mtime
    return ("sharded" if os.path.isfile(os.path.join(path, METADATA_FILE)) else "folder"), info.st_mtime


def list_checkpoints(folder: str, pattern: re.Pattern[str]) -> list[str]:
    """Paths under ``folder`` whose relative name matches ``pattern`` (regular files, and sharded checkpoint
    folders), oldest first.

    Order comes from the progress numbers in the names (epoch, batch, ...), then from modification time.
    Links (such as ``latest``), temporary files, plain folders and special files (FIFOs, sockets) are never listed.
    """
    found: list[tuple[tuple[float, ...], str]] = []
    for entry in named_entries(folder, pattern):
        if entry.kind not in ("file", "sharded"):
            continue
        found.append(((*progress_of(entry.match), entry.modified), entry.path))
    return [path for _, path in sorted(found)]


Read = TypeVar("Read")


class FileMemo(Generic[Read]):
    """What ``read`` made of each file, read again only when the file changed: remembered by path with the file's
    identity (device, inode, size, modification time), so a file replaced under the same name is read anew. The
    folder's files are read once (at the first prune after a start, all of them; later only the new ones). Safe to
    share between the training thread and a background save."""

    def __init__(self, read: Callable[[str], Read]) -> None:
        self._read = read
        self._known: dict[str, tuple[tuple[int, int, int, int], Read]] = {}
        self._lock = threading.Lock()

    def get(self, path: str, *, file: str | None = None) -> Read:
        """``read(path)``, or what it gave for the same file before. ``file`` is the file whose identity counts (a
        sharded folder's ``cairn.pt``), ``path`` itself by default; links are not followed. Raises ``OSError`` when
        it is not there."""
        info = os.stat(file or path, follow_symlinks=False)
        identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._known.get(path)
        if known is not None and known[0] == identity:
            return known[1]
        value = self._read(path)
        with self._lock:
            self._known[path] = (identity, value)
        return value
