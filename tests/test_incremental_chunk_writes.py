"""A save's new chunks are written several at a time (``chunk_folder.WRITERS``): each lands whole under its key, and
a failure among them is raised once everything in flight has finished, with no temporary left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cairn.atomic import is_temporary
from cairn.checkpoint.incremental.chunk_folder import WRITERS, ChunkFolder
from cairn.checkpoint.incremental.manifest import Piece, chunk_key
from cairn.errors import CheckpointWriteError


def _pieces(count: int) -> list[Piece]:
    blobs = [os.urandom(4096 + index) for index in range(count)]
    return [Piece(chunk_key(blob), memoryview(blob)) for blob in blobs]


def test_many_new_chunks_each_land_whole_under_their_key(tmp_path: Path) -> None:
    folder = ChunkFolder(str(tmp_path / "chunks"))
    pieces = _pieces(3 * WRITERS + 1)
    with folder.saving():
        written = folder.write_missing([*pieces, pieces[0]])  # a repeated key is written once
    assert (written.chunks, written.bytes) == (len(pieces), sum(len(piece.data) for piece in pieces))
    for piece in pieces:
        assert Path(folder.chunk_path(piece.key)).read_bytes() == bytes(piece.data)
    assert sorted(folder.keys()) == sorted(piece.key for piece in pieces)


def test_a_chunk_that_cannot_be_written_fails_the_save_and_leaves_no_temporary(tmp_path: Path) -> None:
    folder = ChunkFolder(str(tmp_path / "chunks"))
    pieces = _pieces(2 * WRITERS)
    blocked = pieces[WRITERS]
    os.makedirs(os.path.join(folder.chunk_path(blocked.key), "in-the-way"))  # no file can be renamed over it
    with folder.saving(), pytest.raises(CheckpointWriteError, match="could not write the checkpoint"):
        folder.write_missing(pieces)
    names = os.listdir(folder.path)
    assert not [name for name in names if is_temporary(name)]
    for piece in pieces:
        if piece is not blocked and piece.key in names:  # written before the failure, or beside it: whole
            assert Path(folder.chunk_path(piece.key)).read_bytes() == bytes(piece.data)
