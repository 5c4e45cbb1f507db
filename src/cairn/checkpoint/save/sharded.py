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
import io
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
import xxhash

from cairn.atomic import publish_folder, temporary_folder, temporary_suffix, write_failed
from cairn.checkpoint.format import HASH_NAME, file_digest
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


def write_shards(state: State, temporary: str, path: str, *, weights_only: bool) -> dict[str, str]:
    """Every rank writes its own shards of ``state`` into ``temporary`` (rank 0 the ``.metadata`` too), together.
    Returns, on rank 0, the digest of every file written, each taken as it was written (elsewhere: nothing)."""
    import torch.distributed.checkpoint as dcp

    writer = digesting_writer(temporary)
    with _shard_write_errors(temporary, path):
        dcp.save(dcp_tensors(state, weights_only=weights_only), storage_writer=writer)  # rank 0: .metadata
    return writer.digests


def write_sharded_folder(tensors: dict[str, Any], rest: dict[str, Any], path: str) -> None:
    """Write a sharded folder from one process (``cairn ckpt convert``): the same layout, published by rename."""
    import torch.distributed.checkpoint as dcp

    temporary = temporary_shard_folder(path)
    writer = digesting_writer(temporary)
    try:
        with single_process_quietly():
            dcp.save(tensors, storage_writer=writer, no_dist=True)
        complete_folder(rest, temporary, path, overwrite=False, digests=writer.digests)
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

    def start(
        self, state: State, temporary: str, path: str, *, weights_only: bool
    ) -> Callable[[], dict[str, str]]:
        """Stage this rank's shards and start writing them into ``temporary``; the returned function (run in the
        background) waits for them: on rank 0 it returns once every rank's shards and the ``.metadata`` are
        written, with their digests (taken as they were written; elsewhere nothing)."""
        import torch.distributed.checkpoint as dcp

        tensors = dcp_tensors(state, weights_only=weights_only)
        writer = digesting_writer(temporary)
        response = dcp.async_save(
            tensors, storage_writer=writer, async_stager=self._stager, process_group=self._group
        )
        shards = getattr(response, "upload_completion", response)

        def wait() -> dict[str, str]:
            with _shard_write_errors(temporary, path):
                shards.result()
            return writer.digests

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


def complete_folder(
    rest: dict[str, Any], temporary: str, path: str, *, overwrite: bool, digests: Mapping[str, str] | None = None
) -> None:
    """Add ``cairn.pt`` to the finished shards and publish the folder (one process does it).

    ``cairn.pt`` records a digest of every file DCP wrote, so that a reader can vouch for the shards (DCP keeps no
    checksum of its own) before any of their bytes reach the model. ``digests`` are those taken while the files
    were written (:func:`digesting_writer`); a file without one is read back for it.
    """
    taken = digests or {}
    metadata = rest["state"]["metadata"]
    metadata["shards"] = {
        name: taken.get(name) or file_digest(os.path.join(temporary, name)) for name in sorted(os.listdir(temporary))
    }
    write_checkpoint(seal(rest), os.path.join(temporary, METADATA_FILE))
    publish_folder(temporary, path, overwrite=overwrite)


# -- digests taken while DCP writes ----------------------------------------------------------------------------------

_DIGESTS_ENTRY = "cairn.shard-digests"  #: the name under which each rank's digests travel to rank 0 with DCP's results


class _DigestingStream(io.RawIOBase):
    """A file DCP writes, hashed as the bytes go by: DCP writes each file from start to end (``torch.save`` into it
    included) and only asks where it stands (``tell``), so the running hash is the file's."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        self._digest = xxhash.xxh3_128()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._digest.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        raise io.UnsupportedOperation("a shard being hashed as it is written is written from start to end")

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def digest(self) -> str:
        return f"{HASH_NAME}:{self._digest.hexdigest()}"


def digesting_writer(folder: str) -> Any:
    """A DCP ``FileSystemWriter`` into ``folder`` that takes each file's digest while writing it. Each rank's
    digests go to rank 0 with DCP's own write results (no collective of cairn's), where ``writer.digests`` holds
    every file's once the save is finished, ``.metadata`` included; on the other ranks it stays empty."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.storage import WriteResult

    class DigestingFileSystem(FileSystem):
        def __init__(self) -> None:
            self.digests: dict[str, str] = {}
            self._lock = threading.Lock()

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with open(path, mode) as file:
                stream = _DigestingStream(file)
                yield stream
            with self._lock:
                self.digests[os.path.basename(path)] = stream.digest()

        def rename(self, path: Any, new_path: Any) -> None:
            super().rename(path, new_path)
            with self._lock:
                digest = self.digests.pop(os.path.basename(path), None)
                if digest is not None:
                    self.digests[os.path.basename(new_path)] = digest

    class DigestingWriter(FileSystemWriter):
        def __init__(self, path: str) -> None:
            super().__init__(path)
            self.fs = DigestingFileSystem()
            self.digests: dict[str, str] = {}

        def write_data(self, plan: Any, planner: Any) -> Any:
            results = super().write_data(plan, planner).wait()  # a torch Future, already done: files are written
            with self.fs._lock:  # noqa: SLF001 - its own file system
                mine = dict(self.fs.digests)
            done: torch.futures.Future[list[Any]] = torch.futures.Future()
            done.set_result([*results, WriteResult(MetadataIndex(_DIGESTS_ENTRY), 0, mine)])
            return done

        def finish(self, metadata: Any, results: list[list[Any]]) -> None:
            digests: dict[str, str] = {}
            kept = []
            for rank_results in results:
                for result in rank_results:
                    if result.index.fqn == _DIGESTS_ENTRY:
                        digests.update(result.storage_data)
                kept.append([result for result in rank_results if result.index.fqn != _DIGESTS_ENTRY])
            super().finish(metadata, kept)
            with self.fs._lock:  # noqa: SLF001 - its own file system: the .metadata just written
                self.digests = {**digests, **self.fs.digests}

    return DigestingWriter(folder)
