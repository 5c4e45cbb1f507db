"""The file format both halves agree on: its version, its kinds, and the content hash that vouches for it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import xxhash

from cairn.checkpoint.keys import IgnoreKeys, drop
from cairn.checkpoint.tree import CONTAINERS, children

__all__ = [
    "FORMAT_VERSION",
    "HASH_NAME",
    "MAX_DEPTH",
    "content_hash",
    "drop_keys",
    "file_digest",
    "is_sharded",
    "is_weights_only",
    "raw_bytes",
]


#: The version of the layout ``state/metadata/format_version`` records; a reader refuses a newer one.
FORMAT_VERSION = 1
#: Prefixes every content hash (``xxh3-128:<hex>``), so that a future change of hash reads as such, not as damage.
HASH_NAME = "xxh3-128"


def is_sharded(checkpoint: dict[str, Any]) -> bool:
    return bool(checkpoint["state"].get("metadata", {}).get("sharded"))


def is_weights_only(checkpoint: dict[str, Any]) -> bool:
    return bool(checkpoint["state"].get("metadata", {}).get("weights_only")) or set(checkpoint["state"]) <= {
        "model",
        "metadata",
    }


def file_digest(path: str) -> str:
    """``xxh3-128:<hex>`` of a file's bytes: how a sharded folder's shards, which DCP writes, are vouched for."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return f"{HASH_NAME}:{digest.hexdigest()}"


def content_hash(checkpoint: dict[str, Any]) -> str:
    """``xxh3-128:<hex>`` over every leaf's path, type and value (tensors by dtype, shape and raw bytes).

    The hash guards against damage (a flipped bit, a truncated copy, a bad transfer), not against forgery: anyone
    who can rewrite the file can rewrite its hash, whatever the algorithm, so a cryptographic hash would buy
    nothing here. XXH3 runs at memory speed (about 20 GiB/s on one core, against under 2 for SHA-256), so checking
    a checkpoint costs a small fraction of reading or writing it.

    It is a function of the data alone: a set is hashed by its members in a canonical order (its iteration order
    changes with ``PYTHONHASHSEED``), so a checkpoint verifies in every process, not only in the one that wrote it.
    """
    digest = xxhash.xxh3_128()
    for chunk in _encoding(_without_hash(checkpoint)):
        digest.update(chunk)
    return f"{HASH_NAME}:{digest.hexdigest()}"


MAX_DEPTH = 200  # far deeper than any state dict; deeper nesting is refused rather than exhausting Python's stack


def _encoding(root: Any) -> Iterator[bytes | memoryview]:
    """The bytes the hash covers: each node's ``/``-path, then its type and value, depth first.

    The walk keeps its own stack rather than recursing through :func:`~cairn.checkpoint.tree.map_tree`, so nesting
    costs no recursion and its depth is bounded by :data:`MAX_DEPTH` (a hostile file cannot exhaust Python's
    stack), and it meets each node with one loop step rather than a call per node, on the path of every save and
    load. What a container is, and how its children's paths are spelled, it takes from :mod:`cairn.checkpoint.tree`,
    with dict keys spelled by :func:`_key_text`. A container met a second time (pickle keeps sharing, so writer and
    reader meet the same ones) is covered as a reference to where it was first met, so the walk is linear in the
    number of objects, not in the size of the tree they unfold to.
    """
    first_met: dict[int, str] = {}
    pending: list[tuple[str, Any, int]] = [("", root, 0)]
    while pending:
        path, value, depth = pending.pop()
        yield path.encode()
        if not isinstance(value, CONTAINERS):
            yield from _leaf(value)
            continue
        if value and id(value) in first_met:  # an empty one may be a shared singleton: it has nothing to unfold
            yield f"|ref|{first_met[id(value)]!r}|".encode()
            continue
        if depth >= MAX_DEPTH:
            raise ValueError(f"it nests containers more than {MAX_DEPTH} deep, at {path[:60]!r}...")
        first_met[id(value)] = path
        yield from _leaf(f"{'dict' if isinstance(value, dict) else type(value).__name__}[{len(value)}]")
        pending.extend(reversed([(child, item, depth + 1) for _, child, item in children(value, path, _key_text)]))


def _leaf(value: Any) -> Iterator[bytes | memoryview]:
    if isinstance(value, torch.Tensor):
        yield f"|tensor|{value.dtype}|{tuple(value.shape)}|".encode()
        yield raw_bytes(value)
    elif isinstance(value, (set, frozenset)):
        yield f"|{type(value).__name__}|{len(value)}|{'|'.join(sorted(map(_member_digest, value)))}|".encode()
    else:
        yield f"|{type(value).__name__}|{value!r}|".encode()


def _member_digest(value: Any) -> str:
    """A set member's own hash: sorting these gives a set one order, whatever the hash seed."""
    digest = xxhash.xxh3_128()
    for chunk in _encoding(value):
        digest.update(chunk)
    return digest.hexdigest()


def _key_text(key: Any) -> str:
    """A dict key as it appears in a path; a key holding a frozenset, whose text varies with the hash seed, by
    its canonical digest instead."""
    return f"<{type(key).__name__} {_member_digest(key)}>" if _holds_a_set(key) else str(key)


def _holds_a_set(key: Any) -> bool:
    pending = [key]
    while pending:
        item = pending.pop()
        if isinstance(item, frozenset):
            return True
        if isinstance(item, tuple):
            pending.extend(item)
    return False


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in memory order, without a copy where it is already packed."""
    tensor = tensor.detach()
    if not tensor.numel():
        return memoryview(b"")
    flat = tensor.cpu().reshape(-1)
    if flat.stride(0) != 1:  # a strided view (even of one element) must be packed before reading bytes
        flat = flat.clone(memory_format=torch.contiguous_format)
    return memoryview(flat.view(torch.uint8).numpy())


def _without_hash(checkpoint: dict[str, Any]) -> dict[str, Any]:
    state = checkpoint.get("state")
    if not isinstance(state, dict) or not isinstance(state.get("metadata"), dict):
        return checkpoint
    metadata = {k: v for k, v in state["metadata"].items() if k != "content_hash"}
    return {**checkpoint, "state": {**state, "metadata": metadata}}


def drop_keys(checkpoint: dict[str, Any], patterns: IgnoreKeys | Sequence[str]) -> dict[str, Any]:
    """A copy of ``checkpoint`` without the entries whose ``/``-path matches a glob (``state/optimizers``), or the
    checkpoint as a ``load_ignore_keys`` callable edited it (see :mod:`cairn.checkpoint.keys`)."""
    return drop(checkpoint, patterns)
