"""Reading a checkpoint back: safely (no code runs), verified (the hash must match), and checked before applied.

Every failure is one of :mod:`cairn.errors`' exceptions and happens before the state is touched, so a bad file
never leaves a run half-restored.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cairn.checkpoint.format import FORMAT_VERSION, content_hash, drop_keys, is_sharded, is_weights_only
from cairn.checkpoint.incremental.files import ChunkSource, assemble
from cairn.checkpoint.incremental.manifest import is_manifest
from cairn.checkpoint.load.archive import check_archive, check_old_style_file, error_reason, needs_code
from cairn.checkpoint.load.compatibility import check_compatible
from cairn.checkpoint.load.sharded import load_shards
from cairn.checkpoint.shards import is_sharded_folder
from cairn.checkpoint.tree import map_tensors
from cairn.core.model_state import load_model_state
from cairn.core.state import State
from cairn.core.time import Timestamp
from cairn.errors import (
    CheckpointCorruptError,
    CheckpointIncompatibleError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)
from cairn.names import EPOCH_SPLIT, EPOCH_START_GENERATORS, EPOCH_START_RNG, GENERATORS, LOADER_STATES, METADATA_FILE
from cairn.utils.dist import get_rank
from cairn.utils.reproducibility import (
    check_generator_states,
    check_rng_state,
    joining_rank_seed,
    load_rng_state,
    seed_all,
)
from cairn.utils.text import printable

if TYPE_CHECKING:
    from cairn.checkpoint.load.shard_index import ShardFiles

__all__ = ["apply_checkpoint", "load_checkpoint", "read_checkpoint"]

log = logging.getLogger(__name__)


def read_checkpoint(path: str, *, chunks: ChunkSource | None = None, for_resume: bool = False) -> dict[str, Any]:
    """Load and verify the checkpoint at ``path`` (a file, or a sharded folder) without running any code from it.

    An incremental checkpoint (a manifest) comes back whole: its chunks are read from the chunk folder it names
    beside it, or from ``chunks`` (a store's, for a manifest downloaded alone), each checked against its key.

    With ``for_resume`` (the checkpoint is about to be applied whole, optimizer state included), the optimizer
    state of a single file is copied out of the file's mapping on a second thread while the hash walks the file,
    and the copies replace the mapped tensors once the hash has passed: the copy that :func:`apply_checkpoint`
    would make anyway overlaps the disk read instead of following it. A caller that only looks at the checkpoint
    leaves it off, and holds no copy.
    """
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"no checkpoint at {path!r}: check the path (and the working directory)")
    if is_sharded_folder(path):
        return _read_sharded_folder(path)
    if os.path.isdir(path):
        raise CheckpointCorruptError(f"{path!r} is a folder but not a sharded checkpoint (it has no {METADATA_FILE})")
    return _read_file(path, chunks=chunks, for_resume=for_resume)


def _read_file(path: str, *, chunks: ChunkSource | None = None, for_resume: bool = False) -> dict[str, Any]:
    is_archive = check_archive(path)  # the archive's records and its pickle, checked without running it
    if not is_archive:
        check_old_style_file(path)
    _start_reading_ahead(path)
    checkpoint = _torch_load_safely(path, is_archive=is_archive)
    _check_structure(checkpoint, path)
    _check_format_version(checkpoint["state"]["metadata"], path)  # before the hash: a newer format may hash otherwise
    copying = _copy_optimizer_state_ahead(checkpoint) if for_resume and is_archive else None
    try:
        _check_hash(checkpoint, path)  # a manifest's covers its chunks' keys: each chunk is checked as it is read
    finally:
        copies = copying.finish() if copying is not None else {}  # the thread never outlives the read
    _put_in_place(checkpoint, copies)  # only now, verified: the copies are of the bytes the hash covered
    _check_world_size(checkpoint["state"]["metadata"], path)
    if is_manifest(checkpoint):
        checkpoint = assemble(checkpoint, path, chunks)
    return checkpoint


def _read_sharded_folder(folder: str) -> dict[str, Any]:
    """The index first (it could run code or point outside the folder), then ``cairn.pt``, then every shard's
    digest: a damaged shard is found before any of its bytes reach a model."""
    from cairn.checkpoint.load.shard_index import read_shard_index, verify_shard_digests  # slow to import: only here

    index = read_shard_index(folder)
    checkpoint = _read_file(os.path.join(folder, METADATA_FILE))
    verify_shard_digests(folder, index, checkpoint["state"]["metadata"].get("shards"))
    return checkpoint


# Optimizer-state tensors copied out of a file's mapping by read_checkpoint(for_resume=True), by id: apply_checkpoint
# keeps these as they are instead of copying them a second time.
_PRIVATE_COPIES: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _mapped_optimizer_tensors(checkpoint: dict[str, Any]) -> list[tuple[dict[Any, Any], Any, torch.Tensor]]:
    """``(holder, key, tensor)`` for each tensor of a per-parameter optimizer state (``optimizers/<name>/state/<p>/
    <field>``, what ``Optimizer.state_dict()`` holds), the bytes an optimizer keeps by reference after loading.
    Anything shaped otherwise is left to :func:`apply_checkpoint`'s own copy."""
    found = []
    optimizers = checkpoint["state"].get("optimizers")
    for optimizer in optimizers.values() if isinstance(optimizers, dict) else ():
        per_parameter = optimizer.get("state") if isinstance(optimizer, dict) else None
        for fields in per_parameter.values() if isinstance(per_parameter, dict) else ():
            if isinstance(fields, dict):
                found += [(fields, key, value) for key, value in fields.items() if isinstance(value, torch.Tensor)]
    return found


class _CopiesAhead:
    """Copies of the optimizer state, taken out of the file's mapping on a thread of their own while the hash walks
    the file (``clone`` releases the GIL, and the pages it faults in are ones the hash needs too). Nothing is put in
    place here: see :func:`_put_in_place`, called only once the hash has passed."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._tensors = tensors
        self._copies: dict[int, torch.Tensor] = {}  # by the id of the mapped tensor
        self._failed = False
        self._thread = threading.Thread(target=self._copy, name="cairn-copy-optimizer-state", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            for tensor in self._tensors:
                if id(tensor) not in self._copies:  # a tensor held twice stays one tensor, as the file shares it
                    self._copies[id(tensor)] = tensor.clone()
        except BaseException:  # noqa: BLE001 - apply_checkpoint copies (and reports) for itself
            self._failed = True

    def finish(self) -> dict[int, torch.Tensor]:
        """Wait for the thread to end; the copies, or none if copying failed."""
        self._thread.join()
        return {} if self._failed else self._copies


def _copy_optimizer_state_ahead(checkpoint: dict[str, Any]) -> _CopiesAhead | None:
    if is_manifest(checkpoint):
        return None  # its tensors come from chunk files, assembled after the hash
    tensors = [tensor for _, _, tensor in _mapped_optimizer_tensors(checkpoint)]
    return _CopiesAhead(tensors) if tensors else None


def _put_in_place(checkpoint: dict[str, Any], copies: dict[int, torch.Tensor]) -> None:
    """Swap the verified checkpoint's mapped optimizer tensors for their private copies."""
    if not copies:
        return
    for holder, key, tensor in _mapped_optimizer_tensors(checkpoint):
        copy = copies.get(id(tensor))
        if copy is not None:
            holder[key] = copy
            _PRIVATE_COPIES[id(copy)] = copy


def _private_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it is already a private copy (see :func:`_put_in_place`), else a copy of it."""
    return tensor if _PRIVATE_COPIES.get(id(tensor)) is tensor else tensor.clone()


def _start_reading_ahead(path: str) -> None:
    """Ask the kernel to read the whole file now, in large sequential requests, while torch parses it and the hash
    walks it; page faults alone would fetch it in small pieces, at a fraction of the disk's speed."""
    if not hasattr(os, "posix_fadvise"):
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(descriptor)


def _torch_load_safely(path: str, *, is_archive: bool) -> Any:
    """``torch.load`` with ``weights_only=True``: any failure becomes one of cairn's errors, and no code runs."""
    try:
        # A torch archive is memory-mapped: tensors are read from the page cache as they are used (hashed, then
        # copied into the model), not first copied whole into fresh memory. Anything else loads plainly, so
        # that a foreign pickle still reaches the unpickler and is judged by what it holds.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_archive)
    except pickle.UnpicklingError as err:
        if needs_code(str(err), is_archive=is_archive):
            raise UnsafeCheckpointError(
                f"{path!r} holds Python objects that would need code to run to load ({error_reason(err)}); nothing was "
                "executed. cairn checkpoints hold only plain data: re-save it with cairn, or load it yourself with "
                "torch.load(weights_only=False) only if you trust its source"
            ) from None
        raise CheckpointCorruptError(
            f"{path!r} is not a checkpoint torch can read as plain data ({error_reason(err)}); it is damaged or of "
            "another format: load an earlier checkpoint"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle can surface as almost any exception
        raise CheckpointCorruptError(
            f"{path!r} is truncated or corrupt ({error_reason(err)}); load an earlier checkpoint"
        ) from None


def _check_structure(checkpoint: Any, path: str) -> None:
    def fail(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"{path!r} is not a cairn checkpoint: {why}. For a plain state dict, use "
            "module.load_state_dict(torch.load(path)) instead"
        )

    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state"), dict):
        raise fail("expected a dict with a 'state' dict")
    state = checkpoint["state"]
    metadata = state.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("content_hash"), str):
        raise fail("its 'state' has no 'metadata' with a content hash")
    flags = ("sharded", "weights_only")
    if not all(isinstance(metadata.get(flag, False), bool) for flag in flags):
        raise fail(f"its metadata's {' and '.join(flags)} must be true or false")
    model = state.get("model")
    sharded = metadata.get("sharded") is True  # its model lives in the shards beside this file
    if not (sharded and model is None) and (not isinstance(model, dict) or not all(isinstance(k, str) for k in model)):
        raise fail("'state/model' is not a dict of named tensors")
    if "rng" in checkpoint and not isinstance(checkpoint["rng"], list):
        raise fail("'rng' is not a list with one entry per rank")
    if "timestamp" in state and not isinstance(state["timestamp"], dict):
        raise fail("'state/timestamp' is not a dict")


def _check_format_version(metadata: dict[str, Any], path: str) -> None:
    """A file of a newer format is refused as incompatible (its meaning may have changed: upgrading cairn is the
    fix, and autoresume must not set it aside as damaged); a version that is no version at all is damage. Files
    written before the field existed have none, and stay readable."""
    version = metadata.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31:  # a small count
        raise CheckpointCorruptError(
            f"{path!r} records the format version {_shown(version)}, which no cairn writes; it is damaged or was "
            "edited: load an earlier checkpoint"
        )
    if version > FORMAT_VERSION:
        raise CheckpointIncompatibleError(
            f"{path!r} was written by a newer cairn (format {_shown(version)}; this cairn reads {FORMAT_VERSION}): "
            "upgrade cairn to load it"
        )


def _check_world_size(metadata: dict[str, Any], path: str) -> None:
    """How many processes wrote the file: a whole number of at least 1 when present. ``created_at`` is not
    checked: it is only shown (``cairn ckpt ls`` falls back to the file's time when it is not a number)."""
    world_size = metadata.get("world_size", 1)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size < 2**63:
        raise CheckpointCorruptError(
            f"{path!r} records a world size of {_shown(world_size)}, not a count of processes; it is damaged or was "
            "edited: load an earlier checkpoint"
        )


def _shown(value: Any) -> str:
    """A short rendering of a value from a file (Python refuses to print an int of more than 4300 digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit number"
    if not isinstance(value, (int, float, str)):
        return f"a {type(value).__name__}"  # never the repr of a container: it could be huge, or nested too deep
    return printable(repr(value[:40] if isinstance(value, str) else value))


def _check_hash(checkpoint: dict[str, Any], path: str) -> None:
    recorded = checkpoint["state"]["metadata"]["content_hash"]
    try:
        actual = content_hash(checkpoint)
    except Exception as err:  # noqa: BLE001 - damaged tensor metadata can fail in many ways
        raise CheckpointCorruptError(f"{path!r} cannot be hashed ({err}); it is damaged: load an earlier one") from None
    if actual != recorded:
        raise CheckpointCorruptError(
            f"{path!r} fails its content hash: the data changed after it was written (disk or transfer damage, or "
            "an edit); load an earlier checkpoint"
        )


def apply_checkpoint(
    checkpoint: dict[str, Any],
    state: State,
    *,
    source: str,
    weights_only: bool = False,
    strict: bool = True,
    ignore_keys: Sequence[str] = (),
    shards_at: str | ShardFiles | None = None,
) -> None:
    """Restore a verified checkpoint into ``state``: check everything first, then change anything.

    ``source`` names the checkpoint in messages and in ``state.resumed_from``; a sharded one's shards are read from
    ``shards_at`` when given (a local download of a folder in a store, or the folder in the store itself, from
    which each rank fetches only the shard files its own plan reads), else from ``source``.
    """
    weights_only = weights_only or is_weights_only(checkpoint)
    checkpoint = drop_keys(checkpoint, ignore_keys)
    saved = {k: v for k, v in checkpoint["state"].items() if k != "metadata"}
    _check_restorable(saved, [] if weights_only else checkpoint.get("rng") or [], source)
    check_compatible(saved, state, weights_only=weights_only, strict=strict, source=source)
    if is_sharded(checkpoint):
        load_shards(shards_at or source, state, weights_only=weights_only, strict=strict)  # checks the fit first
    if weights_only:
        if "model" in saved:
            load_model_state(state.model, saved["model"], strict=strict)
        return
    if "optimizers" in saved:
        # optimizer.load_state_dict keeps the tensors it is given: left on the file's private mapping, the first
        # step would fault every page in copy-on-write, 4 KiB at a time, several times slower than one bulk copy
        # (read_checkpoint(for_resume=True) made these copies already, while the file was read: kept as they are)
        saved["optimizers"] = map_tensors(saved["optimizers"], _private_copy)
    try:
        state.load_state_dict(saved, strict=strict)
    except Exception as err:  # noqa: BLE001 - the checks above should leave none; if one slips through, say so plainly
        raise CheckpointCorruptError(f"{source!r} holds state cairn cannot restore ({err}); load another") from err
    _restore_rng(checkpoint.get("rng") or [], state)
    state.resumed_from = source


def _restore_rng(ranks: list[Any], state: State) -> None:
    """This rank's saved generators; a rank the checkpoint has none for (it was saved on fewer ranks) is seeded
    afresh, from the run's seed, its position and its rank, so no two ranks draw the same numbers."""
    if not ranks:
        return
    rank = get_rank()
    if rank < len(ranks):
        load_rng_state(ranks[rank])
        return
    seed_all(joining_rank_seed(state.rank_zero_seed, int(state.timestamp.batch), rank))
    log.info("rank %d was not in the run that saved this checkpoint: its generators are seeded afresh", rank)


def _check_restorable(saved: dict[str, Any], ranks: list[Any], source: str) -> None:
    """Every entry has the type its loader expects, so restoring cannot fail half-way through."""
    try:
        _check_types(saved)
        for rank_state in ranks:
            check_rng_state(rank_state)
        position = saved.get("dataset_state", {})
        if EPOCH_START_RNG in position:
            check_rng_state(position[EPOCH_START_RNG])
        for key in (EPOCH_START_GENERATORS, GENERATORS):  # the data loader's own generators (trainer.dataloader)
            check_generator_states(position.get(key, {}))
        loaders = position.get(LOADER_STATES, [])  # each rank's loader state, or None; trainer.dataloader reads them
        _require(isinstance(loaders, list) and all(v is None or isinstance(v, dict) for v in loaders), "loader states")
        _require(isinstance(position.get(EPOCH_SPLIT, {}), dict), "the epoch's split must be a dict")
    except (TypeError, ValueError) as err:
        raise CheckpointCorruptError(f"{source!r} holds malformed state ({err}); load another checkpoint") from None


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise TypeError(what)


def _check_types(saved: dict[str, Any]) -> None:
    _require(all(isinstance(v, torch.Tensor) for v in saved.get("model", {}).values()), "model values must be tensors")
    for key in ("optimizers", "schedulers", "algorithms", "callbacks"):
        entries = saved.get(key, {})
        _require(isinstance(entries, dict) and all(isinstance(v, dict) for v in entries.values()), f"{key} entries")
    for key, optimizer in saved.get("optimizers", {}).items():
        _check_optimizer_types(key, optimizer)
    _require(isinstance(saved.get("scaler", {}), dict), "scaler must be a dict")
    if "timestamp" in saved:
        Timestamp.from_state_dict(saved["timestamp"])
    seed = saved.get("rank_zero_seed", 0)
    _require(isinstance(seed, int) and not isinstance(seed, bool), "rank_zero_seed must be an int")
    _require(isinstance(saved.get("run_name", ""), str), "run_name must be a string")
    _require(isinstance(saved.get("dataset_state", {}), dict), "dataset_state must be a dict")
    _require(isinstance(saved.get("eval_metrics", {}), dict), "eval_metrics must be a dict of labels")
    metric_groups = [saved.get("train_metrics", {}), *saved.get("eval_metrics", {}).values()]
    for metrics in metric_groups:
        _require(isinstance(metrics, dict), "metrics must be dicts")
        for metric in metrics.values():
            _require(isinstance(metric, dict), "a metric's state must be a dict")
            for name, value in metric.items():
                tensors = value if isinstance(value, list) else [value]
                ok = (
                    isinstance(value, int)
                    if name == "_update_count"
                    else all(isinstance(t, torch.Tensor) for t in tensors)
                )
                _require(ok, f"metric state {name!r} has the wrong type")


def _check_optimizer_types(key: str, saved: dict[str, Any]) -> None:
    """The shape torch's ``Optimizer.load_state_dict`` relies on without checking: groups of parameter ids
    (positions, or names under FSDP), per-parameter state keyed by those ids, and one kind of value per state
    name (a tensor for every parameter's ``exp_avg``, not a number for one of them)."""
    groups, per_parameter = saved.get("param_groups"), saved.get("state", {})
    _require(isinstance(groups, list) and all(isinstance(g, dict) for g in groups), f"optimizer {key} param_groups")
    ids = [i for group in groups for i in (group.get("params") if isinstance(group.get("params"), list) else [None])]
    ids_ok = all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids)  # str: names, under FSDP
    _require(ids_ok, f"optimizer {key} parameter ids")
    _require(isinstance(per_parameter, dict) and set(per_parameter) <= set(ids), f"optimizer {key} state keys")
    kinds: dict[str, set[type]] = {}
    for values in per_parameter.values():
        _require(isinstance(values, dict) and all(isinstance(k, str) for k in values), f"optimizer {key} state")
        for name, value in values.items():
            kinds.setdefault(name, set()).add(torch.Tensor if isinstance(value, torch.Tensor) else type(value))
    mixed = sorted(name for name, found in kinds.items() if len(found) > 1)
    _require(not mixed, f"optimizer {key} state {mixed} holds different kinds of values for different parameters")
    for values in per_parameter.values():
        if "step" in values:
            _check_step(key, values["step"])


def _check_step(key: str, value: Any) -> None:
    """A parameter's ``step`` counts the steps taken: torch's optimizers feed it to powers and square roots, where a
    negative or non-finite count fails the first step with a raw RuntimeError (or makes the weights nan)."""
    number = _single_number(value)
    if number is None:
        raise TypeError(f"optimizer {key} step must be a number or a one-element tensor, not {_describe(value)}")
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"optimizer {key} step must be a finite count of at least 0, not {number!r}")


def _single_number(value: Any) -> float | None:
    """The value as a float, for a real number or a one-element real tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool or value.layout != torch.strided:
            return None
        try:
            return float(value.detach().reshape(()).item())
        except (RuntimeError, ValueError, TypeError, NotImplementedError):  # quantized, meta: no plain number
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return math.inf


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def load_checkpoint(
    path: str,
    state: State,
    *,
    weights_only: bool = False,
    strict: bool = True,
    ignore_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Read, verify and restore the checkpoint at ``path`` into ``state``; return what was read."""
    checkpoint = read_checkpoint(path, for_resume=not weights_only)
    apply_checkpoint(checkpoint, state, source=path, weights_only=weights_only, strict=strict, ignore_keys=ignore_keys)
    log.info("loaded checkpoint %s at %s", path, checkpoint["state"].get("timestamp", {}))
    return checkpoint
