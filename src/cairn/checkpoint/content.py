"""What goes into a checkpoint: the state's plain data, every rank's RNG, and metadata that vouches for both.

The file is one nested dict a reader understands at a glance::

    {"state": {"model": ..., "optimizers": ..., ..., "integrations": ..., "metadata": {...}}, "rng": [rank 0, ...]}

A weights-only checkpoint is ``{"state": {"model": ..., "metadata": {...}}}``. The content hash covers everything
but the hash itself, so a flipped bit anywhere in the data is caught when the file is loaded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from cairn.core.state import State
from cairn.utils.dist import all_gather_object, get_world_size
from cairn.utils.reproducibility import rng_state

__all__ = [
    "FORMAT_VERSION",
    "build_checkpoint",
    "content_hash",
    "drop_keys",
    "is_weights_only",
]

FORMAT_VERSION = 1
_HASH_NAME = "sha256"


def build_checkpoint(
    state: State, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), sharded: bool = False
) -> dict[str, Any]:
    """The checkpoint of ``state`` right now, hashed and ready to write.

    In a distributed run every rank must call it: each rank's generators are gathered into ``rng``. ``sharded``
    leaves the model and optimizers out: they are written as shards beside this file.
    """
    if weights_only:
        checkpoint: dict[str, Any] = {"state": {} if sharded else {"model": state.state_dict()["model"]}}
    else:
        checkpoint = {"state": state.state_dict(tensors=not sharded), "rng": all_gather_object(rng_state())}
    checkpoint = _on_cpu(drop_keys(checkpoint, ignore_keys))
    checkpoint["state"]["metadata"] = {**_metadata(get_world_size(), weights_only), "sharded": sharded}
    checkpoint["state"]["metadata"]["content_hash"] = content_hash(checkpoint)
    return checkpoint


def _on_cpu(node: Any) -> Any:
    """Files hold CPU tensors, so a checkpoint from a GPU run opens on any machine with plain ``torch.load``."""
    if isinstance(node, torch.Tensor):
        return node.detach().cpu() if node.device.type != "cpu" else node
    if isinstance(node, dict):
        return {key: _on_cpu(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_on_cpu(value) for value in node]
    if isinstance(node, tuple):
        return tuple(_on_cpu(value) for value in node)
    return node


def is_sharded(checkpoint: dict[str, Any]) -> bool:
    return bool(checkpoint["state"].get("metadata", {}).get("sharded"))


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    return bool(checkpoint["state"].get("metadata", {}).get("weights_only")) or set(checkpoint["state"]) <= {
        "model",
        "metadata",
    }


def _metadata(world_size: int, weights_only: bool) -> dict[str, Any]:
    from cairn import __version__

    return {
        "format_version": FORMAT_VERSION,
        "cairn_version": str(__version__),
        "torch_version": str(torch.__version__),
        "world_size": world_size,
        "created_at": time.time(),
        "weights_only": weights_only,
    }


def content_hash(checkpoint: dict[str, Any]) -> str:
    """``sha256:<hex>`` over every leaf's path, type and value (tensors by dtype, shape and raw bytes)."""
    digest = hashlib.new(_HASH_NAME)
    for path, value in _leaves(_without_hash(checkpoint), ""):
        digest.update(path.encode())
        _hash_value(digest, value)
    return f"{_HASH_NAME}:{digest.hexdigest()}"


def _without_hash(checkpoint: dict[str, Any]) -> dict[str, Any]:
    state = checkpoint.get("state")
    if not isinstance(state, dict) or not isinstance(state.get("metadata"), dict):
        return checkpoint
    metadata = {k: v for k, v in state["metadata"].items() if k != "content_hash"}
    return {**checkpoint, "state": {**state, "metadata": metadata}}


def _hash_value(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        digest.update(f"|tensor|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            flat = tensor.cpu().reshape(-1)
            if flat.stride(0) != 1:  # a strided view (even of one element) must be packed before reading bytes
                flat = flat.clone(memory_format=torch.contiguous_format)
            digest.update(memoryview(flat.view(torch.uint8).numpy()))
    else:
        digest.update(f"|{type(value).__name__}|{value!r}|".encode())


def _leaves(value: Any, path: str) -> Iterable[tuple[str, Any]]:
    """Depth-first leaves of nested dicts, lists and tuples, each with a ``/``-joined path."""
    if isinstance(value, dict):
        yield path, f"dict[{len(value)}]"
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        yield path, f"{type(value).__name__}[{len(value)}]"
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}/{index}")
    else:
        yield path, value


def drop_keys(checkpoint: dict[str, Any], patterns: Sequence[str]) -> dict[str, Any]:
    """A copy of ``checkpoint`` without the entries whose ``/``-path matches a glob (``state/optimizers``)."""
    if not patterns:
        return checkpoint
    return _without(checkpoint, "", tuple(patterns))


def _without(node: Any, path: str, patterns: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    kept = {}
    for key, item in node.items():
        child = f"{path}/{key}" if path else str(key)
        if any(fnmatch.fnmatchcase(child, pattern) for pattern in patterns):
            continue
        kept[key] = _without(item, child, patterns)
    return kept
