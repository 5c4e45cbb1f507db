"""Reading a sharded folder's DCP index (``.metadata``) and byte entries without trusting them.

``torch.distributed.checkpoint`` reads ``.metadata`` with plain ``pickle.load`` and unpickles non-tensor entries
(an optimizer's learning rate, its betas) with ``torch.load(weights_only=False)``: a folder from elsewhere could
run code on load, and DCP keeps no checksum. So cairn reads the index itself, with an unpickler that knows only
DCP's own metadata classes, checks that every shard it names is a regular file inside the folder holding the bytes
it promises, loads byte entries as plain data, and compares every file with the digest ``cairn.pt`` recorded.
"""

from __future__ import annotations

# torch.distributed.checkpoint takes most of a second to import: import this module only where shards are read.
import io
import os
import pickle
import stat
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from cairn.checkpoint.content import file_digest
from cairn.checkpoint.loader import error_reason, needs_code
from cairn.checkpoint.sharded import METADATA_FILE
from cairn.errors import CheckpointCorruptError, UnsafeCheckpointError

__all__ = [
    "INDEX_FILE",
    "SafeLoadPlanner",
    "SafeReader",
    "SafeWholeLoadPlanner",
    "read_shard_index",
    "verify_shard_digests",
]

INDEX_FILE = ".metadata"

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _IndexUnpickler(pickle.Unpickler):
    """Admits DCP's metadata classes and torch's dtype, layout and memory-format constants; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        constant = getattr(torch, name, None) if module == "torch" else None
        if isinstance(constant, (torch.dtype, torch.layout, torch.memory_format)):
            return constant
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_shard_index(folder: str) -> Metadata:
    """The folder's DCP ``Metadata``, unpickled without running code and checked against the files beside it."""
    _require_regular_file(os.path.join(folder, METADATA_FILE), folder)
    path = os.path.join(folder, INDEX_FILE)
    _require_regular_file(path, folder)
    try:
        with open(path, "rb") as file:
            index = _IndexUnpickler(file).load()
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path!r} names {err}, which is not part of a shard index: loading it would run code, and nothing "
            "was executed; this folder was not written by cairn or torch.distributed.checkpoint, so do not trust it"
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle can surface as almost any exception
        raise CheckpointCorruptError(
            f"{path!r} is truncated or corrupt ({err!s:.200}); load an earlier checkpoint"
        ) from None
    if not isinstance(index, Metadata) or not isinstance(index.storage_data, dict):
        raise CheckpointCorruptError(f"{path!r} is not a shard index; load an earlier checkpoint")
    if getattr(index, "storage_meta", None) is None:
        index.storage_meta = StorageMeta()
    _check_storage(index.storage_data, folder)
    _check_byte_entries(index, folder)
    return index


def verify_shard_digests(folder: str, index: Metadata, digests: Any) -> None:
    """Every file of the folder's index holds the bytes ``cairn.pt`` recorded when the folder was written."""
    if not isinstance(digests, dict) or INDEX_FILE not in digests:
        raise CheckpointCorruptError(
            f"{os.path.join(folder, METADATA_FILE)!r} records no digests of its shards, so they cannot be verified; "
            "it was not written by this version of cairn: load an earlier checkpoint"
        )
    for name in [INDEX_FILE, *sorted({entry.relative_path for entry in index.storage_data.values()})]:
        if name not in digests:
            raise CheckpointCorruptError(f"shard {name!r} of {folder!r} was not there when the folder was written")
        if file_digest(os.path.join(folder, name)) != digests[name]:
            raise CheckpointCorruptError(
                f"shard {name!r} of {folder!r} fails its digest: its bytes changed after it was written (disk or "
                "transfer damage, or an edit); load an earlier checkpoint"
            )


def _check_storage(storage: dict[Any, Any], folder: str) -> None:
    sizes: dict[str, int] = {}
    for entry in storage.values():
        name, offset, length = (getattr(entry, key, None) for key in ("relative_path", "offset", "length"))
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise UnsafeCheckpointError(
                f"the shard index of {folder!r} names {name!r}, a file outside the folder; refused without reading "
                "it: this folder was tampered with, load an earlier checkpoint"
            )
        if name not in sizes:
            sizes[name] = _require_regular_file(os.path.join(folder, name), folder)
        if not all(isinstance(n, int) and n >= 0 for n in (offset, length)) or offset + length > sizes[name]:
            raise CheckpointCorruptError(
                f"shard {name!r} of {folder!r} is shorter than its index says (truncated or damaged); "
                "load an earlier checkpoint"
            )


def _check_byte_entries(index: Metadata, folder: str) -> None:
    """DCP unpickles non-tensor entries (an optimizer's lr, its betas) with ``weights_only=False``: each must load
    as plain data here first. They are a few hundred bytes each."""
    for key, entry in index.storage_data.items():
        if not isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            continue
        if getattr(entry, "transform_descriptors", None):
            raise CheckpointCorruptError(
                f"shard entry {key.fqn!r} of {folder!r} is stored through transforms (compression, encryption) that "
                "cairn never writes; load it with the tool that wrote it"
            )
        with open(os.path.join(folder, entry.relative_path), "rb") as file:
            file.seek(entry.offset)
            _load_plain(io.BytesIO(file.read(entry.length)), key.fqn, folder)


def _load_plain(data: io.BytesIO, name: str, folder: str) -> None:
    try:
        torch.load(data, weights_only=True)
    except pickle.UnpicklingError as err:
        if not needs_code(str(err), is_archive=data.getvalue().startswith(b"PK\x03\x04")):
            raise CheckpointCorruptError(
                f"shard entry {name!r} of {folder!r} is damaged ({error_reason(err)}); load an earlier checkpoint"
            ) from None
        raise UnsafeCheckpointError(
            f"shard entry {name!r} of {folder!r} would need code to run to load ({error_reason(err)}); "
            "nothing was executed: load an earlier checkpoint, or one from a source you trust"
        ) from None
    except Exception as err:  # noqa: BLE001 - damaged bytes can fail in many ways
        raise CheckpointCorruptError(
            f"shard entry {name!r} of {folder!r} is damaged ({err!s:.120}); load an earlier checkpoint"
        ) from None


def _require_regular_file(path: str, folder: str) -> int:
    """The file's size; a symlink (it could lead anywhere) or a missing file is refused."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path!r} is missing from the sharded checkpoint {folder!r}; the folder is incomplete: load an earlier one"
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeCheckpointError(
            f"{path!r} is a symlink or not a regular file; cairn writes neither into a sharded checkpoint, and "
            "follows neither out of its folder: replace it with the real file, or load an earlier checkpoint"
        )
    return info.st_size


class SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by :func:`read_shard_index`, or the one the caller already read and
    checked (the byte entries are checked again as they load, by the planners below)."""

    def __init__(self, folder: str, index: Metadata | None = None) -> None:
        super().__init__(folder)
        self._index = index

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        index = self._index if self._index is not None else read_shard_index(str(self.path))
        index.storage_meta.load_id = self.load_id
        return index


class _PlainBytes:
    """A load-planner mixin: byte entries must load as plain data before DCP unpickles them (it would use
    ``weights_only=False``). :func:`read_shard_index` checked them already; this closes the gap should a file change
    between that check and the load."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _load_plain(value, read_item.dest_index.fqn, "this folder")
        value.seek(0)
        super().load_bytes(read_item, value)  # type: ignore[misc] - the same bytes, now known to be plain data


class SafeLoadPlanner(_PlainBytes, DefaultLoadPlanner):
    """DCP's default load planner (into a model's own tensors), with byte entries loaded as plain data."""


class SafeWholeLoadPlanner(_PlainBytes, _EmptyStateDictLoadPlanner):
    """DCP's planner that builds the whole state from the index (no model needed), with byte entries loaded as
    plain data."""
