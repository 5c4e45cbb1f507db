"""Training time: how long to train, how often to act, and where the loop stands.

Every duration a user types (``max_duration="10ep"``, ``save_interval="30m"``) becomes a :class:`Time`, so the
rest of the library compares one kind of value. A :class:`Timestamp` is the loop's odometer; it is plain numbers so
that it can go into a checkpoint as a dict and come back without pickle.
"""

from __future__ import annotations

import enum
import math
import re
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Generic, TypeVar

__all__ = ["Time", "TimeUnit", "Timestamp", "ensure_time"]

Number = int | float
T = TypeVar("T", int, float)


class TimeUnit(str, enum.Enum):
    """The units a :class:`Time` can be counted in."""

    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"  # a fraction of the run's max_duration
    SECOND = "sec"  # wall-clock seconds of training

    def __str__(self) -> str:
        return self.value


_COUNTING_UNITS = (TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)

ACCEPTED_FORMS = (
    "a number followed by a unit: ep (epochs), ba (batches), sp (samples), tok (tokens), dur (fraction of "
    "max_duration) or sec (seconds), e.g. '10ep', '500ba', '4_000tok', '3e10sp', '0.5dur', '1800sec'; "
    "or a wall-clock duration such as '30m', '2h', '45s' or '1h20m40s'"
)

# ASCII digits only (``re.ASCII``): ``\d`` would also take Arabic-Indic or full-width digits, which no one types.
_NUMBER = r"(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?"
_UNIT_PATTERN = re.compile(rf"^(?P<value>{_NUMBER})(?P<unit>ep|ba|sp|tok|dur|sec)$", re.ASCII)
_CLOCK_PATTERN = re.compile(r"^(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$", re.ASCII)
_SECONDS_PER = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_MAX_DIGITS = 300  # a float holds at most ~1.8e308; longer digit strings are typos, and int() refuses > 4300 digits
_LARGEST = sys.float_info.max  # every interval is compared as a float
_PLURALS = {"ep": "epochs", "ba": "batches", "sp": "samples", "tok": "tokens", "dur": "durations", "sec": "seconds"}


class Time(Generic[T]):
    """An amount of training time in one unit.

    Counting units (``ep``, ``ba``, ``sp``, ``tok``) hold whole numbers; ``dur`` and ``sec`` may hold fractions.
    Comparisons with a plain number assume the same unit, so ``state.timestamp.epoch > 50`` reads naturally.
    """

    __slots__ = ("_value", "_unit")

    def __init__(self, value: T, unit: TimeUnit | str) -> None:
        unit = _parse_unit(unit)
        self._value: T = _checked_value(value, unit)
        self._unit = unit

    @classmethod
    def from_timestring(cls, timestring: str) -> Time[Any]:
        """Parse ``"500ba"``, ``"4_000tok"``, ``"0.5dur"``, ``"30m"``, ``"1h20m40s"``; anything else is a ValueError."""
        if not isinstance(timestring, str):
            raise TypeError(f"a time string must be a str, not {type(timestring).__name__}")
        text = timestring.strip()
        match = _UNIT_PATTERN.match(text)
        if match:
            unit = TimeUnit(match["unit"])
            return cls(_parse_number(match["value"], unit, timestring), unit)
        clock = _CLOCK_PATTERN.match(text)
        if text and clock and any(clock.groupdict().values()):
            parts = {k: v for k, v in clock.groupdict().items() if v}
            if any(len(v) > _MAX_DIGITS for v in parts.values()):
                raise _unreadable(timestring, f"more than {_MAX_DIGITS} digits")
            return cls(_finite(sum(int(v) * _SECONDS_PER[k] for k, v in parts.items()), timestring), TimeUnit.SECOND)
        raise ValueError(f"cannot read {timestring!r} as a time; use {ACCEPTED_FORMS}")

    @classmethod
    def from_epoch(cls, epoch: int) -> Time[int]:
        return Time(epoch, TimeUnit.EPOCH)

    @classmethod
    def from_batch(cls, batch: int) -> Time[int]:
        return Time(batch, TimeUnit.BATCH)

    @classmethod
    def from_sample(cls, sample: int) -> Time[int]:
        return Time(sample, TimeUnit.SAMPLE)

    @classmethod
    def from_token(cls, token: int) -> Time[int]:
        return Time(token, TimeUnit.TOKEN)

    @classmethod
    def from_duration(cls, fraction: float) -> Time[float]:
        return Time(float(fraction), TimeUnit.DURATION)

    @property
    def value(self) -> T:
        return self._value

    @property
    def unit(self) -> TimeUnit:
        return self._unit

    def to_timestring(self) -> str:
        return f"{self._value!r}{self._unit.value}"

    def __str__(self) -> str:
        return self.to_timestring()

    def __repr__(self) -> str:
        return f"Time({self._value!r}, TimeUnit.{self._unit.name})"

    def __int__(self) -> int:
        return int(self._value)

    def __float__(self) -> float:
        return float(self._value)

    def __hash__(self) -> int:
        return hash((self._value, self._unit))

    def _other_value(self, other: object) -> Number:
        if isinstance(other, Time):
            if other.unit != self._unit:
                raise TypeError(f"cannot combine {self} with {other}: the units differ ({self._unit} vs {other.unit})")
            return other.value
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return other
        if isinstance(other, str):
            return self._other_value(Time.from_timestring(other))
        return NotImplemented  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Time) and other.unit != self._unit:
            return False
        value = self._other_value(other)
        return NotImplemented if value is NotImplemented else self._value == value  # type: ignore[return-value]

    def __lt__(self, other: object) -> bool:
        return self._value < self._other_value(other)

    def __le__(self, other: object) -> bool:
        return self._value <= self._other_value(other)

    def __gt__(self, other: object) -> bool:
        return self._value > self._other_value(other)

    def __ge__(self, other: object) -> bool:
        return self._value >= self._other_value(other)

    def __add__(self, other: object) -> Time[Any]:
        return Time(self._value + self._other_value(other), self._unit)

    __radd__ = __add__

    def __sub__(self, other: object) -> Time[Any]:
        return Time(self._value - self._other_value(other), self._unit)

    def __rsub__(self, other: object) -> Time[Any]:
        return Time(self._other_value(other) - self._value, self._unit)

    def __mul__(self, factor: Number) -> Time[Any]:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Time(self._value * factor, self._unit)

    __rmul__ = __mul__

    def __truediv__(self, other: object) -> float:
        """The ratio of two times in the same unit (how far through, as a fraction)."""
        return self._value / self._other_value(other)

    def __mod__(self, other: object) -> Time[Any]:
        return Time(self._value % self._other_value(other), self._unit)


def ensure_time(value: int | str | Time[Any], *, name: str = "time") -> Time[Any]:
    """Turn what a user may pass as a duration (an int of epochs, a time string, a ``Time``) into a ``Time``."""
    if isinstance(value, Time):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected an int of epochs, a time string or a Time, not a bool")
    if isinstance(value, int):
        return Time(value, TimeUnit.EPOCH)
    if isinstance(value, str):
        try:
            return Time.from_timestring(value)
        except ValueError as err:
            raise ValueError(f"{name}={value!r}: {err}") from None
    raise TypeError(f"{name}={value!r}: expected an int of epochs, a time string or a Time, not {type(value).__name__}")


def _parse_unit(unit: TimeUnit | str) -> TimeUnit:
    if isinstance(unit, TimeUnit):
        return unit
    try:
        return TimeUnit(unit)
    except ValueError:
        names = ", ".join(u.value for u in TimeUnit)
        raise ValueError(f"unknown time unit {unit!r}; use one of {names}") from None


def _checked_value(value: Any, unit: TimeUnit) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a Time's value must be a number, not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a Time's value must be finite, not {value!r}")
    if isinstance(value, int) and abs(value) > _LARGEST:
        raise ValueError(f"a Time's value must be at most about 1.8e308, not a {value.bit_length()}-bit int")
    if unit in _COUNTING_UNITS:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{value!r}{unit.value}: {_PLURALS[unit.value]} are counted in whole numbers")
            value = int(value)
    elif unit is TimeUnit.DURATION:
        value = float(value)
    return value


def _parse_number(text: str, unit: TimeUnit, original: str) -> Number:
    """The number in a time string, refusing what a Time cannot hold (too many digits, overflow to inf, fractions
    of a counting unit) with the accepted forms, rather than an OverflowError later in an interval's arithmetic."""
    digits = text.replace("_", "")
    if len(digits.lower().split("e")[0]) > _MAX_DIGITS:
        raise _unreadable(original, f"more than {_MAX_DIGITS} digits")
    if unit in _COUNTING_UNITS and re.fullmatch(r"[0-9]+", digits):
        return _finite(int(digits), original)
    try:
        number = float(digits)
    except ValueError:
        raise ValueError(f"cannot read {original!r} as a time; use {ACCEPTED_FORMS}") from None
    number = _finite(number, original)
    if number == 0 and re.search(r"[1-9]", digits.lower().split("e")[0]):
        raise _unreadable(original, "the number is too small to count with (it rounds to zero)")
    if unit in _COUNTING_UNITS:
        if not number.is_integer():
            raise _unreadable(original, f"{_PLURALS[unit.value]} are counted in whole numbers")
        return int(number)
    if unit is TimeUnit.SECOND and number.is_integer() and "." not in digits and "e" not in digits.lower():
        return int(number)
    return number


def _finite(number: Number, original: str) -> Number:
    """``number`` if a float can hold it: every interval is compared as a float, where 1e400 would be infinite."""
    if not abs(number) <= _LARGEST:  # also catches inf and nan
        raise _unreadable(original, "the number is too large to count with (at most about 1.8e308)")
    return number


def _unreadable(original: str, why: str) -> ValueError:
    return ValueError(f"cannot read {original!r} as a time: {why}; use {ACCEPTED_FORMS}")


_COUNT_LIMIT = 2**63  # an int64 holds every count below it; a count from a file beyond it is refused


def _shown(value: Number) -> str:
    """A count as the message shows it (Python refuses to print an int of more than 4300 digits)."""
    return f"a {value.bit_length()}-bit number" if isinstance(value, int) and value.bit_length() > 64 else repr(value)


def _is_duration(value: Number) -> bool:
    """Seconds a loop can have taken: finite, not negative (an int too large for a float is no duration)."""
    return 0 <= value <= _LARGEST and not (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class Timestamp:
    """Where the training loop stands: totals since the start of the run, and counts within the current epoch.

    Immutable: the loop moves forward by replacing the state's timestamp with ``to_next_batch()`` /
    ``to_next_epoch()``, so a callback that keeps a reference sees a consistent snapshot.
    """

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    token: int = 0
    batch_in_epoch: int = 0
    sample_in_epoch: int = 0
    token_in_epoch: int = 0
    total_wct: float = 0.0  # seconds of training since the run began
    epoch_wct: float = 0.0  # seconds of training in the current epoch
    batch_wct: float = 0.0  # seconds the last batch took

    def get(self, unit: TimeUnit | str) -> Time[Any]:
        """The total in ``unit`` (``dur`` cannot be answered here: it needs ``max_duration``)."""
        unit = _parse_unit(unit)
        totals = {
            TimeUnit.EPOCH: self.epoch,
            TimeUnit.BATCH: self.batch,
            TimeUnit.SAMPLE: self.sample,
            TimeUnit.TOKEN: self.token,
            TimeUnit.SECOND: self.total_wct,
        }
        if unit not in totals:
            raise ValueError("a Timestamp cannot express 'dur'; divide by max_duration instead")
        return Time(totals[unit], unit)

    def to_next_batch(self, samples: int, tokens: int = 0, duration: float = 0.0) -> Timestamp:
        return replace(
            self,
            batch=self.batch + 1,
            sample=self.sample + samples,
            token=self.token + tokens,
            batch_in_epoch=self.batch_in_epoch + 1,
            sample_in_epoch=self.sample_in_epoch + samples,
            token_in_epoch=self.token_in_epoch + tokens,
            total_wct=self.total_wct + duration,
            epoch_wct=self.epoch_wct + duration,
            batch_wct=duration,
        )

    def to_next_epoch(self) -> Timestamp:
        return replace(self, epoch=self.epoch + 1, batch_in_epoch=0, sample_in_epoch=0, token_in_epoch=0, epoch_wct=0.0)

    def state_dict(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Timestamp:
        """Rebuild a timestamp, refusing anything but known names holding counts (whole numbers from 0 to below
        2**63, what torch and numpy hold) and durations (finite numbers of seconds, never negative), and counts
        that no training loop produces: a count within the epoch above the run's total of the same kind."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(state) - set(known))
        if unknown:
            raise ValueError(f"timestamp has unknown fields {unknown}; expected only {sorted(known)}")
        for key, value in state.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"timestamp field {key!r} must be a number, not {type(value).__name__}")
            if known[key] in (int, "int"):
                if not isinstance(value, int) or not 0 <= value < _COUNT_LIMIT:
                    raise ValueError(
                        f"timestamp field {key!r} must be a whole number from 0 to below 2**63, not {_shown(value)}"
                    )
            elif not _is_duration(value):
                raise ValueError(f"timestamp field {key!r} must be finite seconds, at least 0, not {_shown(value)}")
        timestamp = cls(**state)
        timestamp._check_counts_within_epoch()
        return timestamp

    def _check_counts_within_epoch(self) -> None:
        """A count within the epoch is part of the run's total of the same kind (both grow by the same amount each
        batch, and only the first is reset at each epoch), so it can never exceed it. Nothing ties epochs to batches:
        an epoch can end without a batch (a resumed run at the end of its loader)."""
        for within, total in (("batch_in_epoch", "batch"), ("sample_in_epoch", "sample"), ("token_in_epoch", "token")):
            if getattr(self, within) > getattr(self, total):
                raise ValueError(
                    f"timestamp field {within!r} ({getattr(self, within)}) exceeds {total!r} ({getattr(self, total)}), "
                    "which no training loop produces"
                )
