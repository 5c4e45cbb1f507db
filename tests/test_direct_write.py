"""Checkpoint files are written past the page cache (``O_DIRECT``) and still hold exactly what torch.save wrote.

A save that filled the page cache made the kernel reclaim and write back pages on the training threads' cores
(docs/performance.md); these tests pin what the user relies on: every byte lands, at any size and split of the
writes, the file loads with plain ``torch.load``, a system without direct I/O still saves, and a save leaves the
file's pages out of the cache."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cairn.checkpoint.save import direct
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.direct import BLOCK_BYTES, STAGING_BYTES, DirectFile
from cairn.checkpoint.save.snapshot import BufferKind

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="the system has no direct I/O")

EDGES = [0, 1, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 1, STAGING_BYTES - 1, STAGING_BYTES, STAGING_BYTES + 7]


def _write_pieces(path: Path, sizes: list[int]) -> bytes:
    expected = bytearray()
    with DirectFile(str(path)) as file:
        for index, size in enumerate(sizes):
            piece = bytes([index % 251 + 1]) * size
            assert file.write(memoryview(piece)) == size  # a read-only view, as torch hands over
            expected += piece
            assert file.tell() == len(expected)
    return bytes(expected)


@pytest.mark.parametrize("size", EDGES)
def test_every_byte_lands_whatever_the_length(tmp_path: Path, size: int) -> None:
    path = tmp_path / "file"
    expected = _write_pieces(path, [size])
    assert path.read_bytes() == expected


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.one_of(st.integers(0, 3 * BLOCK_BYTES), st.sampled_from(EDGES)), max_size=6))
def test_any_split_of_the_writes_gives_the_same_file(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int]
) -> None:
    path = tmp_path_factory.mktemp("split") / "file"
    expected = _write_pieces(path, sizes)
    assert path.read_bytes() == expected


def test_a_checkpoint_written_directly_opens_with_plain_torch_load(tmp_path: Path) -> None:
    checkpoint = {"weights": torch.randn(3 * STAGING_BYTES // 4 + 5), "step": torch.tensor(7), "name": "run"}
    path = tmp_path / "ckpt.pt"
    write_checkpoint(checkpoint, str(path))
    for mapped in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mapped)
        assert torch.equal(loaded["weights"], checkpoint["weights"]) and int(loaded["step"]) == 7
        assert loaded["name"] == "run"


def test_a_system_without_direct_io_writes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct, "_O_DIRECT", 0)  # as on macOS, where os has no O_DIRECT
    path = tmp_path / "file"
    with DirectFile(str(path)) as file:
        assert not file.direct
        file.write(b"x" * (BLOCK_BYTES + 3))
        file.write(b"y" * (direct.IN_PLACE_FROM + 5))  # large: written as it lies, after the staged bytes
        file.write(b"z")
    assert path.read_bytes() == b"x" * (BLOCK_BYTES + 3) + b"y" * (direct.IN_PLACE_FROM + 5) + b"z"


def _resident_pages(path: Path) -> int:
    """How many of the file's pages the page cache holds (mincore over a read-only mapping of the file)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
        vector = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
        if libc.mincore(int(np.frombuffer(mapped, dtype=np.uint8).ctypes.data), size, vector) != 0:
            pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(byte & 1 for byte in vector.raw)


def test_a_save_leaves_the_file_out_of_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    write_checkpoint({"weights": torch.randn(4 * STAGING_BYTES // 4)}, str(path))  # 32 MiB
    pages = -(-path.stat().st_size // mmap.PAGESIZE)
    assert _resident_pages(path) <= pages // 20  # buffered, every page would be cached (and written back)


def test_the_environment_can_turn_direct_writes_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(direct.SWITCH, "0")
    with DirectFile(str(tmp_path / "file")) as file:
        assert not file.direct
    monkeypatch.setenv(direct.SWITCH, "sometimes")
    with pytest.raises(ValueError, match="CAIRN_DIRECT_IO='sometimes' is not understood"):
        DirectFile(str(tmp_path / "other"))


def test_a_large_checkpoint_puts_each_tensor_on_a_block_and_a_small_one_does_not(tmp_path: Path) -> None:
    """Block-aligned tensors are what lets an async save's page-aligned buffers go to the disk without a copy; a
    small checkpoint keeps torch's 64-byte alignment (a block of padding per tensor would be most of its size)."""
    import zipfile

    large = {f"t{i}": BufferKind((direct.ALIGNED_CHECKPOINT_BYTES // 4 // 3 + i,), torch.float32, False).allocate()
             for i in range(3)}  # fmt: skip
    for tensor in large.values():
        assert tensor.data_ptr() % BLOCK_BYTES == 0  # an async save's host buffer starts on a page
        tensor.normal_()
    small = {"t": torch.randn(1000), "u": torch.randn(3)}
    for name, checkpoint, aligned in (("large.pt", large, True), ("small.pt", small, False)):
        path = tmp_path / name
        write_checkpoint(checkpoint, str(path))
        loaded = torch.load(path, weights_only=True, mmap=True)
        assert all(torch.equal(loaded[key], value) for key, value in checkpoint.items())
        with zipfile.ZipFile(path) as archive, open(path, "rb") as handle:
            offsets = [_data_offset(handle, info) for info in archive.infolist() if "/data/" in info.filename]
        assert all(offset % BLOCK_BYTES == 0 for offset in offsets) == aligned, offsets


def _data_offset(handle: Any, info: Any) -> int:
    """Where a stored zip member's bytes begin: after its local header, name and extra field."""
    handle.seek(info.header_offset + 26)
    name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length
