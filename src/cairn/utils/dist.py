"""The few collective operations cairn needs, written so that a single process needs no process group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "on_rank_zero",
    "share_rank_zero_failure",
]

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def broadcast_object(value: T, src: int = 0, *, group: Any = None) -> T:
    """Rank ``src``'s value on every rank (a seed drawn on rank 0, a run name), over ``group`` (the default one
    unless given: a background thread uses a group of its own)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_object(value: T) -> list[T]:
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def share_rank_zero_failure(failure: BaseException | None, what: str, *, group: Any = None) -> None:
    """Every rank calls this after rank 0 tried ``what`` alone: rank 0 re-raises its own error, the others raise an
    ``OSError`` naming it, instead of waiting forever at the next collective for a rank that has stopped."""
    reason = broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}", group=group)
    if failure is not None:
        raise failure
    if reason is not None:
        raise OSError(f"rank 0 could not {what} ({reason})")


def raise_first_failure_everywhere(failure: BaseException | None, kinds: tuple[type[BaseException], ...]) -> None:
    """Every rank calls this at the same point: when some rank's ``failure`` is set, every rank raises the first
    failed rank's, as ``"on rank R, <its message>"`` (chained, on that rank, to its own), instead of that rank
    stopping alone while the others wait for it at their next collective. The error is of the first of ``kinds``
    that rank's failure is an instance of (the last of them when none is), so every rank raises the same class."""
    mine = None if failure is None else (_kind_index(failure, kinds), str(failure))
    reports = all_gather_object(mine)
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failed:
        rank, (kind, message) = failed[0]
        raise kinds[kind](f"on rank {rank}, {message}") from failure


def _kind_index(failure: BaseException, kinds: tuple[type[BaseException], ...]) -> int:
    return next((index for index, kind in enumerate(kinds) if isinstance(failure, kind)), len(kinds) - 1)


def on_rank_zero(action: Callable[[], object], what: str, *, group: Any = None) -> None:
    """Rank 0 alone runs ``action`` (writing a file, publishing a folder); then every rank raises if it failed
    (told over ``group``, the default one unless given)."""
    failure: BaseException | None = None
    if get_rank() == 0:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - shared with every rank, then raised
            failure = err
    share_rank_zero_failure(failure, what, group=group)
