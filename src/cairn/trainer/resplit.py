"""The rest of an epoch on another number of ranks: which samples the run that saved the checkpoint had still to
hand out, and how they are shared among the ranks of the run that resumes it, each sample once.

It works from the split recorded at the epoch's start (:func:`describe_split`): a map-style dataset split between
ranks by ``DistributedSampler``, as the Trainer splits a plain ``DataLoader`` (or as the user did). Rank ``r`` of
``W`` takes positions ``r, r + W, r + 2W, ...`` of the epoch's (padded) order, so after ``k`` batches of ``B`` on
every rank the first ``W * k * B`` positions are consumed, whatever the ranks did in between. What remains is dealt
out again, rank ``r'`` of ``W'`` taking positions ``r', r' + W', ...`` of it.

A run resumed this way records its epoch as a re-split of the saved one (:func:`resplit_record`), so that it too can
be stopped and resumed mid-epoch, on any number of ranks: the samples left are worked out through each re-split in
turn.

Every rank must take the same number of steps (a step is a collective under DDP), so a rest of the epoch that does
not give every new rank the same number of batches is refused, as is any other kind of loader: the error offers
``load_at_epoch_boundary=True``, which starts the resumed run at the next epoch instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from cairn.errors import CheckpointCorruptError, CheckpointIncompatibleError

__all__ = ["Rest", "describe_split", "is_resplit", "resplit_record", "rest_of_epoch"]

_MAX_RESPLITS = 16  # re-splits of one epoch a file may chain; far more than a run is restarted within an epoch

_FLAG_ADVICE = (
    "resume on {saved} ranks, or pass load_at_epoch_boundary=True to start this run at the next epoch (epoch "
    "{next_epoch}), leaving the rest of epoch {epoch} untrained"
)


def describe_split(loader: Iterable[Any], world_size: int) -> dict[str, Any]:
    """How ``loader`` shares the epoch's samples between ``world_size`` ranks, as plain data for ``dataset_state``:
    enough to recompute every rank's order for that epoch, with no rank but this one alive."""
    split: dict[str, Any] = {"world_size": world_size}
    sampler = getattr(loader, "sampler", None)
    if isinstance(loader, DataLoader) and isinstance(sampler, DistributedSampler) and loader.batch_size is not None:
        split["distributed_sampler"] = {
            "dataset_len": len(sampler.dataset),  # type: ignore[arg-type]
            "num_replicas": sampler.num_replicas,
            "shuffle": bool(sampler.shuffle),
            "seed": int(sampler.seed),
            "sampler_drop_last": bool(sampler.drop_last),
            "batch_size": int(loader.batch_size),
            "drop_last": bool(loader.drop_last),
        }
    return split


def resplit_record(split: dict[str, Any], done: int, world_size: int) -> dict[str, Any]:
    """The split of an epoch resumed after ``done`` batches on ``world_size`` ranks, from the saved ``split``.

    A re-split epoch resumed on as many ranks as it was re-split for keeps its record unchanged: dealing the
    interleaved tails out again over the same ranks gives each rank its own tail back, so nothing changes but the
    chain's length, and a run preempted again and again within one epoch would otherwise reach ``_MAX_RESPLITS``."""
    if is_resplit(split) and split.get("world_size") == world_size:
        return split
    return {"world_size": world_size, "resplit_of": split, "resplit_at": done}


def is_resplit(split: Any) -> bool:
    return isinstance(split, dict) and "resplit_of" in split


@dataclass(frozen=True)
class Rest:
    """This rank's share of the rest of an epoch: its sample indices, and the batches they make."""

    indices: list[int]
    batches: int


def rest_of_epoch(
    split: Any, loader: Iterable[Any], *, epoch: int, done: int, rank: int, world_size: int, source: str
) -> Rest:
    """This rank's share of the samples the saving run had still to hand out in ``epoch`` after ``done`` batches on
    each of its ranks; refused (``CheckpointIncompatibleError``) when that cannot be done exactly once each."""
    saved_world = split.get("world_size") if isinstance(split, dict) else None
    where = f"mid-epoch (batch {done} of epoch {epoch}) by {saved_world} ranks, and this run has {world_size}"
    advice = _FLAG_ADVICE.format(saved=saved_world, next_epoch=epoch + 1, epoch=epoch)
    layout = _base_layout(split, source)
    if layout is None or not _plain_map_style(loader):
        raise CheckpointIncompatibleError(
            f"{source!r} was saved {where}: cairn can share the rest of an epoch among another number of ranks only "
            f"for a map-style dataset split by DistributedSampler in a plain DataLoader; {advice}"
        )
    _check_same_data(layout, loader, source)  # type: ignore[arg-type]
    left = _left_over(split, epoch=epoch, done=done, source=source)
    shares = [left[r::world_size] for r in range(world_size)]
    batches = [_batch_count(len(share), layout["batch_size"], drop_last=layout["drop_last"]) for share in shares]
    dropped = layout["drop_last"] and any(len(share) % layout["batch_size"] for share in shares)
    if len(set(batches)) != 1 or dropped:
        raise CheckpointIncompatibleError(
            f"{source!r} was saved {where}: the {len(left)} samples left in the epoch do not make the same number of "
            f"whole batches of {layout['batch_size']} on every rank ({', '.join(map(str, batches))} batches), so "
            f"some would be skipped or a rank would wait for the others forever; {advice}"
        )
    return Rest(indices=shares[rank], batches=batches[rank])


def _base_layout(split: Any, source: str) -> dict[str, Any] | None:
    """The ``DistributedSampler`` layout the epoch started with, under any re-splits; ``None`` for another kind."""
    for _ in range(_MAX_RESPLITS + 1):
        if not is_resplit(split):
            break
        split = split["resplit_of"]
    else:
        raise CheckpointIncompatibleError(
            f"{source!r} records its epoch re-split among other numbers of ranks more than {_MAX_RESPLITS} times, more "
            "than cairn follows; pass load_at_epoch_boundary=True to start this run at the next epoch"
        )
    layout = split.get("distributed_sampler") if isinstance(split, dict) else None
    return None if layout is None else _checked_layout(layout, split.get("world_size"), source)


def _check_same_data(layout: dict[str, Any], loader: DataLoader, source: str) -> None:
    if len(loader.dataset) != layout["dataset_len"]:  # type: ignore[arg-type]
        raise CheckpointIncompatibleError(
            f"{source!r} was saved with a dataset of {layout['dataset_len']} samples, and this train_dataloader's has "
            f"{len(loader.dataset)}; resume with the dataset the checkpoint was saved with"  # type: ignore[arg-type]
        )
    if loader.batch_size != layout["batch_size"] or loader.drop_last != layout["drop_last"]:
        raise CheckpointIncompatibleError(
            f"{source!r} was saved with batches of {layout['batch_size']} (drop_last={layout['drop_last']}), and this "
            f"train_dataloader makes batches of {loader.batch_size} (drop_last={loader.drop_last}); resume with "
            "the batch size the checkpoint was saved with"
        )


def _damaged_split(source: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"{source!r} records a data split cairn cannot read (its 'dataset_state' was damaged or edited); resume "
        "on the number of ranks it was saved with, or load another checkpoint"
    )


def _plain_map_style(loader: Iterable[Any]) -> bool:
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and not callable(getattr(loader, "state_dict", None))
        and loader.batch_size is not None
    )


def _checked_layout(layout: Any, saved_world: Any, source: str) -> dict[str, Any]:
    """The recorded split, refused unless every field has the type and range it was written with: it comes from
    a file, and drives how many indices are generated."""
    counts = ("dataset_len", "num_replicas", "batch_size", "seed")
    flags = ("shuffle", "sampler_drop_last", "drop_last")
    ok = (
        isinstance(layout, dict)
        and all(isinstance(layout.get(k), int) and not isinstance(layout.get(k), bool) for k in counts)
        and all(isinstance(layout.get(k), bool) for k in flags)
        and 0 <= layout["dataset_len"] < 2**40
        and 1 <= layout["num_replicas"] < 2**20
        and layout["num_replicas"] == saved_world
        and 1 <= layout["batch_size"] < 2**31
        and 0 <= layout["seed"] < 2**64
    )
    if not ok:
        raise _damaged_split(source)
    return layout


class _Sized:
    """Stands in for the dataset where only its length matters: ``DistributedSampler`` asks for nothing else."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


def _left_over(split: dict[str, Any], *, epoch: int, done: int, source: str) -> list[int]:
    """The samples the saving ranks had still to hand out after ``done`` batches each, in the epoch's order: each
    rank's order is recomputed (by ``DistributedSampler`` itself, or through the re-split before), then the tails
    after ``done`` batches are interleaved back."""
    if is_resplit(split):
        width, started = split.get("world_size"), split.get("resplit_at")
        if not (_count(width) and 1 <= width < 2**20 and _count(started) and 0 <= started <= done):
            raise _damaged_split(source)
        inner = _left_over(split["resplit_of"], epoch=epoch, done=started, source=source)
        layout = _base_layout(split, source)
        assert layout is not None  # rest_of_epoch checked it
        orders = [inner[rank::width] for rank in range(width)]
        return _interleaved_tails(orders, (done - started) * layout["batch_size"], layout)
    layout = split["distributed_sampler"]
    orders = []
    for rank in range(layout["num_replicas"]):
        sampler = DistributedSampler(
            _Sized(layout["dataset_len"]),  # type: ignore[arg-type]
            num_replicas=layout["num_replicas"],
            rank=rank,
            shuffle=layout["shuffle"],
            seed=layout["seed"],
            drop_last=layout["sampler_drop_last"],
        )
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return _interleaved_tails(orders, done * layout["batch_size"], layout)


def _interleaved_tails(orders: list[list[int]], consumed: int, layout: dict[str, Any]) -> list[int]:
    """What is left of each rank's order after ``consumed`` samples (and, with ``drop_last``, without the last
    partial batch it never trains), dealt back into one order, position by position."""
    batch = layout["batch_size"]
    tails = []
    for order in orders:
        usable = len(order) - len(order) % batch if layout["drop_last"] else len(order)
        tails.append(order[min(consumed, usable) : usable])
    longest = max((len(tail) for tail in tails), default=0)
    return [tail[k] for k in range(longest) for tail in tails if k < len(tail)]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _batch_count(samples: int, batch_size: int, *, drop_last: bool) -> int:
    return samples // batch_size if drop_last else math.ceil(samples / batch_size)
