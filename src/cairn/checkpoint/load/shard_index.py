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
import math
import os
import pickle
import stat
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from cairn.checkpoint.format import file_digest
from cairn.checkpoint.load.archive import check_archive_bytes, error_reason, needs_code
from cairn.errors import CheckpointCorruptError, UnsafeCheckpointError
from cairn.names import METADATA_FILE, SHARD_INDEX_FILE
from cairn.utils.text import printable

__all__ = [
    "INDEX_FILE",
    "SafeLoadPlanner",
    "SafeReader",
    "SafeWholeLoadPlanner",
    "ShardFiles",
    "read_shard_index",
    "recorded_shard_files",
    "verify_shard_digests",
]

INDEX_FILE = SHARD_INDEX_FILE

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
        raise pickle.UnpicklingError(printable(f"{module}.{name}"))  # quoted in the error: shown, never obeyed


class ShardFiles(Protocol):
    """A sharded folder whose shard files are not all on disk yet (one in an object store): each rank fetches, into
    ``folder``, only the files its own load plan reads from, each checked against the digest ``cairn.pt`` recorded
    (:class:`cairn.checkpoint.load.remote.RemoteShards`)."""

    @property
    def folder(self) -> str:
        """The local folder the files land in: ``cairn.pt`` and the index are there already."""

    @property
    def label(self) -> str:
        """The folder's name in messages (its URI)."""

    @property
    def sizes(self) -> Mapping[str, int]:
        """Each file's size where it is kept (the store's listing), before any is fetched."""

    def fetch(self, names: Iterable[str]) -> None:
        """Make each file of ``names`` present in :attr:`folder`, verified; those already fetched are not fetched
        again."""


def read_shard_index(folder: str, *, sizes: Mapping[str, int] | None = None) -> Metadata:
    """The folder's DCP ``Metadata``, unpickled without running code and checked against the files beside it.

    With ``sizes`` (a folder in a store, whose shard files are fetched only when a rank's plan reads them), each
    entry is checked against those sizes instead of the files on disk, and the byte entries are checked later, by
    :class:`SafeReader`, once their file is fetched: still before any rank reads a tensor into a model.
    """
    _require_regular_file(os.path.join(folder, METADATA_FILE), folder)
    path = os.path.join(folder, INDEX_FILE)
    _require_regular_file(path, folder)
    try:
        with _open_regular(path, folder) as file:
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
    _check_storage(index.storage_data, folder, sizes)
    _check_entries(index, folder)
    _check_planner_data(index, folder)
    if sizes is None:
        _check_byte_entries(index, folder)
    return index


def verify_shard_digests(folder: str, index: Metadata, digests: Any) -> None:
    """Every file of the folder's index holds the bytes ``cairn.pt`` recorded when the folder was written."""
    for name in recorded_shard_files(folder, index, digests):
        path = os.path.join(folder, name)
        _require_regular_file(path, folder)  # checked again here: a FIFO swapped in since would block the read
        if file_digest(path) != digests[name]:
            raise CheckpointCorruptError(
                f"shard {name!r} of {folder!r} fails its digest: its bytes changed after it was written (disk or "
                "transfer damage, or an edit); load an earlier checkpoint"
            )


def recorded_shard_files(folder: str, index: Metadata, digests: Any) -> list[str]:
    """The index and every file it names, each one ``cairn.pt`` recorded a digest of (``digests``) when the folder
    was written: a file the index names that was not there then is refused."""
    if not isinstance(digests, dict) or INDEX_FILE not in digests:
        raise CheckpointCorruptError(
            f"{os.path.join(folder, METADATA_FILE)!r} records no digests of its shards, so they cannot be verified; "
            "it was not written by this version of cairn: load an earlier checkpoint"
        )
    names = [INDEX_FILE, *sorted({entry.relative_path for entry in index.storage_data.values()})]
    for name in names:
        if name not in digests:
            raise CheckpointCorruptError(f"shard {name!r} of {folder!r} was not there when the folder was written")
    return names


def _check_storage(storage: dict[Any, Any], folder: str, listed: Mapping[str, int] | None) -> None:
    """Every entry names a regular file inside the folder (or, with ``listed``, one of the listed files) and a byte
    range within it; no two ranges share a byte (DCP writes each entry once, one after another), so the declared
    entries cannot add up to more than the files."""
    sizes: dict[str, int] = {}
    ranges: dict[str, list[tuple[int, int]]] = {}
    for key, entry in storage.items():
        name, offset, length = (getattr(entry, key, None) for key in ("relative_path", "offset", "length"))
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise UnsafeCheckpointError(
                f"the shard index of {folder!r} names {name!r}, a file outside the folder; refused without reading "
                "it: this folder was tampered with, load an earlier checkpoint"
            )
        if not isinstance(key, MetadataIndex) or not isinstance(key.fqn, str):
            raise _index_error(folder, f"has a storage entry keyed by {key!r:.80}, not by an entry's name")
        if getattr(entry, "transform_descriptors", None):
            raise CheckpointCorruptError(
                f"shard entry {key.fqn!r} of {folder!r} is stored through transforms (compression, encryption) that "
                "cairn never writes; load it with the tool that wrote it"
            )
        if name not in sizes:
            sizes[name] = _file_size(name, folder, listed)
        if not all(_is_count(n) for n in (offset, length)) or offset + length > sizes[name]:
            raise CheckpointCorruptError(
                f"shard {name!r} of {folder!r} is shorter than its index says (truncated or damaged); "
                "load an earlier checkpoint"
            )
        ranges.setdefault(name, []).append((offset, offset + length))
    for name, spans in ranges.items():
        spans.sort()
        if any(start < previous_end for (_, previous_end), (start, _) in zip(spans, spans[1:], strict=False)):
            raise _index_error(folder, f"gives two entries the same bytes of shard {name!r}")


def _file_size(name: str, folder: str, listed: Mapping[str, int] | None) -> int:
    """The size of the folder's file ``name``: on disk, or where it is kept (``listed``) when it is fetched later."""
    if listed is None:
        return _require_regular_file(os.path.join(folder, name), folder)
    size = listed.get(name)
    if not _is_count(size):
        raise CheckpointCorruptError(
            f"shard {name!r} is missing from the sharded checkpoint {folder!r}; the folder is incomplete: load an "
            "earlier one"
        )
    return size  # type: ignore[return-value] - a count, checked just above


def _check_entries(index: Metadata, folder: str) -> None:
    """Each entry is bytes or a tensor whose declared size, dtype and chunks agree with each other and with the
    stored bytes: DCP allocates every declared tensor whole, then fills it from the chunks, so a size larger than the
    chunks would write uninitialised memory into a conversion, and a huge one would exhaust memory."""
    entries = index.state_dict_metadata
    if not isinstance(entries, dict) or not all(isinstance(name, str) for name in entries):
        raise _index_error(folder, "has no table of named entries")
    for name, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata):
            _stored(index, MetadataIndex(name), name, folder)
        elif isinstance(entry, TensorStorageMetadata):
            _check_tensor(index, name, entry, folder)
        else:
            raise _index_error(folder, f"describes entry {name!r} as {type(entry).__name__}, neither bytes nor tensor")


def _check_tensor(index: Metadata, name: str, entry: TensorStorageMetadata, folder: str) -> None:
    dtype = _plain_dtype(entry.properties, name, folder)
    size = _shape(entry.size, None, f"tensor {name!r} size", folder)
    chunks = entry.chunks
    if not isinstance(chunks, list) or not all(isinstance(chunk, ChunkStorageMetadata) for chunk in chunks):
        raise _index_error(folder, f"gives tensor {name!r} no list of chunks")
    boxes = []
    for chunk in chunks:
        offsets = _shape(chunk.offsets, len(size), f"a chunk offset of {name!r}", folder)
        extent = _shape(chunk.sizes, len(size), f"a chunk size of {name!r}", folder)
        if any(start + length > whole for start, length, whole in zip(offsets, extent, size, strict=True)):
            raise _index_error(folder, f"puts a chunk of tensor {name!r} outside its size {tuple(size)}")
        nbytes = math.prod(extent) * dtype.itemsize
        stored = _stored(index, MetadataIndex(name, offsets), name, folder)
        if stored.length < nbytes:
            raise _index_error(
                folder, f"declares a chunk of {nbytes} bytes for tensor {name!r} but stores only {stored.length}"
            )
        boxes.append((offsets, extent))
    if sum(math.prod(extent) for _, extent in boxes) != math.prod(size) or _overlapping(boxes):
        raise _index_error(
            folder, f"declares tensor {name!r} of size {tuple(size)}, which its chunks do not cover exactly once"
        )


def _plain_dtype(properties: Any, name: str, folder: str) -> torch.dtype:
    dtype = getattr(properties, "dtype", None) if isinstance(properties, TensorProperties) else None
    plain = isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype.is_complex or dtype in _INTEGERS)
    if not plain or getattr(properties, "layout", torch.strided) != torch.strided:
        raise _index_error(
            folder, f"declares tensor {name!r} as {dtype!s:.40}, not a plain dense dtype DCP can load back"
        )
    return dtype  # type: ignore[return-value] - checked just above


_INTEGERS = {
    torch.bool,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
}
_MAX_DIMENSIONS = 64


def _shape(value: Any, dimensions: int | None, what: str, folder: str) -> tuple[int, ...]:
    """A size or offset: a sequence of non-negative ints (``dimensions`` of them, when given)."""
    if not isinstance(value, (tuple, list)) or not all(_is_count(n) for n in value):
        raise _index_error(folder, f"gives {what} as {value!r:.80}, not a list of counts")
    if len(value) > _MAX_DIMENSIONS or (dimensions is not None and len(value) != dimensions):
        raise _index_error(folder, f"gives {what} with {len(value)} dimensions, not {dimensions or _MAX_DIMENSIONS}")
    return tuple(value)


def _stored(index: Metadata, key: MetadataIndex, name: str, folder: str) -> Any:
    stored = index.storage_data.get(key)
    if stored is None:
        raise _index_error(folder, f"names entry {name!r} but says nowhere where its bytes are")
    return stored


def _overlapping(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether two non-empty chunks share an element. A sweep along the dimension split most often compares each
    chunk only with those it meets along it: a tensor split into a grid costs chunks x (columns across) comparisons."""
    boxes = [box for box in boxes if all(box[1])]
    if len(boxes) < 2:
        return False
    if not boxes[0][0]:
        return True  # two chunks of one scalar
    axis = max(range(len(boxes[0][0])), key=lambda dim: len({offsets[dim] for offsets, _ in boxes}))
    boxes.sort(key=lambda box: box[0][axis])
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, extent in boxes:
        active = [box for box in active if box[0][axis] + box[1][axis] > offsets[axis]]
        for other_offsets, other_extent in active:
            if all(
                a < b + m and b < a + n for a, n, b, m in zip(offsets, extent, other_offsets, other_extent, strict=True)
            ):
                return True
        active.append((offsets, extent))
    return False


def _check_planner_data(index: Metadata, folder: str) -> None:
    """Where DCP puts each entry when it rebuilds the nested state: the path must spell the entry's name, and a list
    index must be small (DCP grows a list one element at a time up to it), and no entry may sit inside another."""
    paths = getattr(index, "planner_data", None)
    if paths is None:
        return
    if not isinstance(paths, dict):
        raise _index_error(folder, "has a malformed table of entry paths")
    prefixes: set[tuple[Any, ...]] = set()
    for name, path in paths.items():
        steps_ok = isinstance(path, tuple) and path and all(_is_step(step, len(paths)) for step in path)
        if not steps_ok or ".".join(map(str, path)) != name:
            raise _index_error(folder, f"gives entry {name!r:.80} the path {path!r:.80}, which does not spell it")
        prefixes.update(path[:end] for end in range(1, len(path)))
    if any(path in prefixes for path in paths.values()):
        raise _index_error(folder, "puts one entry inside another")


def _is_step(step: Any, entries: int) -> bool:
    return isinstance(step, str) or (_is_count(step) and step < entries)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _index_error(folder: str, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"the shard index of {folder!r} {what}; it is damaged or was tampered with: load an earlier checkpoint"
    )


def _check_byte_entries(index: Metadata, folder: str) -> None:
    """DCP unpickles non-tensor entries (an optimizer's lr, its betas) with ``weights_only=False``: each must load
    as plain data here first. They are a few hundred bytes each."""
    for key, entry in index.storage_data.items():
        if isinstance(index.state_dict_metadata.get(key.fqn), BytesStorageMetadata):
            _check_byte_entry(key.fqn, entry, folder)


def _check_byte_entry(name: str, entry: Any, folder: str) -> None:
    """The byte entry ``name``, stored at ``entry``, loads as plain data."""
    with _open_regular(os.path.join(folder, entry.relative_path), folder) as file:
        file.seek(entry.offset)
        _load_plain(io.BytesIO(file.read(entry.length)), name, folder)


def _load_plain(data: io.BytesIO, name: str, folder: str) -> None:
    _require_plain_archive(data, name, folder)
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
        raise _not_regular(path)
    return info.st_size


def _not_regular(path: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path!r} is a symlink or not a regular file; cairn writes neither into a sharded checkpoint, and "
        "follows neither out of its folder: replace it with the real file, or load an earlier checkpoint"
    )


def _open_regular(path: str, folder: str) -> io.BufferedReader:
    """``path`` opened for reading, only if it is a regular file: checked before the open (a FIFO is never opened:
    that blocks until a writer comes), and again on what was opened (a link or FIFO swapped in between the two is
    opened without following or waiting, then refused)."""
    _require_regular_file(path, folder)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{path!r} is missing from the sharded checkpoint {folder!r}; the folder is incomplete: load an earlier one"
        ) from None
    except OSError:  # ELOOP: a link; ENXIO: a socket
        raise _not_regular(path) from None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise _not_regular(path)
        return os.fdopen(descriptor, "rb")  # O_NONBLOCK changes nothing for a regular file
    except BaseException:
        os.close(descriptor)
        raise


class SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by :func:`read_shard_index`, or the one the caller already read and
    checked, and every entry read here: a tensor chunk must load as plain data of exactly the dtype and shape the
    index declares for it (DCP would narrow a larger one and convert another dtype without a word); byte entries
    are checked again as they load, by the planners below.

    With ``files`` (a folder in a store), this rank fetches only the files its own plan reads from, in
    :meth:`prepare_local_plan`: DCP runs it on every rank before its global plan step and gathers any failure
    there to every rank, so a shard that fails its digest, or a byte entry that is not plain data, stops the load
    on every rank before any ``read_data`` touches a model's tensor.
    """

    def __init__(self, folder: str, index: Metadata | None = None, *, files: ShardFiles | None = None) -> None:
        super().__init__(folder)
        self._index = index
        self._files = files

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        if self._files is not None:
            self._files.fetch(self._files_read_by(plan))
            for item in plan.items:  # read_shard_index left them to now: their files were not here yet
                if item.type == LoadItemType.BYTE_IO:
                    _check_byte_entry(item.storage_index.fqn, self._stored(item), str(self.path))
        return super().prepare_local_plan(plan)

    def _files_read_by(self, plan: LoadPlan) -> list[str]:
        return sorted({self._stored(item).relative_path for item in plan.items})

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._index is None:
            self._index = read_shard_index(str(self.path))
        self._index.storage_meta.load_id = self.load_id
        return self._index

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        folder = str(self.path)
        if self._files is not None:
            self._files.fetch(self._files_read_by(plan))  # fetched in prepare_local_plan: nothing is left, normally
        for item in sorted(plan.items, key=lambda item: (self._stored(item).relative_path, self._stored(item).offset)):
            stored = self._stored(item)
            with _open_regular(os.path.join(folder, stored.relative_path), folder) as file:
                file.seek(stored.offset)
                data = io.BytesIO(file.read(stored.length))
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, data)
                continue
            chunk = _load_chunk(data, self._declared(item), item.storage_index.fqn, folder)
            part = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
            target = planner.resolve_tensor(item).detach()
            if target.size() != part.size():
                raise _index_error(folder, f"maps a chunk of {item.storage_index.fqn!r} onto a tensor of another size")
            target.copy_(part)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _stored(self, item: ReadItem) -> Any:
        return self.storage_data[item.storage_index]

    def _declared(self, item: ReadItem) -> tuple[torch.dtype, tuple[int, ...]]:
        """The dtype and chunk shape the (checked) index declares for the chunk ``item`` reads."""
        assert self._index is not None  # read_metadata ran first: DCP plans from it
        key = item.storage_index
        entry = self._index.state_dict_metadata[key.fqn]
        sizes = next(tuple(c.sizes) for c in entry.chunks if tuple(c.offsets) == tuple(key.offset or ()))
        return entry.properties.dtype, sizes


def _load_chunk(data: io.BytesIO, declared: tuple[torch.dtype, tuple[int, ...]], name: str, folder: str) -> Any:
    """One stored chunk (DCP writes each with ``torch.save``), loaded as plain data and held to the dtype and shape
    the index declares for it."""
    _require_plain_archive(data, name, folder)
    try:
        chunk = torch.load(data, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - damaged bytes can fail in many ways
        raise CheckpointCorruptError(
            f"shard entry {name!r} of {folder!r} is damaged ({error_reason(err)}); load an earlier checkpoint"
        ) from None
    dtype, sizes = declared
    if not isinstance(chunk, torch.Tensor) or chunk.dtype != dtype or tuple(chunk.shape) != sizes:
        found = f"{chunk.dtype} {tuple(chunk.shape)}" if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise CheckpointCorruptError(
            f"shard entry {name!r} of {folder!r} holds {found} where its index declares {dtype} {sizes}; it is "
            "damaged or was tampered with: load an earlier checkpoint"
        )
    return chunk


def _require_plain_archive(data: io.BytesIO, name: str, folder: str) -> None:
    """What ``torch.save`` writes: a zip archive of uncompressed records, none larger than the entry itself; so that
    a compressed record (a zip bomb) is refused before torch inflates it."""
    check_archive_bytes(data, f"shard entry {name!r} of {folder!r}")  # records checked, its pickle scanned


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
