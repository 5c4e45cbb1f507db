"""What the ranks must agree on at each checkpoint event, settled in one small collective, or in none.

After each batch and each epoch every rank must take the same decisions: whether each saver saves now, and whether
any rank was asked to stop (a preemption signal reaches one process). A saver's answer is rank 0's: a wall-clock
interval or a user's function may answer differently on another rank. A stop is any rank's. Asked one by one,
these cost a pickled object through the process group per saver and one more for the preemption watch, every
batch (with NCCL, each a host sync). Here every question goes into one small integer tensor and one
``all_reduce(MAX)``: each saver's slot holds rank 0's answer (the other ranks put 0 there), the last slot any rank's
stop. While a saver's sharded folders upload to a store, each adds three slots of its upload notes (see
:class:`~cairn.checkpoint.save.remote_shards.UploadNotes`: some rank has not stored its shards, failed, still knows
the folder), so comparing them costs no collective of its own. Two more slots say whether some rank's uploaders
still have an upload in flight, and whether one failed: a failure on one rank is then raised on every rank, at this
event (its message gathered from the rank that failed), instead of stopping that rank alone while the others wait
for it in their next collective. After a save that uploads, the ranks keep comparing these until no rank has an
upload in flight (:meth:`~cairn.checkpoint.save.saver.CheckpointSaver.watches_uploads`). Where no rank can answer
otherwise (every saver's interval counts epochs or batches, which every rank counts alike, no preemption watch, no
folder uploading, and no upload of a save in flight), no collective runs at all.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from cairn.core.logger import transfers_among
from cairn.loggers.remote_uploader_downloader import raise_upload_failure_on_every_rank, upload_slots
from cairn.utils.dist import get_rank, is_distributed

if TYPE_CHECKING:
    from cairn.checkpoint.save.remote_shards import UploadNotes
    from cairn.checkpoint.save.saver import CheckpointSaver
    from cairn.core.event import Event
    from cairn.core.state import State
    from cairn.storage.transfer import Transfers
    from cairn.trainer.preemption import PreemptionWatch

__all__ = ["settle_checkpoint_event"]

log = logging.getLogger(__name__)


def settle_checkpoint_event(
    state: State, event: Event, savers: Sequence[CheckpointSaver], preemption: PreemptionWatch | None
) -> None:
    """Tell each saver whether it saves at ``event`` (and every rank's notes on its folders uploading) and the
    watch whether any rank was asked to stop, the same on every rank; every rank calls it at the same point, before
    the event runs."""
    wishes = [saver.wants_to_save(state, event) for saver in savers]
    stop = preemption is not None and preemption.received is not None
    if not is_distributed():  # one process: an upload's failure is raised by its uploader at the next event
        _tell(state, event, savers, preemption, wishes, stop, [saver.upload_notes() for saver in savers])
        return
    transfers = transfers_among(state.callbacks)
    # read before the notes: a shard upload's failure seen here is seen there too (the saver's error names the folder)
    uploads = upload_slots(transfers)
    uploads[_BUSY] |= any(saver.writes_in_background for saver in savers)  # its uploads have not started yet
    notes = [saver.upload_notes() for saver in savers]  # as many slots on every rank: the same folders in flight
    uploading = any(note.slots for note in notes) or any(saver.watches_uploads for saver in savers)
    if not (preemption is not None or uploading or not all(saver.decides_alike(state) for saver in savers)):
        _tell(state, event, savers, preemption, wishes, stop, notes)
        return
    wishes, stop, notes, uploads = _agree(wishes, stop, notes, uploads)
    if uploads[_FAILED]:
        _raise_upload_failure(transfers, notes)
    elif not uploads[_BUSY]:
        for saver in savers:
            saver.uploads_settled()  # every rank alike: no rank has an upload in flight any more
    _tell(state, event, savers, preemption, wishes, stop, notes)


#: the two slots of :func:`~cairn.loggers.remote_uploader_downloader.upload_slots`
_BUSY, _FAILED = range(2)


def _tell(
    state: State,
    event: Event,
    savers: Sequence[CheckpointSaver],
    preemption: PreemptionWatch | None,
    wishes: list[bool],
    stop: bool,
    notes: list[UploadNotes],
) -> None:
    for saver, due, note in zip(savers, wishes, notes, strict=True):
        saver.agree(state, event, due, note)
    if preemption is not None:
        preemption.agree(stop)


def _raise_upload_failure(transfers: Sequence[Transfers], notes: Sequence[UploadNotes]) -> None:
    """Every rank, when some rank's upload failed: raise it on every rank. A failed sharded folder's error is the
    saver's to raise, at this event, on every rank alike (it names the folder, and says its pointer did not move);
    the uploaders' own failures are then only logged."""
    if not any(note.any_failed for note in notes):
        raise_upload_failure_on_every_rank(transfers)
        return
    for each in transfers:
        while (failure := each.take_failure()) is not None:
            log.error("%s", failure)


def _agree(
    wishes: list[bool], stop: bool, notes: list[UploadNotes], uploads: list[int]
) -> tuple[list[bool], bool, list[UploadNotes], list[int]]:
    """Rank 0's wishes, any rank's stop, every rank's upload notes and upload slots, through one ``all_reduce``: on
    the device the process group's backend works with (NCCL only reduces CUDA tensors; gloo CPU ones)."""
    mine = [int(wish) if get_rank() == 0 else 0 for wish in wishes] + [int(stop), *uploads]
    uploads_at = slice(len(wishes) + 1, len(wishes) + 1 + len(uploads))
    for note in notes:
        mine += note.slots
    votes = torch.tensor(mine, dtype=torch.int32, device=_device())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    agreed = votes.tolist()
    reduced: list[UploadNotes] = []
    start = uploads_at.stop
    for note in notes:
        reduced.append(note.agreed(agreed[start : start + len(note.slots)]))
        start += len(note.slots)
    return [bool(value) for value in agreed[: len(wishes)]], bool(agreed[len(wishes)]), reduced, agreed[uploads_at]


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
