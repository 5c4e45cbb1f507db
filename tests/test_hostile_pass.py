"""A hostile pass over names, sizes and counts that come from a file, the file system or the user (issue 14's
closing review): each is refused quickly with a clear error before training, or handled."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.errors import CheckpointCorruptError, CheckpointIncompatibleError
from cairn.models import Classifier
from conftest import TinyNet, fifo_writer, make_dataset, make_loader


def _trainer(**kwargs: Any) -> Trainer:
    kwargs.setdefault("model", Classifier(TinyNet(), num_classes=3))
    kwargs.setdefault("train_dataloader", make_loader())
    kwargs.setdefault("max_duration", "1ep")
    return Trainer(progress_bar=False, **kwargs)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("original")
    torch.manual_seed(0)
    _trainer(save_folder=str(folder), save_filename="c.pt", seed=1).fit()
    return folder / "c.pt"


def _resealed(original: Path, edit: Callable[[dict[str, Any]], None], target: Path) -> Path:
    """The checkpoint with ``edit`` applied and its hash made to match again: valid types, hostile values."""
    checkpoint = copy.deepcopy(read_checkpoint(str(original)))
    edit(checkpoint)
    torch.save(seal(checkpoint), target)
    return target


# -- the file system ----------------------------------------------------------------------------------------------


def test_a_fifo_as_load_path_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "c.pt"
    os.mkfifo(fifo)
    with fifo_writer(fifo) as connected:  # its open returns only when someone opens the FIFO to read: the bug
        with pytest.raises(CheckpointCorruptError, match="FIFO"):
            _trainer(load_path=str(fifo))
        assert not connected.is_set(), "the FIFO was opened for reading"


def test_a_device_linked_as_a_checkpoint_is_refused_at_once(tmp_path: Path) -> None:
    """``/dev/zero`` never ends: reading it spun forever. Run in a child so a regression cannot hang the suite."""
    link = tmp_path / "c.pt"
    link.symlink_to("/dev/zero")
    code = (
        "import sys; from cairn.checkpoint import read_checkpoint\n"
        "try: read_checkpoint(sys.argv[1])\n"
        "except Exception as err: print(type(err).__name__, err)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(link)], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("CheckpointCorruptError") and "character device" in out


def test_autoresume_skips_a_socket_named_like_a_checkpoint(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "ep1-ba4-rank0.pt"))  # a raw OSError (ENXIO) escaped autoresume
    try:
        trainer = _trainer(save_folder=str(tmp_path), autoresume=True, run_name="r", max_duration="2ba")
        assert trainer.state.resumed_from is None
    finally:
        server.close()


# -- values inside a checkpoint -----------------------------------------------------------------------------------


def test_a_run_name_loaded_from_a_checkpoint_cannot_put_files_outside_the_folder(
    tmp_path: Path, checkpoint_file: Path
) -> None:
    hostile = _resealed(checkpoint_file, lambda c: c["state"].update(run_name="../escaped"), tmp_path / "h.pt")
    folder = tmp_path / "run"
    trainer = _trainer(
        load_path=str(hostile), save_folder=str(folder), save_filename="{run_name}-ep{epoch}.pt", max_duration="2ep"
    )
    with pytest.raises(ValueError, match="outside the save folder"):
        trainer.fit()
    assert not (tmp_path / "escaped-ep2.pt").exists()
    assert trainer.state.timestamp.epoch == 1, "refused before training"


def test_an_rng_position_out_of_range_is_malformed_state(tmp_path: Path, checkpoint_file: Path) -> None:
    hostile = _resealed(checkpoint_file, lambda c: c["rng"][0]["numpy"].update(pos=2**70), tmp_path / "h.pt")
    with pytest.raises(CheckpointCorruptError, match="malformed state"):  # was a raw OverflowError
        _trainer(load_path=str(hostile))


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """32 samples, and no length: a resumed run fast-forwards it by fetching batches."""

    def __iter__(self) -> Iterator[Any]:
        data = make_dataset()
        return iter([data[i] for i in range(len(data))])


def test_a_position_past_the_end_of_a_loader_without_length_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = tmp_path / "source"
    _trainer(
        train_dataloader=DataLoader(_Stream(), batch_size=8), max_duration="2ba", save_folder=str(source),
        save_filename="c.pt",
    ).fit()  # fmt: skip
    hostile = _resealed(
        source / "c.pt", lambda c: c["state"]["timestamp"].update(batch_in_epoch=1000, batch=1000), tmp_path / "h.pt"
    )
    stream = DataLoader(_Stream(), batch_size=8)
    trainer = _trainer(train_dataloader=stream, max_duration="1002ba", load_path=str(hostile))
    with pytest.raises(CheckpointIncompatibleError, match="ends after 4"):  # was "generator raised StopIteration"
        trainer.fit()


# -- arguments ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "error"), [(-1, ValueError), (2**31, ValueError), (2**70, ValueError), (True, TypeError), ("7", TypeError)]
)
def test_a_seed_every_generator_cannot_take_is_refused(seed: object, error: type[Exception]) -> None:
    """-1 and 2**70 were folded into range silently (two seeds, one run); "7" failed inside an addition."""
    with pytest.raises(error, match="seed="):
        _trainer(seed=seed)


@pytest.mark.parametrize(
    ("run_name", "error"), [(123, TypeError), (b"r", TypeError), ("", ValueError), (" ", ValueError)]
)
def test_a_run_name_that_cannot_come_back_is_refused(run_name: object, error: type[Exception]) -> None:
    """An int was written into checkpoints that every loader then refused; an empty one became a new random name at
    each restart, so autoresume never found the run."""
    with pytest.raises(error, match="run_name="):
        _trainer(run_name=run_name)
