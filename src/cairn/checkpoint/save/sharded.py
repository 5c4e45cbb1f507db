"""Writing sharded checkpoints: a folder in which every rank writes its own shards with DCP
(``torch.distributed.checkpoint``).

Layout of ``<name>/``: the DCP shard files (``__<rank>_0.distcp``) and ``.metadata`` hold the model and optimizer
tensors; ``cairn.pt`` (written by rank 0) holds everything else, as in a single-file checkpoint, with its content
hash. The folder is written under a hidden temporary name and published once every rank has finished (the folder
form of :mod:`cairn.atomic`), so a reader never sees a partial folder. The writers that drive these steps, sync and
async, are in :mod:`cairn.checkpoint.save.writers`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from cairn.atomic import publish_folder, temporary_folder, temporary_suffix, write_failed
from cairn.checkpoint.format import file_digest
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.checkpoint.shards import dcp_tensors, single_process_quietly
from cairn.errors import CairnError
from cairn.names import METADATA_FILE
from cairn.utils.dist import broadcast_object, on_rank_zero

if TYPE_CHECKING:
    from cairn.core.state import State

__all__ = ["AsyncShardWrites", "complete_folder", "temporary_shard_folder", "write_shards", "write_sharded_folder"]


def temporary_shard_folder(path: str) -> str:
    """Named by rank 0, which finishes the folder: a new run removes it only once that process is gone. Every rank
    must call it (the name is broadcast), since every rank writes its shards there."""
    return temporary_folder(path, broadcast_object(temporary_suffix()))


def write_shards(state: State, temporary: str, path: str, *, weights_only: bool) -> None:
    """Every rank writes its own shards of ``state`` into ``temporary`` (rank 0 the ``.metadata`` too), together."""
    import torch.distributed.checkpoint as dcp

    with _shard_write_errors(temporary, path):
        dcp.save(dcp_tensors(state, weights_only=weights_only), checkpoint_id=temporary)  # rank 0: .metadata


def write_sharded_folder(tensors: dict[str, Any], rest: dict[str, Any], path: str) -> None:
    """Write a sharded folder from one process (``cairn ckpt convert``): the same layout, published by rename."""
    import torch.distributed.checkpoint as dcp

    temporary = temporary_shard_folder(path)
    try:
        with single_process_quietly():
            dcp.save(tensors, checkpoint_id=temporary, no_dist=True)
        complete_folder(rest, temporary, path, overwrite=False)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class AsyncShardWrites:
    """``torch.distributed.checkpoint.async_save`` for one saver: shards are staged to host memory (buffers kept
    between saves, pinned for GPU tensors) and written by DCP's thread over a gloo group of their own, so the
    background collectives never interleave with the training thread's."""

    def __init__(self) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self._group = dist.new_group(backend="gloo")  # every rank reaches the first async save together
        self._stager = DefaultStager(StagingOptions(torch.cuda.is_available(), False, False, False))

    def start(self, state: State, temporary: str, path: str, *, weights_only: bool) -> Callable[[], None]:
        """Stage this rank's shards and start writing them into ``temporary``; the returned function (run in the
        background) waits for them: on rank 0 it returns once every rank's shards and the ``.metadata`` are
        written."""
        import torch.distributed.checkpoint as dcp

        tensors = dcp_tensors(state, weights_only=weights_only)
        response = dcp.async_save(
            tensors, checkpoint_id=temporary, async_stager=self._stager, process_group=self._group
        )
        shards = getattr(response, "upload_completion", response)

        def wait() -> None:
            with _shard_write_errors(temporary, path):
                shards.result()

        return wait

    def on_rank_zero(self, action: Callable[[], object], what: str) -> None:
        """In the background, once every rank's shards are written: rank 0 alone runs ``action`` (publishing the
        folder), then every rank learns the outcome over this group (never the default one, which the training
        thread uses) and raises if it failed. So every rank knows, from its own background thread, that the folder
        is published."""
        on_rank_zero(action, what, group=self._group)

    def close(self) -> None:
        self._stager.close()


@contextlib.contextmanager
def _shard_write_errors(temporary: str, path: str) -> Iterator[None]:
    """DCP reports a failed write on any rank (a full disk, say) as its own ``CheckpointException``, on every rank:
    each raises cairn's :class:`~cairn.errors.CheckpointWriteError` instead, naming the failed rank's shard file
    and the free space, and the unfinished folder is removed (nothing was published; the previous checkpoint and
    ``latest`` are untouched)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        shutil.rmtree(temporary, ignore_errors=True)  # every rank has finished with it: DCP gathered their results
        raise _shard_write_failure(err, temporary, path) from None


def _shard_write_failure(failure: BaseException, temporary: str, path: str) -> CairnError:
    failures = sorted(getattr(failure, "failures", {}).items())
    for _, (cause, _trace) in failures:
        if isinstance(cause, CairnError):
            return cause
    if not failures:
        return write_failed(path, os.path.dirname(path) or ".", failure)
    rank, (cause, _trace) = failures[0]
    shard = os.path.join(path, f"__{rank}_0.distcp")
    return write_failed(f"{path} (rank {rank} writing its shards, {shard})", os.path.dirname(path) or ".", cause)


def complete_folder(rest: dict[str, Any], temporary: str, path: str, *, overwrite: bool) -> None:
    """Add ``cairn.pt`` to the finished shards and publish the folder (one process does it).

    ``cairn.pt`` records a digest of every file DCP wrote, so that a reader can vouch for the shards (DCP keeps no
    checksum of its own) before any of their bytes reach the model.
    """
    metadata = rest["state"]["metadata"]
    metadata["shards"] = {name: file_digest(os.path.join(temporary, name)) for name in sorted(os.listdir(temporary))}
    write_checkpoint(seal(rest), os.path.join(temporary, METADATA_FILE))
    publish_folder(temporary, path, overwrite=overwrite)
