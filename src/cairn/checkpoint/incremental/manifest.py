"""An incremental checkpoint: a small manifest that names its large tensors' bytes by content, chunk by chunk.

The manifest is an ordinary cairn checkpoint file (a ``torch.save`` archive of plain data, with the usual ``state``,
``rng`` and metadata) in which every tensor of at least :data:`INLINE_BYTES` is replaced by a marker string, and one
more top-level entry lists those tensors::

    {"state": {..., "model": {"body.weight": "cairn-chunked-tensor:0", "head.bias": tensor(...)}, ...},
     "rng": [...],
     "chunks": {"hash": "xxh3-128", "folder": ".cairn-chunks",
                "tensors": [{"path": "state/model/body.weight", "dtype": "float32", "shape": [4096, 4096],
                             "chunks": [["<32 hex digits>", 8388608], ...]}]}}

A tensor's bytes are cut at fixed offsets into chunks of :data:`CHUNK_BYTES` (the last one shorter); each chunk is
stored once, in the chunk folder, under the XXH3-128 of its bytes. A tensor that did not change maps to the same
chunks as before, so a save writes only the chunks the folder lacks. Fixed offsets suit tensors: a tensor does not
shift its bytes the way an edited text does, and its size is fixed for the run.

What vouches for what: the manifest's content hash (metadata, as in every checkpoint) covers its structure, its
small tensors and every chunk's key and size; each chunk is checked against its key as it is read. Together they
cover every byte of the checkpoint a reader gets, with no second pass over the data.

``folder`` is where the chunks are, relative to the manifest's own folder: ``.cairn-chunks`` in the saver's folder,
``../.cairn-chunks`` for a manifest one folder down (a ``filename`` with a folder in it). Only that form is
accepted from a file, and a key is exactly 32 hex digits, so a hostile manifest cannot name a path of its choosing.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from cairn.checkpoint.format import HASH_NAME, raw_bytes
from cairn.checkpoint.tree import map_tree
from cairn.errors import CheckpointCorruptError
from cairn.names import CHUNK_FOLDER

__all__ = [
    "CHUNK_BYTES",
    "INLINE_BYTES",
    "ChunkRef",
    "ChunkedTensor",
    "Piece",
    "UnreadableManifest",
    "assembled_bytes",
    "chunk_key",
    "chunked_tensors",
    "is_manifest",
    "manifest_chunk_folder",
    "split",
    "without_chunks",
]

#: Bytes per chunk. Measured in ``benchmarks/chunk_size.py`` (docs/performance.md): smaller chunks buy finer reuse
#: but cost a file (and a request in a store) each; at 8 MiB a save of everything runs at the disk's speed.
CHUNK_BYTES = 8 << 20
#: Tensors smaller than this stay inside the manifest: biases and norms would otherwise each cost a file.
INLINE_BYTES = 64 << 10
MARKER_PREFIX = "cairn-chunked-tensor:"
_KEY = re.compile(r"[0-9a-f]{32}\Z")
_FOLDER = re.compile(r"(\.\./){0,64}" + re.escape(CHUNK_FOLDER) + r"\Z")
_MAX_CHUNK = 1 << 30  # no writer makes a chunk larger; a manifest that says so is refused before anything is read

#: The dtypes a chunked tensor may have: plain numbers, whose bytes are all there is to them.
_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex128, torch.complex64,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        *(getattr(torch, name) for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
          if hasattr(torch, name)),
    )
}  # fmt: skip


class UnreadableManifest(Exception):
    """A file that may be a manifest (a torch archive) could not be read: which chunks it names is unknown."""


@dataclass(frozen=True)
class ChunkRef:
    key: str
    size: int


@dataclass(frozen=True)
class ChunkedTensor:
    """One tensor of a manifest, as recorded: where it goes, what it is, and its chunks in order."""

    index: int
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[ChunkRef, ...]

    @property
    def nbytes(self) -> int:
        return sum(chunk.size for chunk in self.chunks)


@dataclass(frozen=True)
class Piece:
    """A chunk to store: its key and a view of its bytes (in the tensor's own memory, not a copy)."""

    key: str
    data: memoryview


def chunk_key(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def is_manifest(checkpoint: Any) -> bool:
    return isinstance(checkpoint, dict) and "chunks" in checkpoint


def split(checkpoint: dict[str, Any], *, folder: str) -> tuple[dict[str, Any], list[Piece]]:
    """The manifest of ``checkpoint`` (CPU tensors; the hash not yet stamped) and the chunks it names.

    ``folder`` is the chunk folder relative to the manifest's folder. The same chunk may appear more than once
    (two equal tensors, a tensor of zeros); whoever stores them writes each key once.
    """
    records: list[dict[str, Any]] = []
    pieces: list[Piece] = []

    def replace(path: str, leaf: Any) -> Any:
        if not _chunkable(leaf):
            return leaf
        data = raw_bytes(leaf)
        cut = [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
        keys = [chunk_key(piece) for piece in cut]
        pieces.extend(Piece(key, piece) for key, piece in zip(keys, cut, strict=True))
        index = len(records)
        records.append(
            {
                "path": path,
                "dtype": str(leaf.dtype).removeprefix("torch."),
                "shape": list(leaf.shape),
                "chunks": [[key, len(piece)] for key, piece in zip(keys, cut, strict=True)],
            }
        )
        return f"{MARKER_PREFIX}{index}"

    body = map_tree({key: value for key, value in checkpoint.items() if key != "chunks"}, replace)
    body["state"]["metadata"] = {**body["state"]["metadata"], "incremental": True}
    body["chunks"] = {"hash": HASH_NAME, "folder": folder, "tensors": records}
    return body, pieces


def _chunkable(leaf: Any) -> bool:
    return (
        type(leaf) is torch.Tensor
        and leaf.layout == torch.strided
        and not leaf.is_quantized
        and leaf.device.type == "cpu"
        and str(leaf.dtype).removeprefix("torch.") in _DTYPES
        and leaf.numel() * leaf.element_size() >= INLINE_BYTES
    )


def chunked_tensors(manifest: dict[str, Any], source: str) -> list[ChunkedTensor]:
    """The manifest's chunked tensors, each checked as data from a file that may be hostile: a known dtype, a
    shape whose bytes are exactly its chunks' sizes, keys of 32 hex digits. ``source`` names the file in errors."""
    record = manifest.get("chunks")
    if not isinstance(record, dict) or not isinstance(record.get("tensors"), list):
        raise _damaged(source, "its 'chunks' entry is not a dict with a list of tensors")
    if record.get("hash") != HASH_NAME:
        raise _damaged(source, f"its chunks are keyed by {_text(record.get('hash'))}, not {HASH_NAME}")
    return [_tensor(index, entry, source) for index, entry in enumerate(record["tensors"])]


def manifest_chunk_folder(manifest: dict[str, Any], manifest_path: str) -> str:
    """The chunk folder a manifest at ``manifest_path`` names (a local path, or a ``/``-separated store name)."""
    record = manifest.get("chunks")
    folder = record.get("folder") if isinstance(record, dict) else None
    if not isinstance(folder, str) or not _FOLDER.match(folder):
        raise _damaged(manifest_path, f"its chunk folder {_text(folder)} is not {CHUNK_FOLDER!r} or '../' above it")
    return posixpath.normpath(posixpath.join(posixpath.dirname(manifest_path) or ".", folder))


def assembled_bytes(tensors: list[ChunkedTensor]) -> int:
    return sum(tensor.nbytes for tensor in tensors)


def without_chunks(
    manifest: dict[str, Any], recorded: list[ChunkedTensor], tensors: dict[int, torch.Tensor], source: str
) -> dict[str, Any]:
    """The checkpoint the manifest stands for: each marker replaced by its tensor (``tensors`` by index, as
    ``recorded`` lists them), the ``chunks`` entry and the ``incremental`` flag gone. A marker at a path the
    manifest does not record for it, or a recorded tensor whose marker is missing, is damage."""
    expected = {(tensor.index, tensor.path) for tensor in recorded}
    placed: set[int] = set()

    def restore(path: str, leaf: Any) -> Any:
        if not (isinstance(leaf, str) and leaf.startswith(MARKER_PREFIX)):
            return leaf
        index = _marker_index(leaf)
        if index is None or (index, path) not in expected or index in placed:
            return leaf  # a string of the user's that merely looks like a marker
        placed.add(index)
        return tensors[index]

    body = map_tree({key: value for key, value in manifest.items() if key != "chunks"}, restore)
    if len(placed) != len(expected):
        missing = sorted(path for index, path in expected if index not in placed)
        raise _damaged(source, f"its tensor {missing[0]!r} has no place in the state")
    metadata = body["state"]["metadata"]
    body["state"]["metadata"] = {key: value for key, value in metadata.items() if key != "incremental"}
    return body


def _marker_index(leaf: str) -> int | None:
    digits = leaf[len(MARKER_PREFIX) :]
    return int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 10 else None


def _tensor(index: int, entry: Any, source: str) -> ChunkedTensor:
    where = f"its chunked tensor #{index}"
    if not isinstance(entry, dict):
        raise _damaged(source, f"{where} is not a dict")
    path, dtype_name, shape, chunks = (entry.get(key) for key in ("path", "dtype", "shape", "chunks"))
    if not isinstance(path, str):
        raise _damaged(source, f"{where} has no path")
    dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise _damaged(source, f"{where} ({path[:80]!r}) has the dtype {_text(dtype_name)}, not a plain number type")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_count(n) for n in shape):
        raise _damaged(source, f"{where} ({path[:80]!r}) has no valid shape")
    if not isinstance(chunks, list) or not all(_is_ref(chunk) for chunk in chunks):
        raise _damaged(source, f"{where} ({path[:80]!r}) lists chunks that are not [32 hex digits, size] pairs")
    refs = tuple(ChunkRef(key, size) for key, size in chunks)
    element = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * element != sum(ref.size for ref in refs):
        raise _damaged(source, f"{where} ({path[:80]!r}): its shape {shape} does not match its chunks' sizes")
    return ChunkedTensor(index, path, dtype, tuple(shape), refs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**48


def _is_ref(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and _KEY.match(value[0]) is not None
        and _is_count(value[1])
        and 0 < value[1] <= _MAX_CHUNK
    )


def _text(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else f"a {type(value).__name__}"


def _damaged(source: str, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{source!r} is a damaged incremental checkpoint: {why}; load an earlier checkpoint")
