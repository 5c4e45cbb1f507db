"""What the ranks must agree on at each checkpoint event, settled in one small collective, or in none.

After each batch and each epoch every rank must take the same decisions: whether each saver saves now, and whether
any rank was asked to stop (a preemption signal reaches one process). A saver's answer is rank 0's: a wall-clock
interval or a user's function may answer differently on another rank. A stop is any rank's. Asked one by one,
these cost a pickled object through the process group per saver and one more for the preemption watch, every
batch (with NCCL, each a host sync). Here every question goes into one small integer tensor and one
``all_reduce(MAX)``: each saver's slot holds rank 0's answer (the other ranks put 0 there), the last slot any rank's
stop. Where no rank can answer otherwise (every saver's interval counts epochs or batches, which every rank counts
alike, and no preemption watch), no collective runs at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cairn.utils.dist import get_rank, is_distributed

if TYPE_CHECKING:
    from cairn.checkpoint.save.saver import CheckpointSaver
    from cairn.core.event import Event
    from cairn.core.state import State
    from cairn.trainer.preemption import PreemptionWatch

__all__ = ["settle_checkpoint_event"]


def settle_checkpoint_event(
    state: State, event: Event, savers: Sequence[CheckpointSaver], preemption: PreemptionWatch | None
) -> None:
    """Tell each saver whether it saves at ``event`` and the watch whether any rank was asked to stop, the same on
    every rank; every rank calls it at the same point, before the event runs."""
    wishes = [saver.wants_to_save(state, event) for saver in savers]
    stop = preemption is not None and preemption.received is not None
    if is_distributed() and (preemption is not None or not all(saver.decides_alike(state) for saver in savers)):
        wishes, stop = _agree(wishes, stop)
    for saver, due in zip(savers, wishes, strict=True):
        saver.agree(state, event, due)
    if preemption is not None:
        preemption.agree(stop)


def _agree(wishes: list[bool], stop: bool) -> tuple[list[bool], bool]:
    """Rank 0's wishes and any rank's stop, through one ``all_reduce``: on the device the process group's backend
    works with (NCCL only reduces CUDA tensors; gloo CPU ones)."""
    mine = [int(wish) if get_rank() == 0 else 0 for wish in wishes] + [int(stop)]
    votes = torch.tensor(mine, dtype=torch.int32, device=_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    agreed = [bool(value) for value in votes.tolist()]
    return agreed[:-1], agreed[-1]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
