"""The retention arguments of a saver (and the Trainer's ``save_*`` forms), checked when the object is built: each
value that could never work is refused with one sentence naming it, before any training time is spent."""

from __future__ import annotations

from typing import Any

from cairn.checkpoint.naming.checks import check_local_name
from cairn.checkpoint.naming.clash import template_clash
from cairn.checkpoint.save.retention import BEST_MODES, check_keep_every
from cairn.core.time import Time
from cairn.names import POINTER_SUFFIX
from cairn.storage.pointer import pointer_beside

__all__ = ["check_retention_arguments", "refuse_best_pointer_that_clashes"]


def check_retention_arguments(
    *,
    keep_best: object,
    best_metric: object,
    best_mode: object,
    best_filename: object,
    keep_every: object,
    remote_num_checkpoints_to_keep: object,
    filename: str,
    latest_filename: str | None,
    prefix: str = "",
) -> tuple[int, str | None, str, str | None, Time[Any] | None, int]:
    """The retention arguments, each refused now (one sentence naming it, under ``prefix``: ``"save_"`` in the
    Trainer) when it could never work, and returned checked: ``keep_best, best_metric, best_mode, best_filename,
    keep_every, remote_num_checkpoints_to_keep``."""
    checked_best = _checked_best(keep_best, best_metric, best_mode, prefix=prefix)
    link = _checked_best_filename(best_filename, checked_best[0], filename, latest_filename, prefix=prefix)
    every = None if keep_every is None else check_keep_every(keep_every, argument=f"{prefix}keep_every")
    remote = _checked_count(
        remote_num_checkpoints_to_keep,
        argument=f"{prefix}remote_num_checkpoints_to_keep",
        meaning="the store keeps all",
    )
    return (*checked_best, link, every, remote)


def _checked_count(value: object, *, argument: str, meaning: str) -> int:
    """A count of checkpoints to keep: an int of -1 (``meaning``) or more."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{argument}={value!r}: use an int (-1: {meaning})")
    if value < -1:
        raise ValueError(f"{argument}={value}: use -1 ({meaning}), 0, or more")
    return value


def _checked_best(
    keep_best: object, best_metric: object, best_mode: object, *, prefix: str
) -> tuple[int, str | None, str]:
    """``keep_best``, ``best_metric`` and ``best_mode``, refused now when they could never rank anything."""
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise ValueError(f"{prefix}keep_best={keep_best!r}: use an int, 0 (keep no best ones) or more")
    if best_metric is not None and (not isinstance(best_metric, str) or not best_metric.strip()):
        raise ValueError(
            f"{prefix}best_metric={best_metric!r}: give the name of a logged metric, such as "
            "'metrics/eval/MulticlassAccuracy'"
        )
    if keep_best > 0 and best_metric is None:
        raise ValueError(
            f"{prefix}keep_best={keep_best} ranks checkpoints by a metric, and {prefix}best_metric is None; pass the "
            f"name of a logged metric, such as {prefix}best_metric='metrics/eval/MulticlassAccuracy'"
        )
    if best_mode not in BEST_MODES:
        raise ValueError(f"{prefix}best_mode={best_mode!r}: use 'max' (higher is better) or 'min' (lower is better)")
    return keep_best, best_metric, str(best_mode)


def _checked_best_filename(
    best_filename: object, keep_best: int, filename: str, latest_filename: str | None, *, prefix: str
) -> str | None:
    """The ``best`` link's name template, checked as ``latest_filename`` is; it must never take the name of a
    checkpoint or of the ``latest`` link, or each move would replace one of them (checked only when the link is
    made: with ``keep_best=0`` the default name must not refuse a saver that worked before)."""
    if best_filename is None:
        return None
    checked = check_local_name(best_filename, argument=f"{prefix}best_filename")  # type: ignore[arg-type]
    if keep_best == 0:
        return checked
    for other, argument in ((filename, "filename"), (latest_filename, "latest_filename")):
        clash = None if other is None else template_clash(other, checked)
        if clash is not None:
            raise ValueError(
                f"{prefix}best_filename={checked!r} and {prefix}{argument}={other!r} can both name {clash!r}, and the "
                "best link would replace it; give the link a name nothing else can take (such as "
                f"'best-rank{{rank}}.pt'), or pass {prefix}best_filename=None"
            )
    return checked


def refuse_best_pointer_that_clashes(
    *, keep_best: int, best_filename: str | None, remote_template: str, latest_pointer: str | None
) -> None:
    """The store's ``best`` pointer must never take a checkpoint's name nor the ``latest`` pointer's
    (``latest_pointer``, the template of its name in the store): each move would replace that object (with
    ``latest``, autoresume would then follow the best, not the newest)."""
    if keep_best == 0 or best_filename is None:
        return
    best = pointer_beside(remote_template, best_filename)
    for other, what in ((remote_template, "save_remote_file_name"), (latest_pointer, "the latest pointer")):
        clash = None if other is None else template_clash(other, best, nested=False)
        if clash is not None:
            raise ValueError(
                f"{what} {other!r} and the best pointer {best!r} (save_best_filename + {POINTER_SUFFIX!r} beside "
                f"the remote file name) can both name {clash!r}, and the pointer would replace it in the store; "
                "give save_best_filename (best_filename) a name nothing else can take, or pass None"
            )
