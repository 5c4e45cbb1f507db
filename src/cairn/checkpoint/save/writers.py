"""How a save is written: one interface in front of both formats (a single file, a sharded folder), each written now
or in the background.

A writer's :meth:`~Writer.start` does what must happen on the training thread on every rank, while the state stands
still: the collectives (every rank's RNG is gathered), the snapshot copy, DCP's staging. The function it returns
does the rest: hash, write, publish. A synchronous save runs it at once on every rank (``start(state, path)()``);
an asynchronous one hands it to the saver's background thread, where it runs on every rank too (DCP's background
collectives need every rank; a single file is written by rank 0 alone, the other ranks' function does nothing).

Who writes and how a failure reaches the other ranks differ by form: a synchronous writer shares rank 0's failure
with every rank at once (:func:`~cairn.utils.dist.on_rank_zero`); an asynchronous single file leaves it to the
saver, which shares it when it next waits for the save; an asynchronous sharded folder shares rank 0's outcome in
the background, over the writer's own process group, so that when its function returns on any rank the folder is
published (every rank may then upload its shards at once) and when it fails, it fails on every rank.
"""

from __future__ import annotations

import copy
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cairn.checkpoint.incremental.files import write_incremental
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.content import build_checkpoint, collect_checkpoint, on_cpu, seal
from cairn.checkpoint.save.sharded import AsyncShardWrites, complete_folder, temporary_shard_folder, write_shards
from cairn.checkpoint.save.snapshot import SnapshotBuffers
from cairn.utils.dist import get_rank, on_rank_zero

if TYPE_CHECKING:
    from cairn.core.state import State

__all__ = [
    "AsyncShardedWriter",
    "AsyncIncrementalWriter",
    "AsyncSingleFileWriter",
    "IncrementalWriter",
    "ShardedWriter",
    "SingleFileWriter",
    "Writer",
    "make_writer",
]

log = logging.getLogger(__name__)

Finish = Callable[[], None]


class Writer(ABC):
    """One checkpoint format (``sharded`` says which), written now or in the background, told once what goes into
    the checkpoint and whether it may replace an existing one."""

    sharded = False

    def __init__(self, *, weights_only: bool, ignore_keys: Sequence[str], overwrite: bool) -> None:
        self.weights_only = weights_only
        self.ignore_keys = ignore_keys
        self.overwrite = overwrite

    @abstractmethod
    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        """Take what must be taken on the training thread (every rank calls it); the returned function writes.
        ``folder`` is the saver's folder (an incremental writer keeps its chunks there; else the path's own)."""

    def prepare(self, state: State) -> None:  # noqa: B027 - not abstract: most writers have nothing to prepare
        """Get ready for the first save at the start of fit (every rank calls it; collectives are allowed), so that
        it costs the training thread no more than later ones."""

    def close(self) -> None:  # noqa: B027 - not abstract: a synchronous writer keeps nothing between saves
        """Release what the writer keeps between saves (host buffers, DCP's stager); no save may be in flight."""


def make_writer(
    *,
    sharded: bool,
    asynchronous: bool,
    weights_only: bool,
    ignore_keys: Sequence[str],
    overwrite: bool,
    incremental: bool = False,
) -> Writer:
    """The writer of one saver: the format is the state's (``sharded``) and the saver's (``incremental``: a manifest
    and chunks; a sharded folder stays whole, see :class:`IncrementalWriter`), the timing the saver's
    (``asynchronous``)."""
    if incremental and sharded:
        log.info("incremental=True: this run's checkpoints are sharded folders, which are written whole")
    kind = _INCREMENTAL[asynchronous] if incremental and not sharded else _WRITERS[sharded, asynchronous]
    return kind(weights_only=weights_only, ignore_keys=ignore_keys, overwrite=overwrite)


class SingleFileWriter(Writer):
    """One file, written by rank 0 now; every rank raises if it failed (else the others would wait forever)."""

    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        checkpoint = build_checkpoint(state, weights_only=self.weights_only, ignore_keys=self.ignore_keys)
        overwrite = self.overwrite

        def finish() -> None:
            on_rank_zero(
                lambda: write_checkpoint(checkpoint, path, overwrite=overwrite), f"write the checkpoint {path!r}"
            )

        return finish


class AsyncSingleFileWriter(Writer):
    """One file, written by rank 0 in the background from a snapshot in host buffers reused between saves."""

    def __init__(self, *, weights_only: bool, ignore_keys: Sequence[str], overwrite: bool) -> None:
        super().__init__(weights_only=weights_only, ignore_keys=ignore_keys, overwrite=overwrite)
        self._snapshot = SnapshotBuffers()

    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        checkpoint = collect_checkpoint(state, weights_only=self.weights_only, ignore_keys=self.ignore_keys)
        if get_rank() != 0:
            return _nothing  # rank 0 alone writes; the others only took part in the collectives above
        snapshot = self._snapshot.take(checkpoint)
        overwrite = self.overwrite
        return lambda: write_checkpoint(seal(snapshot), path, overwrite=overwrite)

    def prepare(self, state: State) -> None:
        """Allocate and fault in rank 0's host buffers on a thread of their own, now and after each optimizer's first
        step (its state is made then), so the first save is one memory copy, like the later ones."""
        checkpoint = collect_checkpoint(state, weights_only=self.weights_only, ignore_keys=self.ignore_keys)
        if get_rank() != 0:
            return  # the other ranks hold no buffers; they only took part in the collectives above
        self._snapshot.prepare(checkpoint)
        if not self.weights_only:
            self._snapshot.prepare_after_first_step(state.optimizers)

    def close(self) -> None:
        self._snapshot.release()


class ShardedWriter(Writer):
    """A folder of every rank's shards (written together now) and rank 0's ``cairn.pt``; rank 0 publishes it and
    every rank raises if that failed."""

    sharded = True

    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        temporary = temporary_shard_folder(path)
        digests = write_shards(state, temporary, path, weights_only=self.weights_only)
        rest = self._rest(state)
        overwrite = self.overwrite

        def finish() -> None:
            on_rank_zero(
                lambda: complete_folder(rest, temporary, path, overwrite=overwrite, digests=digests),
                f"finish the sharded checkpoint {path!r}",
            )

        return finish

    def _rest(self, state: State) -> dict[str, Any]:
        """Everything but the shards, for ``cairn.pt``: the RNG of every rank is gathered here."""
        return build_checkpoint(state, weights_only=self.weights_only, ignore_keys=self.ignore_keys, sharded=True)


class AsyncShardedWriter(ShardedWriter):
    """The sharded folder, its shards staged to host memory now and written by DCP in the background; rank 0 then
    adds ``cairn.pt`` and publishes, and every rank's background learns the outcome (a failure is raised on every
    rank's background thread, and reported through the saver at its next event or save)."""

    def __init__(self, *, weights_only: bool, ignore_keys: Sequence[str], overwrite: bool) -> None:
        super().__init__(weights_only=weights_only, ignore_keys=ignore_keys, overwrite=overwrite)
        self._shards: AsyncShardWrites | None = None  # its gloo group is made at the first save, on every rank

    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        if self._shards is None:
            self._shards = AsyncShardWrites()
        temporary = temporary_shard_folder(path)
        shards = self._shards
        shards_written = shards.start(state, temporary, path, weights_only=self.weights_only)
        rest = copy.deepcopy(self._rest(state))  # training goes on and may change what it refers to
        overwrite = self.overwrite

        def finish() -> None:
            digests = shards_written()  # every rank's, or DCP raises on every rank
            shards.on_rank_zero(
                lambda: complete_folder(rest, temporary, path, overwrite=overwrite, digests=digests),
                f"finish the sharded checkpoint {path!r}",
            )

        return finish

    def close(self) -> None:
        if self._shards is not None:
            self._shards.close()
            self._shards = None


class IncrementalWriter(Writer):
    """A manifest and the chunks the saver's folder lacks, written by rank 0 now (:mod:`cairn.checkpoint.incremental`).

    A sharded folder stays whole (``make_writer``): DCP writes each rank's shards itself, in parallel, and a folder
    of an unchanged model would need a reader of its own to share chunks with the one before; see
    docs/checkpointing.md, "Incremental checkpoints"."""

    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        checkpoint = on_cpu(collect_checkpoint(state, weights_only=self.weights_only, ignore_keys=self.ignore_keys))
        root = os.path.dirname(path) if folder is None else folder
        overwrite = self.overwrite

        def finish() -> None:
            on_rank_zero(
                lambda: write_incremental(checkpoint, path, root=root, overwrite=overwrite),
                f"write the checkpoint {path!r}",
            )

        return finish


class AsyncIncrementalWriter(AsyncSingleFileWriter):
    """The manifest and new chunks, written by rank 0 in the background from a snapshot in reused host buffers."""

    def start(self, state: State, path: str, *, folder: str | None = None) -> Finish:
        checkpoint = collect_checkpoint(state, weights_only=self.weights_only, ignore_keys=self.ignore_keys)
        if get_rank() != 0:
            return _nothing
        snapshot = self._snapshot.take(checkpoint)
        root = os.path.dirname(path) if folder is None else folder
        overwrite = self.overwrite

        def finish() -> None:
            write_incremental(snapshot, path, root=root, overwrite=overwrite)

        return finish


def _nothing() -> None:
    """The background part of a save on a rank that does not write."""


_INCREMENTAL: dict[bool, type[Writer]] = {False: IncrementalWriter, True: AsyncIncrementalWriter}  # asynchronous
_WRITERS: dict[tuple[bool, bool], type[Writer]] = {  # (sharded, asynchronous)
    (False, False): SingleFileWriter,
    (False, True): AsyncSingleFileWriter,
    (True, False): ShardedWriter,
    (True, True): AsyncShardedWriter,
}
