"""Stopping cleanly when a scheduler takes the machine away.

Clusters warn before they kill: Kubernetes and most schedulers send SIGTERM, Slurm can send SIGUSR1 ahead of the
time limit. With ``Trainer(save_on_preemption=True)`` the signal only raises a flag; the loop finishes the step it
is in, checkpoints, waits for uploads and leaves with exit code 0, so the next run resumes from that very step.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from cairn.utils.dist import all_gather_object, is_distributed

__all__ = ["PREEMPTION_SIGNALS", "Preempted", "PreemptionWatch"]

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised inside the loop once a preemption signal was seen (on any rank) and the current step is done."""


class PreemptionWatch:
    """Remembers that a preemption signal arrived; the loop asks after every step."""

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is None:
            log.warning(
                "received %s: finishing this step, then saving a checkpoint and exiting", signal.strsignal(signum)
            )
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Catch the signals for the duration of ``fit``; the previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("save_on_preemption needs fit() on the main thread (signals go there); not watching")
            yield
            return
        previous: dict[int, Any] = {sig: signal.signal(sig, self._handle) for sig in PREEMPTION_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def check(self) -> None:
        """Raise :class:`Preempted` when this rank or any other saw a signal: all ranks stop at the same step."""
        seen = self.received is not None
        if is_distributed():
            seen = any(all_gather_object(seen))
        if seen:
            raise Preempted
