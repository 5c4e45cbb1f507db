"""Which checkpoints are kept: decided from the files on disk, so it survives restarts and crashes.

The rules are one pure function, :func:`reasons_to_keep`, shared by the saver (local pruning), the store side
(remote pruning) and ``cairn ckpt ls`` (which shows why each checkpoint is kept). It sees each checkpoint as a
:class:`RetentionCandidate` (its name, its place in the run, the metric value it recorded) and answers, for each,
the reasons it is kept, in the words ``ls`` shows: ``latest`` / ``best`` (a link names it), ``best 1/3`` (first of
the three best by the metric), ``every 10ep`` (on a ``keep_every`` boundary), ``recent 2/3`` (second newest of the
three most recent). A checkpoint with no reason may be deleted.

The rest of the module reads what the rules need from the files (:func:`read_record`: the metadata only, tensors
memory-mapped and never read, so a large file costs milliseconds) and prunes a local folder (:func:`prune`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cairn.atomic import temporary_path
from cairn.checkpoint.folder import FileMemo, named_entries
from cairn.checkpoint.naming.templates import progress_of
from cairn.core.time import Time, TimeUnit
from cairn.names import METADATA_FILE

__all__ = [
    "BEST_MODES",
    "PROGRESS_KEYS",
    "CheckpointRecord",
    "RecordCache",
    "RetentionCandidate",
    "RetentionRules",
    "best_ranking",
    "candidates_in",
    "check_keep_every",
    "deletable",
    "every_label",
    "link_target",
    "on_boundary",
    "prune",
    "read_record",
    "reasons_to_keep",
]

log = logging.getLogger(__name__)

BEST_MODES = ("max", "min")
#: the progress numbers a checkpoint records (``metadata["progress"]``), as ``Timestamp`` names them
PROGRESS_KEYS = ("epoch", "batch", "sample", "token", "batch_in_epoch", "sample_in_epoch", "token_in_epoch")
_BOUNDARY_UNITS = {  # keep_every's unit -> (the total it divides, the count within an epoch that must be 0)
    TimeUnit.EPOCH: ("epoch", "batch_in_epoch"),
    TimeUnit.BATCH: ("batch", None),
    TimeUnit.SAMPLE: ("sample", None),
    TimeUnit.TOKEN: ("token", None),
}


# -- the rules ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionRules:
    """What is kept: the ``recent`` most recent (``-1``: all), the ``best`` best by the recorded metric (``mode``
    ``"max"`` or ``"min"``), and every checkpoint on an ``every`` boundary (a :class:`~cairn.core.time.Time` in
    epochs, batches, samples or tokens; ``None``: no boundary is kept). Checked when built."""

    recent: int = -1
    best: int = 0
    mode: str = "max"
    every: Time[Any] | None = None

    def __post_init__(self) -> None:
        for name, value, least in (("recent", self.recent, -1), ("best", self.best, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"RetentionRules({name}={value!r}): use an int of {least} or more")
        if self.mode not in BEST_MODES:
            raise ValueError(f"RetentionRules(mode={self.mode!r}): use 'max' or 'min'")
        if self.every is not None:
            check_keep_every(self.every, argument="every")


@dataclass(frozen=True)
class RetentionCandidate:
    """One checkpoint as the rules see it.

    ``order`` sorts checkpoints oldest first (the progress numbers, then the time written); ``progress`` holds the
    counts of :data:`PROGRESS_KEYS` known for it (from its metadata, else its name); ``value`` is the metric it
    recorded when saved, or ``None`` (saved before the metric existed, or a NaN): it then ranks after every value.
    """

    name: str
    order: tuple[float, ...]
    progress: Mapping[str, int] = field(default_factory=dict)
    value: float | None = None


def check_keep_every(every: object, *, argument: str = "keep_every") -> Time[Any]:
    """``every`` (a time string, a ``Time``, or an int: epochs, as everywhere a duration is expected) as a ``Time``
    in epochs, batches, samples or tokens, at least 1."""
    given = every
    if isinstance(every, int) and not isinstance(every, bool):
        every = Time(every, TimeUnit.EPOCH) if every >= 0 else every
    if isinstance(every, str):
        try:
            every = Time.from_timestring(every)
        except ValueError as err:
            raise ValueError(f"{argument}={given!r}: {err}") from None
    if isinstance(every, int) and not isinstance(every, bool):
        raise ValueError(f"{argument}={given!r}: the period must be a whole number of 1 or more ('10ep')")
    if not isinstance(every, Time):
        raise TypeError(f"{argument}={given!r} is a {type(given).__name__}; give a time string such as '10ep'")
    if every.unit not in _BOUNDARY_UNITS:
        raise ValueError(
            f"{argument}={given!r} counts in {every.unit.value}, which no checkpoint records a boundary of; use "
            "epochs, batches, samples or tokens ('10ep', '5000ba')"
        )
    value = every.value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}={given!r}: the period must be a whole number of 1 or more ('10ep')")
    return Time(value, every.unit)


def every_label(every: Time[Any]) -> str:
    """``every 10ep``: the reason a boundary checkpoint is kept."""
    return f"every {every.value}{every.unit.value}"


def on_boundary(progress: Mapping[str, int], every: Time[Any]) -> bool:
    """Whether a checkpoint at ``progress`` sits on an ``every`` boundary: a positive multiple of the period (for
    epochs, at the epoch's end: none of the next epoch's batches counted). Unknown progress is on no boundary."""
    total_key, within_key = _BOUNDARY_UNITS[every.unit]
    total = progress.get(total_key)
    if total is None or total <= 0 or total % int(every.value):
        return False
    return within_key is None or progress.get(within_key, 0) == 0


def best_ranking(candidates: Sequence[RetentionCandidate], mode: str) -> list[RetentionCandidate]:
    """The checkpoints that recorded a value, best first (largest for ``"max"``, smallest for ``"min"``); of equal
    values the newer ranks first. Those without a value are not ranked (they come after every ranked one)."""
    valued = [c for c in candidates if _usable(c.value)]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(valued, key=lambda c: (sign * float(c.value), _negated(c.order)))  # type: ignore[arg-type]


def reasons_to_keep(
    candidates: Sequence[RetentionCandidate], rules: RetentionRules, links: Mapping[str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """For each checkpoint (by name), why ``rules`` keep it; an empty tuple means it may be deleted.

    ``links`` maps a link's label (``"latest"``, ``"best"``) to the checkpoint it names: a named checkpoint is kept
    with that label as its reason. The reasons come in this order: links, ``best i/K``, ``every N<unit>``,
    ``recent i/N`` (``recent i/all`` when ``recent`` is -1). Pure: it reads no file.
    """
    reasons: dict[str, list[str]] = {c.name: [] for c in candidates}
    for label, name in (links or {}).items():
        if name in reasons:
            reasons[name].append(label)
    for rank, candidate in enumerate(best_ranking(candidates, rules.mode)[: rules.best], start=1):
        reasons[candidate.name].append(f"best {rank}/{rules.best}")
    if rules.every is not None:
        for candidate in candidates:
            if on_boundary(candidate.progress, rules.every):
                reasons[candidate.name].append(every_label(rules.every))
    newest_first = sorted(candidates, key=lambda c: _negated(c.order))
    kept = newest_first if rules.recent < 0 else newest_first[: rules.recent]
    total = "all" if rules.recent < 0 else str(rules.recent)
    for rank, candidate in enumerate(kept, start=1):
        reasons[candidate.name].append(f"recent {rank}/{total}")
    return {name: tuple(why) for name, why in reasons.items()}


def deletable(
    candidates: Sequence[RetentionCandidate], rules: RetentionRules, links: Mapping[str, str] | None = None
) -> list[str]:
    """The names no rule and no link keeps, oldest first."""
    reasons = reasons_to_keep(candidates, rules, links)
    return [c.name for c in sorted(candidates, key=lambda c: c.order) if not reasons[c.name]]


def _usable(value: float | None) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _negated(order: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-number for number in order)


# -- what the files record ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint's metadata says for retention: its progress counts and the metric values it recorded."""

    progress: Mapping[str, int]
    metrics: Mapping[str, float]
    content_hash: str | None = None


_NOTHING = CheckpointRecord({}, {})


def read_record(path: str) -> CheckpointRecord:
    """The progress and recorded metrics of the checkpoint at ``path`` (a file, or a sharded folder's
    ``cairn.pt``), read cheaply: ``torch.load(weights_only=True, mmap=True)`` unpickles only the structure (no code
    runs; tensors stay on disk, never read) and the content hash is not checked. Nothing is known of a file that
    cannot be read (a damaged one): it then ranks last and sits on no boundary.

    Only files in the saver's own folder, under its own name pattern, are read this way.
    """
    file = os.path.join(path, METADATA_FILE) if os.path.isdir(path) else path
    try:
        if not stat.S_ISREG(os.lstat(file).st_mode):
            return _NOTHING  # a link could lead anywhere, and a FIFO would block the load forever
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - damage surfaces as almost any exception; the file then records nothing
        log.debug("could not read the metadata of %s (%s)", path, err)
        return _NOTHING
    state = loaded.get("state") if isinstance(loaded, dict) else None
    metadata = state.get("metadata") if isinstance(state, dict) else None
    if not isinstance(metadata, dict):
        return _NOTHING
    progress = metadata.get("progress")
    if not isinstance(progress, dict):
        progress = state.get("timestamp") if isinstance(state.get("timestamp"), dict) else {}
    recorded_hash = metadata.get("content_hash")
    content_hash = recorded_hash if isinstance(recorded_hash, str) and len(recorded_hash) <= 200 else None
    return CheckpointRecord(_counts(progress), _values(metadata.get("metrics")), content_hash)


def _counts(progress: Mapping[Any, Any]) -> dict[str, int]:
    return {
        key: value
        for key in PROGRESS_KEYS
        if isinstance(value := progress.get(key), int) and not isinstance(value, bool) and value >= 0
    }


def _values(metrics: object) -> dict[str, float]:
    if not isinstance(metrics, dict):
        return {}
    return {
        str(name): float(value)
        for name, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


class RecordCache:
    """The records of checkpoints already read, each file once (:class:`~cairn.checkpoint.folder.FileMemo`); a file
    that is not there records nothing."""

    def __init__(self) -> None:
        self._memo = FileMemo(read_record)

    def record(self, path: str) -> CheckpointRecord:
        file = os.path.join(path, METADATA_FILE) if os.path.isdir(path) else path
        try:
            return self._memo.get(path, file=file)
        except OSError:
            return _NOTHING


def candidates_in(
    folder: str, pattern: re.Pattern[str], *, metric: str | None, cache: RecordCache | None = None
) -> list[RetentionCandidate]:
    """The checkpoints under ``folder`` whose names match ``pattern`` (regular files and sharded folders; links and
    temporaries never), each with what its file records, oldest first. ``name`` is the path."""
    cache = cache or RecordCache()
    found: list[RetentionCandidate] = []
    for entry in named_entries(folder, pattern):
        if entry.kind not in ("file", "sharded"):
            continue
        record = cache.record(entry.path)
        progress = dict(record.progress) or _progress_from_name(entry.match)
        value = None if metric is None else record.metrics.get(metric)
        found.append(RetentionCandidate(entry.path, (*progress_of(entry.match), entry.modified), progress, value))
    return sorted(found, key=lambda c: c.order)


def _progress_from_name(match: re.Match[str]) -> dict[str, int]:
    """The counts a name holds (``{epoch}``, ``{batch}``, ...), for a file that recorded none (a weights-only file
    of an older cairn)."""
    return {key: int(number) for key, number in match.groupdict().items() if key in PROGRESS_KEYS and number}


# -- pruning a local folder ---------------------------------------------------------------------------------------


def link_target(link: str | None) -> str | None:
    """The absolute path a local link names, or None (no link there, or not a link)."""
    if link is None or not os.path.islink(link):
        return None
    return os.path.abspath(os.path.join(os.path.dirname(link), os.readlink(link)))


def prune(
    candidates: Sequence[RetentionCandidate],
    rules: RetentionRules,
    *,
    links: Mapping[str, str] | None = None,
    protect: Collection[str] = (),
) -> list[str]:
    """Delete the checkpoints (``candidates`` from :func:`candidates_in`) that no rule and no link keeps; a failed
    delete is logged, not fatal. Returns the paths removed, oldest first.

    Paths in ``protect`` are never deleted, yet take their place among the ``recent``: the checkpoint just written,
    and those whose upload is in flight or failed (the error of a failed upload promises that the local file is
    kept, and a file deleted mid-upload would have nothing to fall back on). They go at a later prune, once uploaded.
    """
    by_path = {os.path.abspath(c.name): c.name for c in candidates}
    named = {label: by_path.get(os.path.abspath(path), path) for label, path in (links or {}).items()}
    kept = {os.path.abspath(path) for path in protect}
    removed = []
    for path in deletable(candidates, rules, named):
        if os.path.abspath(path) in kept:
            continue
        try:
            _remove_checkpoint(path)
            removed.append(path)
        except OSError as err:
            log.warning("could not remove old checkpoint %s (%s); it will be retried at the next save", path, err)
    return removed


def _remove_checkpoint(path: str) -> None:
    """Delete a checkpoint file, or a sharded folder renamed aside first: a kill inside the deletion then leaves a
    temporary, which the next run clears, never a half-deleted folder under a checkpoint's name (which the next
    run's saver would refuse to start beside, and no prune would take)."""
    if os.path.isdir(path) and not os.path.islink(path):
        aside = temporary_path(path)
        os.rename(path, aside)
        shutil.rmtree(aside)
    else:
        os.remove(path)
