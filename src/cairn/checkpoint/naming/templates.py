"""Checkpoint names: format strings filled from the run's progress, and read back from names on disk."""

from __future__ import annotations

import os
import re
import string
from typing import Any

from cairn.core.state import State

__all__ = [
    "FORMAT_VARIABLES",
    "PROGRESS_ORDER",
    "PROGRESS_VARIABLES",
    "SAMPLE_RUN_NAME",
    "progress_in_name",
    "PathTemplate",
    "fields_of",
    "fill",
    "fixed_prefix",
    "format_name",
    "name_pattern",
    "process_identity",
    "progress_of",
    "sample_values",
]


FORMAT_VARIABLES = (
    "run_name",
    "rank",
    "local_rank",
    "world_size",
    "local_world_size",
    "node_rank",
    "epoch",
    "batch",
    "batch_in_epoch",
    "sample",
    "sample_in_epoch",
    "token",
    "token_in_epoch",
    "total_wct",
    "epoch_wct",
    "batch_wct",
)


PROGRESS_VARIABLES = FORMAT_VARIABLES[6:]
#: The order in which progress numbers in names sort checkpoints: epoch first, then the finer counts.
PROGRESS_ORDER = ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")


SAMPLE_RUN_NAME = "run"


_SAMPLES = (0, 10**12)  # the values at the start of a run, and far into a long one (names grow as it goes)


PathTemplate = str | os.PathLike[str]


def sample_values(run_name: str = SAMPLE_RUN_NAME) -> list[dict[str, Any]]:
    """Values of every format variable a run can meet: each number (progress and ranks) at both ends of
    ``_SAMPLES``, with ``run_name``."""
    return [{**{name: number for name in FORMAT_VARIABLES}, "run_name": run_name} for number in _SAMPLES]


def fill(template: str, values: dict[str, Any], *, argument: str) -> str:
    """``template`` filled from ``values``; a failure is a ValueError naming the argument (checked templates
    never fail: :func:`check_format` tried them)."""
    try:
        return template.format(**values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as err:
        raise ValueError(
            f"{argument}={template!r} cannot be filled in ({type(err).__name__}: {err}); every variable but "
            "{run_name} is an int, so use int specs such as {batch:06d}"
        ) from None


def fields_of(template: str) -> list[str]:
    """The variables a (checked) template uses."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def fixed_prefix(template: str) -> str:
    """The folder part of ``template`` that no variable changes (all of it when it has no variables)."""
    literal = ""
    for text, field, _, _ in string.Formatter().parse(template):
        literal += text
        if field is not None:
            return literal.rsplit("/", 1)[0] if "/" in literal else ""
    return literal


def process_identity() -> dict[str, int]:
    """This process's place in a (torchrun-launched) job; a single process is rank 0 of 1."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    rank = int(env.get("RANK", 0))
    return {
        "rank": rank,
        "local_rank": int(env.get("LOCAL_RANK", 0)),
        "world_size": world_size,
        "local_world_size": local_world_size,
        "node_rank": int(env.get("GROUP_RANK", rank // max(local_world_size, 1))),
    }


def format_name(template: str, state: State, *, rank: int | None = None) -> str:
    """Fill ``template`` from the run; ``rank`` overrides this process's rank (rank-0 names in distributed runs)."""
    values = _variables(state)
    if rank is not None:
        values["rank"] = rank
    return template.format(**values)


def name_pattern(template: str, state: State, *, rank: int | None = None) -> re.Pattern[str]:
    """A regex matching every name ``template`` can produce in this run (progress variables left open)."""
    fixed = {k: v for k, v in _variables(state).items() if k not in PROGRESS_VARIABLES}
    if rank is not None:
        fixed["rank"] = rank
    pattern = ""
    for literal, field, spec, conversion in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field is None:
            continue
        name = re.split(r"[.\[!:]", field, maxsplit=1)[0]
        if name in fixed:
            piece = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            pattern += re.escape(piece.format(**fixed))
        elif f"(?P<{name}>" in pattern:
            pattern += r"\d+"
        else:
            pattern += rf"(?P<{name}>\d+)"
    return re.compile(pattern + r"\Z", re.ASCII)  # progress numbers are ASCII digits: "ep٩.pt" is no epoch


def _variables(state: State) -> dict[str, Any]:
    timestamp = state.timestamp
    return {
        "run_name": state.run_name,
        **process_identity(),
        "epoch": timestamp.epoch,
        "batch": timestamp.batch,
        "batch_in_epoch": timestamp.batch_in_epoch,
        "sample": timestamp.sample,
        "sample_in_epoch": timestamp.sample_in_epoch,
        "token": timestamp.token,
        "token_in_epoch": timestamp.token_in_epoch,
        "total_wct": int(timestamp.total_wct),
        "epoch_wct": int(timestamp.epoch_wct),
        "batch_wct": int(timestamp.batch_wct),
    }


def progress_in_name(pattern: re.Pattern[str], name: str) -> tuple[float, ...] | None:
    """The progress numbers in ``name`` (epoch first), or None when ``name`` does not match ``pattern``."""
    match = pattern.match(name)
    return None if match is None else progress_of(match)


def progress_of(match: re.Match[str]) -> tuple[float, ...]:
    """The progress numbers a match of :func:`name_pattern` holds, in :data:`PROGRESS_ORDER`."""
    numbers = match.groupdict()
    return tuple(float(numbers[key]) for key in PROGRESS_ORDER if numbers.get(key) is not None)
