"""A folder of chunks on disk: each chunk one file named by the XXH3-128 of its bytes, written once.

Writing: a chunk the folder lacks goes to a temporary name, is fsynced and renamed into place; the folder is fsynced
once after a save's chunks, before its manifest is written. A chunk already there (same name, same size) is not
written again: that is the whole saving. A file of the right name but the wrong size (damage) is replaced.

Reading: every chunk is checked against its key and size as it is read, into the tensor's own memory.

Locking: a save holds the folder's lock shared, from its first chunk until its manifest is published; garbage
collection (:mod:`~cairn.checkpoint.incremental.garbage`) takes it exclusively, and only if no save holds it. So a
chunk a save has just written, or found and relied on, is never collected before the manifest naming it is
visible, whichever process (or saver) the save belongs to. ``flock`` locks are local to one machine: savers
sharing a folder over a network filesystem are not protected from each other's collection (docs/checkpointing.md).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from cairn.atomic import atomic_write, fsync_path, write_failed
from cairn.checkpoint.incremental.manifest import ChunkRef, Piece, chunk_key
from cairn.errors import CheckpointCorruptError, CheckpointWriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; collection there never runs while a save is in flight in this process only
    fcntl = None  # type: ignore[assignment]

__all__ = ["ChunkFolder", "Written"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
#: Chunks written at once. Each chunk is its own file and its own fsync: one at a time, a save of 0.94 GiB where
#: everything changed took 1.35x a full save (median of 7, 2 cores); four at a time, 0.90x (docs/performance.md).
WRITERS = 4
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NON_BLOCKING = getattr(os, "O_NONBLOCK", 0)


class Written:
    """What one save put into the chunk folder: chunks written, and the bytes of them (the rest were there)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.reused = 0
        self.reused_bytes = 0


class ChunkFolder:
    def __init__(self, path: str) -> None:
        self.path = path

    def chunk_path(self, key: str) -> str:
        return os.path.join(self.path, key)

    def has(self, ref: ChunkRef) -> bool:
        """Whether the chunk is there as :meth:`read_into` will accept it: a plain file (a link is not followed) of
        its size. Anything else in its place is written over, so that no save relies on what no load reads."""
        try:
            info = os.lstat(self.chunk_path(ref.key))
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size == ref.size

    def keys(self) -> dict[str, int]:
        """Every chunk in the folder, with its size (temporaries and the lock file are not chunks)."""
        found = {}
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return {}
        for entry in entries:
            if len(entry.name) == 32 and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    found[entry.name] = entry.stat(follow_symlinks=False).st_size
        return found

    def write_missing(self, pieces: Iterable[Piece]) -> Written:
        """Store every piece the folder lacks; fsync the folder once if anything was written. Caller holds
        :meth:`saving`."""
        written = Written()
        seen: set[str] = set()
        missing: list[Piece] = []
        os.makedirs(self.path, exist_ok=True)
        for piece in pieces:
            if piece.key in seen:
                continue
            seen.add(piece.key)
            if self.has(ChunkRef(piece.key, len(piece.data))):
                written.reused += 1
                written.reused_bytes += len(piece.data)
                continue
            missing.append(piece)
        self._write_all(missing)
        written.chunks = len(missing)
        written.bytes = sum(len(piece.data) for piece in missing)
        if written.chunks:
            fsync_path(self.path)  # the renames survive a power cut before the manifest names them
        return written

    def _write_all(self, pieces: list[Piece]) -> None:
        """Write the pieces, :data:`WRITERS` at a time: the fsyncs of separate files overlap instead of queueing.
        Every write has finished (or failed, its temporary removed) when this returns; the first failure is raised."""
        if len(pieces) <= 1:
            for piece in pieces:
                self._write(piece)
            return
        with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="cairn-chunks") as pool:
            futures = [pool.submit(self._write, piece) for piece in pieces]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()  # the ones not started; those running finish before the pool closes
                raise

    def _write(self, piece: Piece) -> None:
        """Through :func:`~cairn.atomic.atomic_write`, as every checkpoint file; the folder is fsynced once, by
        :meth:`write_missing`, after the last chunk."""
        target = self.chunk_path(piece.key)

        def write(temporary: str) -> None:
            # through the page cache, unlike a full checkpoint file: four writers then overlap their fsyncs, and
            # a direct write each took 0.73 s for 0.75 GiB of new chunks against 0.40 s (docs/performance.md)
            with open(temporary, "wb") as file:
                file.write(piece.data)

        try:
            atomic_write(target, write, sync_folder=False)
        except CheckpointWriteError:
            raise
        except OSError as err:  # the rename: something else in the chunk's place
            raise write_failed(target, self.path, err) from err

    def read_into(self, ref: ChunkRef, out: memoryview, source: str) -> None:
        """Read the chunk ``ref`` into ``out`` (exactly its size) and check it against its key. Only a regular
        file is read: a link is not followed, and a FIFO put in a chunk's place is refused rather than waited on."""
        path = self.chunk_path(ref.key)
        try:
            descriptor = os.open(path, os.O_RDONLY | _NO_FOLLOW | _NON_BLOCKING)
        except FileNotFoundError:
            raise _bad_chunk(source, ref, self.path, "is missing") from None
        except OSError as err:
            why = f"cannot be opened as a plain file ({err.strerror})"
            raise _bad_chunk(source, ref, self.path, why) from None
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size != ref.size:
            os.close(descriptor)
            plain = stat.S_ISREG(info.st_mode)
            why = "has another size than the manifest records" if plain else "is not a plain file"
            raise _bad_chunk(source, ref, self.path, why)
        with open(descriptor, "rb", buffering=0) as file:
            read = file.readinto(out)
        if read != ref.size:
            raise _bad_chunk(source, ref, self.path, "was cut short while it was read")
        if chunk_key(out) != ref.key:
            raise _bad_chunk(source, ref, self.path, "does not match its key (its bytes changed after it was written)")

    def remove(self, keys: Iterable[str]) -> int:
        removed = 0
        for key in keys:
            try:
                os.unlink(self.chunk_path(key))
                removed += 1
            except FileNotFoundError:
                continue
        return removed

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Held shared from a save's first chunk until its manifest is published: collection waits for it."""
        with self._lock(exclusive=False, wait=True):
            yield

    @contextlib.contextmanager
    def collecting(self) -> Iterator[bool]:
        """Held exclusively while garbage is collected; yields False (and holds nothing) while a save holds it."""
        with self._lock(exclusive=True, wait=False) as held:
            yield held

    @contextlib.contextmanager
    def _lock(self, *, exclusive: bool, wait: bool) -> Iterator[bool]:
        if fcntl is None:
            yield True
            return
        os.makedirs(self.path, exist_ok=True)
        descriptor = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(descriptor, mode)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                yield False
                return
            yield True
        finally:
            os.close(descriptor)  # closing releases the lock


def _bad_chunk(source: str, ref: ChunkRef, folder: str, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{source!r} is incomplete: its chunk {ref.key} in {folder!r} {why}. The chunk folder was damaged or pruned "
        "by hand, or the checkpoint was copied without it (copy one with 'cairn ckpt convert --to single-file'); "
        "load an earlier checkpoint"
    )
