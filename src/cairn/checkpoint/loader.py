"""Reading a checkpoint back: safely (no code runs), verified (the hash must match), and checked before applied.

Every failure is one of :mod:`cairn.errors`' exceptions and happens before the state is touched, so a bad file
never leaves a run half-restored.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Sequence
from typing import Any

import torch

from cairn.checkpoint.compat import check_compatible
from cairn.checkpoint.content import content_hash, drop_keys, is_weights_only
from cairn.core.state import State, model_weights_module
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, UnsafeCheckpointError
from cairn.utils.reproducibility import load_rng_state

__all__ = ["apply_checkpoint", "load_checkpoint", "read_checkpoint"]

log = logging.getLogger(__name__)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load and verify the checkpoint at ``path`` without running any code from it."""
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"no checkpoint at {path!r}: check the path (and the working directory)")
    if os.path.isdir(path):
        raise CheckpointCorruptError(f"{path!r} is a folder, not a checkpoint file; name the .pt file inside it")
    checkpoint = _torch_load_safely(path)
    _check_structure(checkpoint, path)
    _check_hash(checkpoint, path)
    return checkpoint


def _torch_load_safely(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or zipfile.is_zipfile(path):
            raise UnsafeCheckpointError(
                f"{path!r} holds Python objects that would need code to run to load ({_first_reason(err)}); nothing "
                "was executed. cairn checkpoints hold only plain data: re-save it with cairn, or load it yourself "
                "with torch.load(weights_only=False) only if you trust its source"
            ) from None
        raise CheckpointCorruptError(
            f"{path!r} is not a checkpoint torch can read ({_first_reason(err)}); it may be damaged or another format"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointCorruptError(
            f"{path!r} is truncated or corrupt ({_first_reason(err)}); load an earlier checkpoint"
        ) from None


def _first_reason(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        lowered = line.lower()
        if "global" in lowered or "unsupported" in lowered or "failed" in lowered or "error" in lowered:
            return line[:200]
    return (lines[0] if lines else type(err).__name__)[:200]


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
    model = state.get("model")
    if not isinstance(model, dict) or not all(isinstance(k, str) for k in model):
        raise fail("'state/model' is not a dict of named tensors")
    if "rng" in checkpoint and not isinstance(checkpoint["rng"], list):
        raise fail("'rng' is not a list with one entry per rank")
    if "timestamp" in state and not isinstance(state["timestamp"], dict):
        raise fail("'state/timestamp' is not a dict")


def _check_hash(checkpoint: dict[str, Any], path: str) -> None:
    recorded = checkpoint["state"]["metadata"]["content_hash"]
    if content_hash(checkpoint) != recorded:
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
) -> None:
    """Restore a verified checkpoint into ``state``: check everything first, then change anything."""
    weights_only = weights_only or is_weights_only(checkpoint)
    checkpoint = drop_keys(checkpoint, ignore_keys)
    saved = {k: v for k, v in checkpoint["state"].items() if k != "metadata"}
    check_compatible(saved, state, weights_only=weights_only, strict=strict, source=source)
    if weights_only:
        if "model" in saved:
            model_weights_module(state.model).load_state_dict(saved["model"], strict=strict)
        return
    try:
        state.load_state_dict(saved, strict=strict)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointCorruptError(f"{source!r} holds state cairn cannot restore ({err}); load another") from err
    ranks = checkpoint.get("rng") or []
    if ranks:
        load_rng_state(ranks[0] if len(ranks) == 1 else ranks[min(_rank(), len(ranks) - 1)])
    state.resumed_from = source


def load_checkpoint(
    path: str,
    state: State,
    *,
    weights_only: bool = False,
    strict: bool = True,
    ignore_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Read, verify and restore the checkpoint at ``path`` into ``state``; return what was read."""
    checkpoint = read_checkpoint(path)
    apply_checkpoint(checkpoint, state, source=path, weights_only=weights_only, strict=strict, ignore_keys=ignore_keys)
    log.info("loaded checkpoint %s at %s", path, checkpoint["state"].get("timestamp", {}))
    return checkpoint


def _rank() -> int:
    return int(os.environ.get("RANK", 0))
