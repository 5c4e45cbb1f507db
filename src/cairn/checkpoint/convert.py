"""Turning one kind of checkpoint into another, offline and in one process."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from cairn.checkpoint.commit import write_checkpoint
from cairn.checkpoint.content import content_hash, is_sharded
from cairn.checkpoint.loader import read_checkpoint
from cairn.checkpoint.sharded import is_sharded_folder

__all__ = ["FORMATS", "convert"]

FORMATS = ("single-file", "weights-only")


def convert(source: str, target_format: str, out: str) -> str:
    """Write ``source`` (a file or a sharded folder) as ``target_format`` to ``out``; the source is not changed."""
    if target_format not in FORMATS:
        raise ValueError(f"--to {target_format!r}: use one of {', '.join(FORMATS)}")
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists; choose another output path or remove it first")
    checkpoint = read_checkpoint(source)  # verified, safe
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


def _rehash(checkpoint: dict[str, Any]) -> None:
    metadata = checkpoint["state"]["metadata"]
    metadata.pop("content_hash", None)
    metadata["content_hash"] = content_hash(checkpoint)
