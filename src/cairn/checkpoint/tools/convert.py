"""Turning one kind of checkpoint into another, offline and in one process.

Forms: ``single-file`` (everything in one file), ``weights-only`` (the model and metadata), ``sharded`` (a folder of
DCP shards, :mod:`~cairn.checkpoint.save.sharded`), and ``safetensors`` (the model's tensors for other tools, with
``pip install 'cairn[safetensors]'``). Every output is written through
:func:`~cairn.checkpoint.save.commit.atomic_write`.

An incremental checkpoint (a manifest and its chunks) is read whole, every chunk checked against its key, so any
form can be written from it; ``single-file`` makes a self-contained copy: an ordinary checkpoint, with no chunk
folder needed anywhere and a content hash over all of its data.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch

from cairn.atomic import atomic_write
from cairn.checkpoint.format import content_hash, is_sharded
from cairn.checkpoint.incremental.files import ChunkSource
from cairn.checkpoint.load.loader import read_checkpoint
from cairn.checkpoint.load.sharded import read_whole_shards
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.sharded import write_sharded_folder
from cairn.checkpoint.shards import is_sharded_folder

__all__ = ["FORMATS", "check_output", "convert"]

FORMATS = ("single-file", "weights-only", "sharded", "safetensors")


def convert(source: str, target_format: str, out: str, *, chunks: ChunkSource | None = None) -> str:
    """Write ``source`` (a file, a manifest or a sharded folder) as ``target_format`` to ``out``; the source is not
    changed. A manifest's chunks come from ``chunks``, else from the chunk folder it names beside it.

    ``out`` must not exist; folders above it that do not exist are created, and removed again if the conversion
    fails, so that a failure leaves nothing behind. Returns the path written (``out`` without a trailing slash).
    """
    if target_format not in FORMATS:
        raise ValueError(f"--to {target_format!r}: use one of {', '.join(FORMATS)}")
    out = check_output(out, target_format)
    checkpoint = read_checkpoint(source, chunks=chunks)  # verified, safe; a manifest comes back whole
    created = _missing_folders(os.path.dirname(out))
    try:
        _write(source, checkpoint, target_format, out)
    except FileExistsError:  # it appeared while the conversion ran
        raise FileExistsError(f"{out} appeared while it was being written; choose another output path") from None
    except BaseException:
        for folder in created:  # deepest first; one that something else wrote into stays
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    return out


def check_output(out: str, target_format: str) -> str:
    """``out`` as the path to write, refused (before anything is read or written) when something is there already,
    a dangling symlink included, or when a trailing slash names a folder for a form that is one file."""
    if os.path.lexists(out):
        if os.path.islink(out):
            raise FileExistsError(
                f"{out} is a symlink (to {os.readlink(out)}); remove it or choose another output path"
            )
        raise FileExistsError(f"{out} already exists; choose another output path or remove it first")
    if out.endswith(("/", os.sep)):
        if target_format != "sharded":
            raise ValueError(
                f"{out} ends with a slash, which names a folder, but --to {target_format} writes one file: give its "
                "name (for example model.pt), not a folder"
            )
        out = out.rstrip("/" + os.sep) or out
        if os.path.lexists(out):
            return check_output(out, target_format)
    return out


def _missing_folders(folder: str) -> list[str]:
    """The folders on the way to ``folder`` that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _write(source: str, checkpoint: dict[str, Any], target_format: str, out: str) -> None:
    if target_format == "safetensors":
        _write_safetensors(source, checkpoint, out)
        return
    if target_format == "sharded":
        if is_sharded(checkpoint):
            raise ValueError(f"{source} is already a sharded checkpoint; copy the folder instead")
        _refuse_quantized_shards(checkpoint["state"]["model"])
        tensors, rest = _split_for_shards(checkpoint)
        write_sharded_folder(tensors, rest, out)
        return
    if is_sharded(checkpoint):
        checkpoint = _gathered(source, checkpoint)
    if target_format == "weights-only":
        metadata = {**checkpoint["state"]["metadata"], "weights_only": True}
        checkpoint = {"state": {"model": checkpoint["state"]["model"], "metadata": metadata}}
    _rehash(checkpoint)
    write_checkpoint(checkpoint, out)


def _write_safetensors(source: str, checkpoint: dict[str, Any], out: str) -> None:
    """The model's tensors as a safetensors file; small facts (run name, timestamp, versions) go in its header.

    safetensors stores only tensors, each with storage of its own: tensors that share memory (tied weights) are
    written as separate copies, and a view is written as the part it sees.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ValueError("--to safetensors needs the safetensors package: pip install 'cairn[safetensors]'") from None
    if is_sharded(checkpoint):
        model = read_whole_shards(source)["model"]
    else:
        model = checkpoint["state"]["model"]
    _require_safetensors_dtypes(model)
    tensors = _unshared(model)
    header = _safetensors_header(checkpoint)
    atomic_write(out, lambda temporary: save_file(tensors, temporary, metadata=header), overwrite=False)


def _refuse_quantized_shards(model: dict[str, torch.Tensor]) -> None:
    """DCP writes a quantized tensor's values but not its scale and zero point, and cannot read it back."""
    for name, tensor in model.items():
        if tensor.is_quantized:
            raise ValueError(
                f"model tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, which sharded folders cannot "
                "hold (DCP cannot load quantized tensors back); convert to single-file or weights-only instead"
            )


def _require_safetensors_dtypes(model: dict[str, torch.Tensor]) -> None:
    """safetensors stores plain dtypes only: a quantized tensor (``qint8``: its scale and zero point have no place in
    the format) is refused by name, before anything is written, rather than failing inside safetensors."""
    import safetensors.torch

    known = set(getattr(safetensors.torch, "_TYPES", {}).values())  # the dtypes this safetensors version writes
    for name, tensor in model.items():
        if tensor.is_quantized or (known and tensor.dtype not in known):
            raise ValueError(
                f"model tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, which safetensors cannot "
                "store; convert to single-file or weights-only instead, or dequantize it in your model first"
            )


def _unshared(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing memory with another (safetensors refuses shared storage)."""
    seen: set[int] = set()
    tensors = {}
    for name, tensor in model.items():
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        shared = storage in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        seen.add(storage)
        tensors[name] = tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
    return tensors


def _safetensors_header(checkpoint: dict[str, Any]) -> dict[str, str]:
    """String metadata for the file's header: ``format: pt`` (what other tools look for), and cairn's facts."""
    state = checkpoint["state"]
    metadata = state["metadata"]
    header = {"format": "pt", "cairn_source_hash": str(metadata["content_hash"])}
    for key in ("cairn_version", "torch_version", "created_at", "world_size"):
        if key in metadata:
            header[key if key.startswith("cairn_") else f"cairn_{key}"] = str(metadata[key])
    if "run_name" in state:
        header["cairn_run_name"] = str(state["run_name"])
    if "timestamp" in state:
        header["cairn_timestamp"] = json.dumps(state["timestamp"], sort_keys=True)
    return header


def _gathered(folder: str, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A sharded folder's tensors joined into full ones, put back in the order a single file keeps its keys."""
    if not is_sharded_folder(folder):
        raise ValueError(f"{folder} is not a sharded checkpoint folder")
    tensors = read_whole_shards(folder)
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
