"""Writing sharded checkpoints: a folder in which every rank writes its own shards with DCP
(``torch.distributed.checkpoint``).

Layout of ``<name>/``: the DCP shard files (``__<rank>_0.distcp``) and ``.metadata`` hold the model and optimizer
tensors; ``cairn.pt`` (written by rank 0) holds everything else, as in a single-file checkpoint, with its content
hash. The folder is written under a hidden temporary name and renamed once every rank has finished, so a reader
never sees a partial folder.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from cairn.checkpoint.format import file_digest
from cairn.checkpoint.save.commit import _write_failed, fsync_path, temporary_suffix, write_checkpoint
from cairn.checkpoint.save.content import build_checkpoint, seal
from cairn.checkpoint.shards import dcp_tensors, single_process_quietly
from cairn.core.state import State
from cairn.errors import CairnError
from cairn.names import METADATA_FILE, TEMP_MARKER
from cairn.utils.dist import broadcast_object, get_rank, on_rank_zero

__all__ = ["ShardedAsyncSaves", "save_sharded", "write_sharded_folder"]


def save_sharded(
    state: State, path: str, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), overwrite: bool = True
) -> str:
    """Write ``path`` as a sharded checkpoint folder; every rank calls it, each writes its own shards."""
    import torch.distributed.checkpoint as dcp

    temporary = _temporary_folder(path)
    with _shard_write_errors(temporary, path):
        dcp.save(dcp_tensors(state, weights_only=weights_only), checkpoint_id=temporary)  # rank 0: .metadata
    rest = build_checkpoint(state, weights_only=weights_only, ignore_keys=ignore_keys, sharded=True)
    on_rank_zero(
        lambda: _complete(rest, temporary, path, overwrite=overwrite), f"finish the sharded checkpoint {path!r}"
    )
    return path


def write_sharded_folder(tensors: dict[str, Any], rest: dict[str, Any], path: str) -> None:
    """Write a sharded folder from one process (``cairn ckpt convert``): the same layout, published by rename."""
    import torch.distributed.checkpoint as dcp

    temporary = _temporary_folder(path)
    try:
        with single_process_quietly():
            dcp.save(tensors, checkpoint_id=temporary, no_dist=True)
        _complete(rest, temporary, path, overwrite=False)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class ShardedAsyncSaves:
    """``torch.distributed.checkpoint.async_save`` for one saver: shards are staged to host memory (buffers kept
    between saves, pinned for GPU tensors) and written by DCP's thread over a gloo group of their own, so the
    background collectives never interleave with the training thread's."""

    def __init__(self) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self._group = dist.new_group(backend="gloo")  # every rank reaches the first async save together
        self._stager = DefaultStager(StagingOptions(torch.cuda.is_available(), False, False, False))

    def start(
        self, state: State, path: str, *, weights_only: bool, ignore_keys: Sequence[str], overwrite: bool
    ) -> Callable[[], None]:
        """Stage this rank's shards and start writing them; the returned function (run in the background) waits
        for every rank's shards, then rank 0 adds ``cairn.pt`` and publishes the folder."""
        import torch.distributed.checkpoint as dcp

        temporary = _temporary_folder(path)
        tensors = dcp_tensors(state, weights_only=weights_only)
        response = dcp.async_save(
            tensors, checkpoint_id=temporary, async_stager=self._stager, process_group=self._group
        )
        shards = getattr(response, "upload_completion", response)
        rest = copy.deepcopy(build_checkpoint(state, weights_only=weights_only, ignore_keys=ignore_keys, sharded=True))

        def finish() -> None:
            with _shard_write_errors(temporary, path):
                shards.result()  # on rank 0 this returns once every rank's shards and the .metadata are written
            if get_rank() == 0:  # a failure is reported through the saver, at its next event or save
                _complete(rest, temporary, path, overwrite=overwrite)

        return finish

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
        return _write_failed(path, os.path.dirname(path) or ".", failure)
    rank, (cause, _trace) = failures[0]
    shard = os.path.join(path, f"__{rank}_0.distcp")
    return _write_failed(f"{path} (rank {rank} writing its shards, {shard})", os.path.dirname(path) or ".", cause)


def _temporary_folder(path: str) -> str:
    """Named by rank 0, which finishes the folder: a new run removes it only once that process is gone."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}{TEMP_MARKER}{broadcast_object(temporary_suffix())}")


def _complete(rest: dict[str, Any], temporary: str, path: str, *, overwrite: bool) -> None:
    """Add ``cairn.pt`` to the finished shards and rename the folder into place (one process does it).

    ``cairn.pt`` records a digest of every file DCP wrote, so that a reader can vouch for the shards (DCP keeps no
    checksum of its own) before any of their bytes reach the model.
    """
    metadata = rest["state"]["metadata"]
    metadata["shards"] = {name: file_digest(os.path.join(temporary, name)) for name in sorted(os.listdir(temporary))}
    write_checkpoint(seal(rest), os.path.join(temporary, METADATA_FILE))
    _publish(temporary, path, overwrite=overwrite)


def _publish(temporary: str, path: str, *, overwrite: bool) -> None:
    """Rename the finished folder into place; an existing one is replaced only with ``overwrite``."""
    if os.path.exists(path):
        if not overwrite:
            shutil.rmtree(temporary, ignore_errors=True)
            raise FileExistsError(f"{path} already exists and overwrite is off; pass save_overwrite=True to replace it")
        retired = f"{temporary}-old"
        os.replace(path, retired)
        os.replace(temporary, path)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, path)
    fsync_path(os.path.dirname(path) or ".")
