"""Stopping cleanly when a scheduler takes the machine away.

Clusters warn before they kill: Kubernetes and most schedulers send SIGTERM, Slurm can send SIGUSR1 ahead of the
time limit, submitit sends SIGUSR2. With ``Trainer(save_on_preemption=True)`` the signal only raises a flag; the loop
finishes the step it is in, checkpoints, waits for writes and uploads (``FIT_END``) and leaves with
``preemption_exit_code``, so that the launcher restarts it and the next run resumes from that very step.

The default exit code is 75 (``EX_TEMPFAIL`` in sysexits.h, "try again later"), because every launcher that
restarts work does so only on a non-zero code: torchrun's elastic agent restarts the worker group when a worker
exits non-zero and ``--max-restarts`` allows it; a Kubernetes Job replaces a failed pod (``podFailurePolicy`` with
``onExitCodes: {operator: In, values: [75]}, action: Ignore`` keeps it from counting against ``backoffLimit``);
Slurm requeues on the codes listed in ``RequeueExit``. An exit code of 0 reads as "finished" to all of them.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, NoReturn

from cairn.utils.dist import all_gather_object, is_distributed

__all__ = [
    "DEFAULT_PREEMPTION_EXIT_CODE",
    "DEFAULT_PREEMPTION_SIGNALS",
    "Preempted",
    "PreemptionWatch",
    "SignalLike",
    "parse_exit_code",
    "parse_signals",
    "preemption_watch",
]

log = logging.getLogger(__name__)

SignalLike = signal.Signals | int | str

DEFAULT_PREEMPTION_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, to be retried
DEFAULT_PREEMPTION_SIGNALS: tuple[SignalLike, ...] = ("SIGTERM", "SIGUSR1")

# Signals a preemption watch must never take over, and why.
_REFUSED_SIGNALS: dict[int, str] = {
    signal.SIGKILL: "no process can catch it",
    signal.SIGSTOP: "no process can catch it",
    signal.SIGSEGV: "it reports a crash of this process, not a scheduler's notice",
    signal.SIGBUS: "it reports a crash of this process, not a scheduler's notice",
    signal.SIGFPE: "it reports a crash of this process, not a scheduler's notice",
    signal.SIGILL: "it reports a crash of this process, not a scheduler's notice",
    signal.SIGCHLD: "it arrives whenever a child process (a dataloader worker, an upload process) ends",
}


class Preempted(Exception):
    """Raised inside the loop once a preemption signal was seen (on any rank) and the current step is done."""


def parse_exit_code(code: Any) -> int:
    """Check ``preemption_exit_code``: an int a process can return (0..255); 0 is allowed, with a warning."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"preemption_exit_code={code!r}: use an int from 1 to 255 (the default, 75, means 'retry')")
    if not 0 <= code <= 255:
        raise ValueError(f"preemption_exit_code={code}: a process exit code runs from 0 to 255; use 75, the default")
    if code == 0:
        log.warning(
            "preemption_exit_code=0: torchrun, Kubernetes Jobs and Slurm read 0 as 'finished' and will not restart "
            "a preempted run; use it only when your own script restarts the run"
        )
    return code


def parse_signals(signals: Any) -> tuple[int, ...]:
    """Check ``preemption_signals``: one signal or a list of them, as ``signal.Signals``, numbers or names."""
    items = [signals] if isinstance(signals, (str, int)) else signals
    if not isinstance(items, Iterable):
        raise TypeError(
            f"preemption_signals={signals!r}: pass a list of signals, such as ['SIGTERM', 'SIGUSR1'] or "
            "[signal.SIGUSR2]"
        )
    parsed = tuple(dict.fromkeys(_parse_signal(item) for item in items))
    if not parsed:
        raise ValueError("preemption_signals is empty: name at least one signal, such as 'SIGTERM'")
    return parsed


def _parse_signal(item: Any) -> int:
    number = _signal_number(item)
    if number in _REFUSED_SIGNALS:
        raise ValueError(
            f"preemption_signals: {_signal_name(number)} cannot mean preemption, because "
            f"{_REFUSED_SIGNALS[number]}; use SIGTERM, SIGUSR1 or SIGUSR2"
        )
    return number


def _signal_number(item: Any) -> int:
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise TypeError(f"preemption_signals: {item!r} is not a signal; use a signal.Signals, a number or a name")
    if isinstance(item, str):
        name = item.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in signal.Signals.__members__:
            raise ValueError(f"preemption_signals: unknown signal name {item!r}; use a name like 'SIGUSR2'")
        return int(signal.Signals[name])
    if item not in signal.valid_signals():
        raise ValueError(f"preemption_signals: {item} is not a signal number on this system")
    return int(item)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def preemption_watch(enabled: bool, signals: Any, exit_code: Any) -> PreemptionWatch | None:
    """The watch ``Trainer(save_on_preemption=...)`` asks for, or None; signals and code given without it are an
    error, since they would silently do nothing."""
    parsed_signals, parsed_code = parse_signals(signals), parse_exit_code(exit_code)
    if enabled:
        return PreemptionWatch(parsed_signals, parsed_code)
    if parsed_signals != parse_signals(DEFAULT_PREEMPTION_SIGNALS) or parsed_code != DEFAULT_PREEMPTION_EXIT_CODE:
        raise ValueError(
            "preemption_signals and preemption_exit_code take effect only with save_on_preemption=True; pass it too"
        )
    return None


class PreemptionWatch:
    """Remembers that a preemption signal arrived; the loop asks between steps, ``fit`` once more after FIT_END.

    ``signals`` and ``exit_code`` are taken as checked (see :func:`preemption_watch`).
    """

    def __init__(
        self,
        signals: tuple[int, ...] | None = None,
        exit_code: int = DEFAULT_PREEMPTION_EXIT_CODE,
    ) -> None:
        self.signals = parse_signals(DEFAULT_PREEMPTION_SIGNALS) if signals is None else signals
        self.exit_code = exit_code
        self.received: int | None = None
        self._agreed: bool | None = None  # the stop every rank agreed on at the last checkpoint event, not yet asked

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.received is None:
            log.warning(
                "received %s: finishing this step, then saving a checkpoint and exiting with code %d",
                _signal_name(signum),
                self.exit_code,
            )
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Catch the signals for the duration of ``fit``, FIT_END included; the previous handlers come back after."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("save_on_preemption needs fit() on the main thread (signals go there); not watching")
            yield
            return
        previous: dict[int, Any] = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def agree(self, stop: bool) -> None:
        """What every rank learnt at this checkpoint event (:mod:`cairn.trainer.agreement`): the next :meth:`seen`
        answers it without a collective of its own."""
        self._agreed = stop

    def seen(self) -> bool:
        """Whether this rank or any other saw a signal; in a distributed run every rank must ask at the same point.
        Right after a checkpoint event the ranks already agreed on it; elsewhere (an epoch's start and end) they
        ask each other now."""
        agreed, self._agreed = self._agreed, None
        if agreed is not None:
            return agreed
        seen = self.received is not None
        if is_distributed():
            seen = any(all_gather_object(seen))
        return seen

    def check(self) -> None:
        """Raise :class:`Preempted` when this rank or any other saw a signal: all ranks stop at the same step."""
        if self.seen():
            raise Preempted

    def exit(self) -> NoReturn:
        """Leave the process with the preemption exit code (``SystemExit``, so ``finally`` blocks still run)."""
        log.warning("preempted: exiting with code %d so that the launcher restarts the run", self.exit_code)
        raise SystemExit(self.exit_code)
