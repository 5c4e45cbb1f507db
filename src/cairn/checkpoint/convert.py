"""Turning one kind of checkpoint into another, offline and in one process."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from cairn.checkpoint.commit import write_checkpoint
from cairn.checkpoint.content import content_hash, is_sharded
from cairn.checkpoint.loader import read_checkpoint
from cairn.checkpoint.sharded import is_sharded_folder, write_sharded_folder

__all__ = ["FORMATS", "convert"]

FORMATS = ("single-file", "weights-only", "sharded")


def convert(source: str, target_format: str, out: str) -> str:
    """Write ``source`` (a file or a sharded folder) as ``target_format`` to ``out``; the source is not changed."""
    if target_format not in FORMATS:
        raise ValueError(f"--to {target_format!r}: use one of {', '.join(FORMATS)}")
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose another output path or remove it first")
    checkpoint = read_checkpoint(source)  # verified, safe
    if target_format == "sharded":
        if is_sharded(checkpoint):
            raise ValueError(f"{source} is already a sharded checkpoint; copy the folder instead")
        tensors, rest = _split_for_shards(checkpoint)
        write_sharded_folder(tensors, rest, out)
        return out
    if is_sharded(checkpoint):
        checkpoint = _gathered(source, checkpoint)
    if target_format == "weights-only":
        metadata = {**checkpoint["state"]["metadata"], "weights_only": True}
        checkpoint = {"state": {"model": checkpoint["state"]["model"], "metadata": metadata}}
    _rehash(checkpoint)
    write_checkpoint(checkpoint, out)
    return out


def _gathered(folder: str, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A sharded folder's tensors joined into full ones, put back in the order a single file keeps its keys."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not is_sharded_folder(folder):
        raise ValueError(f"{folder} is not a sharded checkpoint folder")
    with tempfile.TemporaryDirectory(prefix="cairn-convert-") as scratch:
        joined = os.path.join(scratch, "joined.pt")
        dcp_to_torch_save(folder, joined)
        tensors = torch.load(joined, map_location="cpu", weights_only=True)
    state = {"model": tensors["model"]}
    if "optimizers" in tensors:
        state["optimizers"] = tensors["optimizers"]
    state.update(checkpoint["state"])
    state["metadata"] = {**checkpoint["state"]["metadata"], "sharded": False}
    return {**checkpoint, "state": state}


def _split_for_shards(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A single file's model and optimizers as DCP stores them (optimizer state keyed by parameter name), and the
    rest as the folder's ``cairn.pt``."""
    state = dict(checkpoint["state"])
    tensors: dict[str, Any] = {"model": state.pop("model")}
    names = state["metadata"].get("parameter_names") or {}
    if "optimizers" in state:
        saved = state.pop("optimizers")
        tensors["optimizers"] = {key: _keyed_by_name(key, value, names.get(key)) for key, value in saved.items()}
    state["metadata"] = {**state["metadata"], "sharded": True}
    rest = {**checkpoint, "state": state}
    _rehash(rest)
    return tensors, rest


def _keyed_by_name(key: str, optimizer: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """``optimizer.state_dict()`` numbers parameters; shards name them, so another world size can find them."""
    positions = [p for group in optimizer["param_groups"] for p in group["params"]]
    if all(isinstance(p, str) for p in positions):
        return optimizer  # already by name (FSDP full-state checkpoints)
    if names is None or len(names) != len(positions):
        raise ValueError(
            f"optimizer {key!r} in this checkpoint does not record its parameters' names (it was written by an "
            "older cairn); resume it in a run with state_dict_type='sharded' and let that run save, instead"
        )
    return {
        "state": {names[p]: value for p, value in optimizer["state"].items()},
        "param_groups": [
            {**group, "params": [names[p] for p in group["params"]]} for group in optimizer["param_groups"]
        ],
    }


def _rehash(checkpoint: dict[str, Any]) -> None:
    metadata = checkpoint["state"]["metadata"]
    metadata.pop("content_hash", None)
    metadata["content_hash"] = content_hash(checkpoint)
