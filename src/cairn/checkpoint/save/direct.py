"""Checkpoint bytes written past the page cache (``O_DIRECT``), so that a save costs the training thread little CPU.

Measured on the 2-core VM (docs/performance.md, "What a background write takes"): a buffered write of 384 MiB, by
``torch.save`` or by plain ``os.write``, cost a training loop on the other threads half its rate or more while it
ran, though a pure-Python loop beside it kept 97% (``torch.save``'s writer releases the GIL). The cost is the
kernel's: copying every byte into the page cache, reclaiming older cached pages to make room (the cache is full on
a machine that has run for a while), then writing the dirty pages back. With ``O_DIRECT`` the disk reads the bytes
from one small staging buffer of ours; the write took 0.27 s instead of 0.44–0.61 s and the loop kept 0.70 of its
rate instead of 0.39–0.51.

:class:`DirectFile` is the file object ``torch.save`` writes into: the bytes go through a page-aligned staging
buffer (``O_DIRECT`` needs aligned memory, offsets and lengths), copied with ``ctypes.memmove``, which releases the
GIL, and written in whole blocks; the last partial block is written padded and the file cut to its true length.
Where the file system refuses ``O_DIRECT`` (tmpfs on older kernels, some network and FUSE file systems, systems
without the flag) the same object writes through the page cache instead, so a save never fails for want of it.
Where it accepts the flag but serves it slowly (on some network file systems every direct write is a synchronous
round trip to the server), ``CAIRN_DIRECT_IO=0`` in the environment writes through the page cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import numpy as np

__all__ = ["BLOCK_BYTES", "STAGING_BYTES", "SWITCH", "DirectFile", "direct_writes_wanted", "storage_alignment"]

log = logging.getLogger(__name__)

BLOCK_BYTES = 4096  # O_DIRECT's unit of alignment: the page size, a multiple of every disk's logical block
STAGING_BYTES = 8 << 20  # one write call per 8 MiB: large enough to stream at the disk's speed, small to hold

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # 0 where the system has no such flag (macOS, Windows)
IN_PLACE_FROM = 1 << 20  # a write this large is handed to the disk from where it lies when it can be (no copy)
IN_PLACE_PIECE_BYTES = 256 << 20  # one write call's share of it (Linux writes at most 2 GiB per call)
ALIGNED_CHECKPOINT_BYTES = 64 << 20  # from this many tensor bytes up, tensors start on a block in the file
SWITCH = "CAIRN_DIRECT_IO"  # the environment variable that turns direct writes off ("0") or on ("1", the default)
_SWITCH_VALUES = {"": True, "1": True, "on": True, "true": True, "0": False, "off": False, "false": False}


class DirectFile:
    """A new file at ``path``, written front to back by ``write`` calls (what ``torch.save`` makes of a file object).

    ``close`` writes the tail; it does not fsync (the caller's atomic commit does). Leaving the ``with`` block on an
    exception closes the descriptor without writing the tail: the caller removes the temporary."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd, self.direct = _open_for_writing(path)
        self._staging = mmap.mmap(-1, STAGING_BYTES)  # anonymous, hence page-aligned
        self._staging_address = _address(self._staging)
        self._filled = 0  # bytes waiting in the staging buffer
        self._written = 0  # bytes already in the file

    def write(self, data: Any) -> int:
        source = memoryview(data).cast("B")
        size = len(source)
        if size == 0:
            return 0
        address = _address(source)
        done = self._write_in_place(source, address) if size >= IN_PLACE_FROM else 0
        while done < size:
            take = min(size - done, STAGING_BYTES - self._filled)
            ctypes.memmove(self._staging_address + self._filled, address + done, take)  # releases the GIL
            self._filled += take
            done += take
            if self._filled == STAGING_BYTES:
                self._drain(self._filled)
        return size

    def tell(self) -> int:
        return self._written + self._filled

    def _write_in_place(self, source: memoryview, address: int) -> int:
        """Write what of ``source`` can go to the disk from where it lies, without the staging copy; return how
        many bytes that was (the rest goes through the staging buffer). A direct write needs the memory and the file
        offset on a block boundary: a snapshot's host buffers start on a page and :func:`storage_alignment` puts a
        large checkpoint's tensors on one in the file; anything else is copied. Through the page cache, the kernel
        copies anyway, so everything goes as it is."""
        if self.direct and (address % BLOCK_BYTES or self.tell() % BLOCK_BYTES):
            return 0
        length = len(source) // BLOCK_BYTES * BLOCK_BYTES if self.direct else len(source)
        if self._filled:
            self._drain(self._filled)  # ends on a block boundary (the offset is one), and keeps the bytes in order
        done = 0
        while done < length:
            piece = source[done : done + min(length - done, IN_PLACE_PIECE_BYTES)]
            self._write_out(piece)
            done += len(piece)
            self._written += len(piece)
        return done

    def flush(self) -> None:
        """Nothing to do: a whole block is in the file once written, and the tail goes at :meth:`close`."""

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            size = self.tell()
            if self._filled:
                tail = self._filled
                padded = self.direct  # a whole block goes out, zero-padded; the file is then cut to its true length
                if padded:
                    tail = -(-tail // BLOCK_BYTES) * BLOCK_BYTES
                    self._staging[self._filled : tail] = bytes(tail - self._filled)
                self._drain(tail)
                if padded:  # even if that write fell back to the page cache: the padding went out all the same
                    os.ftruncate(self._fd, size)
        finally:
            self._release()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._release()

    def _drain(self, length: int) -> None:
        """Write the first ``length`` bytes of the staging buffer; a file system that refuses a direct write (it
        accepted the flag at open but not the I/O) is written through the page cache from then on."""
        view = memoryview(self._staging)[:length]
        try:
            self._write_out(view)
        finally:
            view.release()
        self._written += min(length, self._filled)  # a padded tail counts only its own bytes
        self._filled = 0

    def _write_out(self, view: memoryview) -> None:
        """All of ``view`` at the file's end, in one ``write`` call: a direct write is all or nothing, so a short one
        means the disk is full."""
        try:
            written = os.write(self._fd, view)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            self._stop_writing_directly(err)
            written = os.write(self._fd, view)
        if written != len(view):
            raise OSError(errno.ENOSPC, f"only {written} of {len(view)} bytes could be written", self.path)

    def _stop_writing_directly(self, err: OSError) -> None:
        import fcntl  # only where O_DIRECT exists (Linux): Windows has no fcntl module

        log.info("%s: the file system refused a direct write (%s); writing through the page cache", self.path, err)
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
        self.direct = False

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self._staging.close()


def _open_for_writing(path: str) -> tuple[int, bool]:
    """The new file's descriptor, and whether it writes past the page cache."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if _O_DIRECT and direct_writes_wanted():
        try:
            return os.open(path, flags | _O_DIRECT, 0o666), True
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O; anything else is real
                raise
    return os.open(path, flags, 0o666), False


@contextlib.contextmanager
def storage_alignment(tensor_bytes: int) -> Iterator[None]:
    """While ``torch.save`` writes a checkpoint of ``tensor_bytes``: for a large one, each tensor's bytes start on a
    block boundary in the file (torch pads to 64 bytes by default), so that a page-aligned tensor is written from
    where it lies. At most a block of padding per tensor, a small share of a large checkpoint; a small one keeps
    torch's default. ``torch.load`` reads either (the alignment is recorded in the file)."""
    try:
        from torch.utils.serialization import config  # torch >= 2.6
    except ImportError:
        config = None
    save = getattr(config, "save", None)
    if tensor_bytes < ALIGNED_CHECKPOINT_BYTES or not _O_DIRECT or not hasattr(save, "storage_alignment"):
        yield  # an older torch has no such setting: its files are written through the staging buffer
        return
    before = save.storage_alignment
    save.storage_alignment = BLOCK_BYTES
    try:
        yield
    finally:
        save.storage_alignment = before


def direct_writes_wanted() -> bool:
    """What ``CAIRN_DIRECT_IO`` says (read at every file, so a run can change it); a value it does not know is an
    error, not a guess."""
    value = os.environ.get(SWITCH, "").strip().lower()
    if value not in _SWITCH_VALUES:
        raise ValueError(
            f"{SWITCH}={value!r} is not understood: set it to 0 to write checkpoints through the page "
            "cache, or 1 (the default) to write them past it"
        )
    return _SWITCH_VALUES[value]


def _address(buffer: Any) -> int:
    """Where a buffer's bytes start in memory (read-only ones too: ``torch.save`` hands over read-only views)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)
