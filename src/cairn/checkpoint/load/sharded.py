"""Reading sharded checkpoints: DCP reshards on load, so a folder written by N ranks loads on M ranks, or into a
plain module in one process. Every byte passes :mod:`~cairn.checkpoint.load.shard_index`'s checks first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cairn.checkpoint.load.compatibility import model_name_problems, model_shape_problems
from cairn.checkpoint.shards import dcp_tensors, single_process_quietly
from cairn.core.model_state import model_weights_module
from cairn.core.state import State, class_keys
from cairn.errors import CairnError, CheckpointCorruptError, CheckpointIncompatibleError

if TYPE_CHECKING:
    from cairn.checkpoint.load.shard_index import ShardFiles

__all__ = ["load_shards", "read_whole_shards"]


def load_shards(shards: str | ShardFiles, state: State, *, weights_only: bool, strict: bool) -> None:
    """Read the shards of a folder into this run's model (and optimizers), resharding to this run's ranks.

    ``shards`` is the local folder, or one in a store (:class:`~cairn.checkpoint.load.shard_index.ShardFiles`),
    from which this rank fetches only the files its own plan reads."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from cairn.checkpoint.load.shard_index import SafeLoadPlanner, SafeReader, read_shard_index

    files = None if isinstance(shards, str) else shards
    folder, label = (shards, shards) if files is None else (files.folder, files.label)
    index = read_shard_index(folder, sizes=None if files is None else files.sizes)
    saved = index.state_dict_metadata
    _check_model_fits(label, saved, state, strict=strict)
    tensors = dcp_tensors(state, weights_only=weights_only)
    if not strict:
        tensors["model"] = {k: v for k, v in tensors["model"].items() if f"model.{k}" in saved}
    with _shard_errors(label):
        dcp.load(tensors, storage_reader=SafeReader(folder, index, files=files), planner=SafeLoadPlanner())
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

    from cairn.checkpoint.load.shard_index import SafeReader, SafeWholeLoadPlanner

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
        with single_process_quietly():
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
