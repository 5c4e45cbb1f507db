"""What the ranks must agree on at each checkpoint event, settled in one small collective, or in none.

After each batch and each epoch every rank must take the same decisions: whether each saver saves now, and whether
any rank was asked to stop (a preemption signal reaches one process). A saver's answer is rank 0's: a wall-clock
interval or a user's function may answer differently on another rank. A stop is any rank's. Asked one by one,
these cost a pickled object through the process group per saver and one more for the preemption watch, every
batch (with NCCL, each a host sync). Here every question goes into one small integer tensor and one
``all_reduce(MAX)``: each saver's slot holds rank 0's answer (the other ranks put 0 there), the last slot any rank's
stop. While a saver's sharded folders upload to a store, each adds three slots of its upload notes (see
:class:`~cairn.checkpoint.save.remote_shards.UploadNotes`: some rank has not stored its shards, failed, still knows
the folder), so comparing them costs no collective of its own. Where no rank can answer otherwise (every saver's
interval counts epochs or batches, which every rank counts alike, no preemption watch, and no folder uploading), no
collective runs at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cairn.utils.dist import get_rank, is_distributed

if TYPE_CHECKING:
    from cairn.checkpoint.save.remote_shards import UploadNotes
    from cairn.checkpoint.save.saver import CheckpointSaver
    from cairn.core.event import Event
    from cairn.core.state import State
    from cairn.trainer.preemption import PreemptionWatch

__all__ = ["settle_checkpoint_event"]


def settle_checkpoint_event(
    state: State, event: Event, savers: Sequence[CheckpointSaver], preemption: PreemptionWatch | None
) -> None:
    """Tell each saver whether it saves at ``event`` (and every rank's notes on its folders uploading) and the
    watch whether any rank was asked to stop, the same on every rank; every rank calls it at the same point, before
    the event runs."""
    wishes = [saver.wants_to_save(state, event) for saver in savers]
    notes = [saver.upload_notes() for saver in savers]  # as many slots on every rank: the same folders in flight
    stop = preemption is not None and preemption.received is not None
    uploading = any(note.slots for note in notes)
    if is_distributed() and (
        preemption is not None or uploading or not all(saver.decides_alike(state) for saver in savers)
    ):
        wishes, stop, notes = _agree(wishes, stop, notes)
    for saver, due, note in zip(savers, wishes, notes, strict=True):
        saver.agree(state, event, due, note)
    if preemption is not None:
        preemption.agree(stop)


def _agree(wishes: list[bool], stop: bool, notes: list[UploadNotes]) -> tuple[list[bool], bool, list[UploadNotes]]:
    """Rank 0's wishes, any rank's stop and every rank's upload notes, through one ``all_reduce``: on the device
    the process group's backend works with (NCCL only reduces CUDA tensors; gloo CPU ones)."""
    mine = [int(wish) if get_rank() == 0 else 0 for wish in wishes] + [int(stop)]
    for note in notes:
        mine += note.slots
    votes = torch.tensor(mine, dtype=torch.int32, device=_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    agreed = votes.tolist()
    reduced: list[UploadNotes] = []
    start = len(wishes) + 1
    for note in notes:
        reduced.append(note.agreed(agreed[start : start + len(note.slots)]))
        start += len(note.slots)
    return [bool(value) for value in agreed[: len(wishes)]], bool(agreed[len(wishes)]), reduced


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
