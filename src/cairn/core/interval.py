"""Turning "every 500 batches", "every 30 minutes" or a user's function into one yes/no question.

Evaluation and checkpointing both ask "is it time?" at a pair of events (one after each batch, one after each
epoch). :func:`interval_policy` answers once, in one place, so an interval means the same thing everywhere.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from cairn.core.event import Event
from cairn.core.state import State
from cairn.core.time import Time, TimeUnit, ensure_time
from cairn.utils.arguments import plain_bool

__all__ = ["IntervalPolicy", "interval_policy", "same_on_every_rank"]

IntervalPolicy = Callable[[State, Event], bool]
IntervalLike = int | str | Time[Any] | IntervalPolicy

_EPSILON = 1e-9  # absorbs float error in fractions such as 0.3 * 10


def interval_policy(interval: IntervalLike, *, batch_event: Event, epoch_event: Event, name: str) -> IntervalPolicy:
    """Build the ``(state, event) -> bool`` policy for ``interval``.

    ``batch_event`` and ``epoch_event`` are the two events at which the answer can be yes; ``name`` is the
    argument's name, used in error messages.
    """
    if callable(interval) and not isinstance(interval, (Time, str, int)):
        return _YesOrNo(interval, name=name)
    time = ensure_time(interval, name=name)
    if time.value <= 0:
        raise ValueError(f"{name}={interval!r}: an interval must be greater than zero")
    if time.value < sys.float_info.min:
        raise ValueError(
            f"{name}={interval!r}: an interval this small cannot be computed with (below about 2.2e-308); "
            "use '1ba' to act after every batch"
        )
    return _EveryInterval(time, batch_event=batch_event, epoch_event=epoch_event)


class _YesOrNo:
    """A user's ``(state, event)`` function whose answer must be a bool: ``"no"`` would count as yes (a save after
    every batch), and a tensor of several values would fail inside torch with a message about ambiguity."""

    def __init__(self, function: IntervalPolicy, *, name: str) -> None:
        self.function = function
        self.name = name

    def __repr__(self) -> str:
        return repr(self.function)

    def __call__(self, state: State, event: Event) -> bool:
        answer = self.function(state, event)
        if answer is True or answer is False:  # the common case, without a call
            return answer
        flag = plain_bool(answer, tensors=True)
        if flag is None:
            raise TypeError(
                f"{self.name}={self.function!r} returned {_describe(answer)} at {event.name}, not a bool; "
                "return True or False"
            )
        return flag


def _describe(answer: object) -> str:
    """A short account of a wrong answer: a tensor's repr can run to many lines."""
    if isinstance(answer, torch.Tensor):
        return f"a tensor of shape {tuple(answer.shape)} and dtype {answer.dtype}"
    text = repr(answer)
    return f"{text if len(text) <= 80 else text[:77] + '...'} (a {type(answer).__name__})"


class _EveryInterval:
    """True at the first checkpoint-able event at or after each whole multiple of the interval."""

    def __init__(self, interval: Time[Any], *, batch_event: Event, epoch_event: Event) -> None:
        self.interval = interval
        self.batch_event = batch_event
        self.epoch_event = epoch_event

    def __repr__(self) -> str:
        return f"every {self.interval}"

    def __call__(self, state: State, event: Event) -> bool:
        unit, every = self._absolute(state)
        wanted = self.epoch_event if unit is TimeUnit.EPOCH else self.batch_event
        if event is not wanted:
            return False
        before = float(state.previous_timestamp.get(unit).value)
        now = float(state.timestamp.get(unit).value)
        return _crossed_a_multiple(before, now, every)

    def _absolute(self, state: State) -> tuple[TimeUnit, float]:
        """A ``dur`` interval, in the unit of the run's ``max_duration``; anything else as it is."""
        if self.interval.unit is TimeUnit.DURATION:
            return state.max_duration.unit, float(self.interval.value) * float(state.max_duration.value)
        return self.interval.unit, float(self.interval.value)


def same_on_every_rank(policy: IntervalPolicy, state: State) -> bool:
    """Whether ``policy`` answers alike on every rank of a run: an interval of epochs or batches (or a fraction of
    a ``max_duration`` in those), which every rank counts alike; not a wall-clock interval, not a user's function,
    and not samples or tokens, which each rank may count from its own batches."""
    alike = (TimeUnit.EPOCH, TimeUnit.BATCH)
    return isinstance(policy, _EveryInterval) and policy._absolute(state)[0] in alike  # noqa: SLF001 - own class


def _crossed_a_multiple(before: float, now: float, every: float) -> bool:
    """Whether a whole multiple of ``every`` lies in ``(before, now]``.

    An interval tiny beside the run's progress (``1e-300dur`` of a long run) makes ``now / every`` overflow to
    infinity; every step forward then crosses a multiple, so the answer is simply whether time moved on.
    """
    ahead, behind = now / every + _EPSILON, before / every + _EPSILON
    if not (math.isfinite(ahead) and math.isfinite(behind)):
        return now > before
    return math.floor(ahead) > math.floor(behind)
