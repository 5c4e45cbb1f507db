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
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
from types import TracebackType
from typing import Any

import numpy as np

__all__ = ["BLOCK_BYTES", "STAGING_BYTES", "DirectFile"]

log = logging.getLogger(__name__)

BLOCK_BYTES = 4096  # O_DIRECT's unit of alignment: the page size, a multiple of every disk's logical block
STAGING_BYTES = 8 << 20  # one write call per 8 MiB: large enough to stream at the disk's speed, small to hold

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)  # 0 where the system has no such flag (macOS, Windows)


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
        address = _address(source) if size else 0
        done = 0
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

    def flush(self) -> None:
        """Nothing to do: a whole block is in the file once written, and the tail goes at :meth:`close`."""

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            size = self.tell()
            if self._filled:
                tail = self._filled
                if self.direct:  # a whole block goes out, zero-padded; the file is then cut to its true length
                    tail = -(-tail // BLOCK_BYTES) * BLOCK_BYTES
                    self._staging[self._filled : tail] = bytes(tail - self._filled)
                self._drain(tail)
                if self.direct:
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
            written = os.write(self._fd, view)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            self._stop_writing_directly(err)
            written = os.write(self._fd, view)
        finally:
            view.release()
        if written != length:  # a direct write is all or nothing; a short one means the disk is full
            raise OSError(errno.ENOSPC, f"only {written} of {length} bytes could be written", self.path)
        self._written += min(written, self._filled)
        self._filled = 0

    def _stop_writing_directly(self, err: OSError) -> None:
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
    if _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o666), True
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: this file system has no direct I/O; anything else is real
                raise
    return os.open(path, flags, 0o666), False


def _address(buffer: Any) -> int:
    """Where a buffer's bytes start in memory (read-only ones too: ``torch.save`` hands over read-only views)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)
