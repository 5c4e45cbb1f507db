"""One background thread per saver that finishes saves while training goes on.

At most one save is in flight: a new one first waits for the previous, so snapshot buffers can be reused and
checkpoints land in order. A failure in the background is kept and raised on the training thread the next time
the saver looks (the next event, the next save, the end of ``fit``), never swallowed.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable

__all__ = ["BackgroundSaves"]


class BackgroundSaves:
    def __init__(self) -> None:
        self._pool: cf.ThreadPoolExecutor | None = None
        self._in_flight: cf.Future[None] | None = None

    @property
    def busy(self) -> bool:
        return self._in_flight is not None and not self._in_flight.done()

    def start(self, finish: Callable[[], None]) -> None:
        """Run ``finish`` in the background, after the previous save has finished (its failure is raised here)."""
        self.wait()
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="cairn-save")
        self._in_flight = self._pool.submit(finish)

    def wait(self) -> None:
        """Block until the save in flight is finished; raise its failure on this thread."""
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.result()

    def raise_failure(self) -> None:
        """Raise the failure of a finished background save, without waiting for one still running."""
        if self._in_flight is not None and self._in_flight.done():
            self.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
