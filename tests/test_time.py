"""Time strings, Time arithmetic, and the Timestamp: what users type must mean what they expect."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cairn import Time, Timestamp, TimeUnit
from cairn.core.time import ensure_time


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("10ep", 10, TimeUnit.EPOCH),
        ("500ba", 500, TimeUnit.BATCH),
        ("3e10sp", 30_000_000_000, TimeUnit.SAMPLE),
        ("4_000tok", 4000, TimeUnit.TOKEN),
        ("0.5dur", 0.5, TimeUnit.DURATION),
        ("1dur", 1.0, TimeUnit.DURATION),
        ("1800sec", 1800, TimeUnit.SECOND),
        ("2.5sec", 2.5, TimeUnit.SECOND),
        ("30m", 1800, TimeUnit.SECOND),
        ("2h", 7200, TimeUnit.SECOND),
        ("45s", 45, TimeUnit.SECOND),
        ("1h20m40s", 4840, TimeUnit.SECOND),
        ("1d", 86400, TimeUnit.SECOND),
        (" 7ba ", 7, TimeUnit.BATCH),
    ],
)
def test_time_strings_parse(text: str, value: float, unit: TimeUnit) -> None:
    time = Time.from_timestring(text)
    assert time.unit is unit
    assert time.value == value
    assert type(time.value) is type(value)


@pytest.mark.parametrize("text", ["10 epochs", "-1ba", "ep", "", "1.5ep", "10xp", "ba10", "1h1h", "m", "1e", "--3ba"])
def test_bad_time_strings_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        Time.from_timestring(text)
    message = str(excinfo.value)
    assert repr(text) in message
    for form in ("ep", "ba", "sp", "tok", "dur", "30m", "1h20m40s"):
        assert form in message


def test_argument_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"max_duration='3xp'"):
        ensure_time("3xp", name="max_duration")


def test_ints_mean_epochs() -> None:
    assert ensure_time(3) == Time(3, TimeUnit.EPOCH)


_counting_units = st.sampled_from([TimeUnit.EPOCH, TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN])
_whole_times = st.builds(Time, st.integers(min_value=0, max_value=10**18), _counting_units)
_fractional_times = st.builds(
    Time,
    st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False),
    st.sampled_from([TimeUnit.DURATION, TimeUnit.SECOND]),
)
_second_counts = st.builds(Time, st.integers(min_value=0, max_value=10**9), st.just(TimeUnit.SECOND))


@given(st.one_of(_whole_times, _fractional_times, _second_counts))
def test_time_strings_round_trip(time: Time) -> None:
    parsed = Time.from_timestring(str(time))
    assert parsed == time
    assert parsed.unit is time.unit
    assert str(parsed) == str(time)


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(["ep", "ba", "sp", "tok"]))
def test_underscore_separators_are_ignored(value: int, unit: str) -> None:
    grouped = f"{value:_}"
    assert Time.from_timestring(f"{grouped}{unit}") == Time(value, unit)


@given(st.integers(0, 99), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_clock_durations_add_up(d: int, h: int, m: int, s: int) -> None:
    text = "".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m"), (s, "s")) if v)
    if not text:
        return
    assert Time.from_timestring(text) == Time(d * 86400 + h * 3600 + m * 60 + s, TimeUnit.SECOND)


def test_time_compares_with_numbers_of_its_unit() -> None:
    epoch = Time(51, TimeUnit.EPOCH)
    assert epoch > 50
    assert epoch == 51
    assert epoch <= "51ep"
    assert Time(3, "ba") + Time(2, "ba") == Time(5, "ba")
    assert Time(3, "ba") * 2 == Time(6, "ba")
    assert Time(3, "ba") / Time(6, "ba") == 0.5
    assert Time(1, "ep") != Time(1, "ba")
    with pytest.raises(TypeError, match="units differ"):
        _ = Time(1, "ep") < Time(1, "ba")


def test_counting_units_refuse_fractions() -> None:
    with pytest.raises(ValueError, match="whole numbers"):
        Time(1.5, TimeUnit.BATCH)
    with pytest.raises(ValueError, match="unknown time unit"):
        Time(1, "epochs")


def test_timestamp_moves_forward_and_serializes_as_plain_data() -> None:
    stamp = Timestamp()
    stamp = stamp.to_next_batch(samples=8, tokens=100, duration=0.5)
    stamp = stamp.to_next_batch(samples=8, tokens=100, duration=0.25)
    assert (stamp.batch, stamp.sample, stamp.token, stamp.batch_in_epoch) == (2, 16, 200, 2)
    assert stamp.total_wct == 0.75 and stamp.batch_wct == 0.25
    stamp = stamp.to_next_epoch()
    assert (stamp.epoch, stamp.batch, stamp.batch_in_epoch, stamp.sample_in_epoch) == (1, 2, 0, 0)
    assert stamp.get("sp") == Time(16, "sp")
    saved = stamp.state_dict()
    assert all(isinstance(v, (int, float)) for v in saved.values())
    assert Timestamp.from_state_dict(saved) == stamp


def test_timestamp_refuses_unknown_or_non_numeric_fields() -> None:
    with pytest.raises(ValueError, match="unknown fields"):
        Timestamp.from_state_dict({"epoch": 1, "bogus": 2})
    with pytest.raises(ValueError, match="must be a number"):
        Timestamp.from_state_dict({"epoch": "one"})
