"""Checkpoint names: format strings filled from the run's progress, and read back from names on disk."""

from __future__ import annotations

import os
import re
import string
from typing import Any

from cairn.core.state import State

__all__ = ["FORMAT_VARIABLES", "check_format", "format_name", "name_pattern", "process_identity"]

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
_PROGRESS_VARIABLES = FORMAT_VARIABLES[6:]


def check_format(template: str, *, argument: str) -> str:
    """Refuse a name with an unknown ``{variable}`` now, rather than at the first save hours into a run."""
    if not isinstance(template, str) or not template:
        raise ValueError(f"{argument}={template!r}: give a non-empty format string such as 'ep{{epoch}}.pt'")
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(f"{argument}={template!r}: not a valid format string ({err})") from None
    for field in fields:
        name = re.split(r"[.\[!:]", field, maxsplit=1)[0]
        if name not in FORMAT_VARIABLES:
            known = ", ".join("{" + v + "}" for v in FORMAT_VARIABLES)
            raise ValueError(f"{argument}={template!r}: unknown variable {{{field}}}; use {known}")
    return template


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
    fixed = {k: v for k, v in _variables(state).items() if k not in _PROGRESS_VARIABLES}
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
    return re.compile(pattern + r"\Z")


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
