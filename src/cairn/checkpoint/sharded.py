"""Sharded checkpoints: a folder in which every rank writes its own shards with ``torch.distributed.checkpoint``.

Layout of ``<name>/``: the DCP shard files (``__<rank>_0.distcp``) and ``.metadata`` hold the model and optimizer
tensors; ``cairn.pt`` (written by rank 0) holds everything else, as in a single-file checkpoint, with its content
hash. The folder is written under a hidden temporary name and renamed once every rank has finished, so a reader
never sees a partial folder. DCP reshards on load: a folder written by N ranks loads on M ranks, or into a plain
module in one process.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from cairn.checkpoint.commit import _write_failed, fsync_path, temporary_suffix, write_checkpoint
from cairn.checkpoint.compat import model_name_problems, model_shape_problems
from cairn.checkpoint.content import build_checkpoint, file_digest, seal
from cairn.core.model_state import model_weights_module
from cairn.core.state import State, class_keys
from cairn.errors import CairnError, CheckpointCorruptError, CheckpointIncompatibleError
from cairn.names import METADATA_FILE, TEMP_MARKER
from cairn.utils.dist import broadcast_object, get_rank, on_rank_zero

__all__ = [
    "METADATA_FILE",
    "ShardedAsyncSaves",
    "is_sharded_folder",
    "load_shards",
    "read_whole_shards",
    "save_sharded",
    "write_sharded_folder",
]


def is_sharded_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def save_sharded(
    state: State, path: str, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), overwrite: bool = True
) -> str:
    """Write ``path`` as a sharded checkpoint folder; every rank calls it, each writes its own shards."""
    import torch.distributed.checkpoint as dcp

    temporary = _temporary_folder(path)
    with _shard_write_errors(temporary, path):
        dcp.save(_current_tensors(state, weights_only=weights_only), checkpoint_id=temporary)  # rank 0: .metadata
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
        with _single_process_quietly():
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
        tensors = _current_tensors(state, weights_only=weights_only)
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


def _current_tensors(state: State, *, weights_only: bool) -> dict[str, Any]:
    """The model's (and optimizers') state as DCP wants it: sharded tensors where the model is sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module = model_weights_module(state.model)  # names as the user's network has them, as in single files
    tensors: dict[str, Any] = {"model": get_model_state_dict(module)}
    if not weights_only:
        optimizers = zip(class_keys(state.optimizers), state.optimizers, strict=True)
        tensors["optimizers"] = {key: get_optimizer_state_dict(module, opt) for key, opt in optimizers}
    return tensors


def load_shards(folder: str, state: State, *, weights_only: bool, strict: bool) -> None:
    """Read the shards of ``folder`` into this run's model (and optimizers), resharding to this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from cairn.checkpoint.shard_index import SafeLoadPlanner, SafeReader, read_shard_index

    index = read_shard_index(folder)
    saved = index.state_dict_metadata
    _check_model_fits(folder, saved, state, strict=strict)
    tensors = _current_tensors(state, weights_only=weights_only)
    if not strict:
        tensors["model"] = {k: v for k, v in tensors["model"].items() if f"model.{k}" in saved}
    with _shard_errors(folder):
        dcp.load(tensors, storage_reader=SafeReader(folder, index), planner=SafeLoadPlanner())
    module = model_weights_module(state.model)
    set_model_state_dict(module, tensors["model"], options=_options(strict=strict))
    for key, optimizer in zip(class_keys(state.optimizers), state.optimizers, strict=True):
        if not weights_only:
            set_optimizer_state_dict(module, optimizer, tensors["optimizers"][key])


def read_whole_shards(folder: str) -> dict[str, Any]:
    """A sharded folder's tensors (``model``, and ``optimizers`` when it has them) joined into whole CPU tensors,
    in one process, without a model to load into: what ``cairn ckpt convert`` and ``diff`` need. Call it on a
    folder :func:`~cairn.checkpoint.read_checkpoint` has verified."""
    # dcp.load copies the top-level dict it is given, so the planner that builds the state from the index fills a
    # copy; torch's own dcp_to_torch_save calls the function beneath it, as this does
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from cairn.checkpoint.shard_index import SafeReader, SafeWholeLoadPlanner

    tensors: dict[str, Any] = {}
    with _shard_errors(folder):
        _load_state_dict(tensors, storage_reader=SafeReader(folder), planner=SafeWholeLoadPlanner(), no_dist=True)
    if not isinstance(tensors.get("model"), dict) or not isinstance(tensors.get("optimizers", {}), dict):
        raise CheckpointCorruptError(
            f"the shards of {folder!r} hold no model (or a malformed optimizer section); they are damaged or were "
            "tampered with: load an earlier checkpoint"
        )
    return tensors


@contextlib.contextmanager
def _shard_errors(folder: str) -> Iterator[None]:
    """DCP's load, quietly in one process; any failure, on any rank, becomes one of cairn's errors."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quietly():
            yield
    except CheckpointException as err:  # DCP gathers every rank's failure into one exception (a BaseException)
        raise _diagnosis(err, folder) from None


def _diagnosis(failure: BaseException, folder: str) -> CairnError:
    """cairn's own error from the first rank that raised one; otherwise the shards are damaged."""
    causes = [cause for cause, _ in getattr(failure, "failures", {}).values()]
    for cause in causes:
        if isinstance(cause, CairnError):
            return cause
    first = causes[0] if causes else failure
    reason = (str(first).splitlines() or [type(first).__name__])[0][:200]
    return CheckpointCorruptError(
        f"the shards of {folder!r} could not be read ({reason}); they are damaged: load an earlier checkpoint"
    )


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns each time it runs without a process group; loading into one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _options(*, strict: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(strict=strict)


def _check_model_fits(folder: str, index: dict[str, Any], state: State, *, strict: bool) -> None:
    """Name every missing, unexpected and mis-shaped weight, from the shards' metadata, before reading any."""
    saved = {
        key.removeprefix("model."): tuple(meta.size)
        for key, meta in index.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    expected = {k: tuple(v.shape) for k, v in model_weights_module(state.model).state_dict().items()}
    problems = model_shape_problems(saved, expected)
    if strict:
        missing, unexpected = [k for k in expected if k not in saved], [k for k in saved if k not in expected]
        problems += model_name_problems(missing, unexpected)
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointIncompatibleError(f"sharded checkpoint {folder} does not fit this run:\n  - {listing}")
