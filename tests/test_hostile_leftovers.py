"""What the hostile pass left (issue 14): entries named like a checkpoint that are none, refused when fit starts
instead of an epoch later; optimizer step counts, format versions, world sizes and timestamps from a file that no
cairn writes, refused on load; and a FIFO swapped in for a shard after its index was checked, never waited on."""

from __future__ import annotations

import copy
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.format import FORMAT_VERSION
from cairn.checkpoint.save.content import seal
from cairn.checkpoint.tools.convert import convert
from cairn.core.time import Timestamp
from cairn.errors import CheckpointCorruptError, CheckpointIncompatibleError, UnsafeCheckpointError
from cairn.models import Classifier
from conftest import TinyNet, fifo_writer, make_loader

NEXT = "ep1-ba4-rank0.pt"  # the first checkpoint a run of one epoch (4 batches) saves under the default name


def _trainer(**kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    kwargs.setdefault("model", Classifier(TinyNet(), num_classes=3))
    kwargs.setdefault("train_dataloader", make_loader())
    kwargs.setdefault("max_duration", "1ep")
    return Trainer(progress_bar=False, seed=1, **kwargs)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("original")
    _trainer(save_folder=str(folder), save_filename="c.pt").fit()
    return folder / "c.pt"


def _resealed(original: Path, edit: Callable[[dict[str, Any]], None], target: Path) -> Path:
    """The checkpoint with ``edit`` applied and its hash made to match again: valid types, hostile values."""
    checkpoint = copy.deepcopy(read_checkpoint(str(original)))
    checkpoint["state"]["metadata"].pop("content_hash")
    edit(checkpoint)
    torch.save(seal(checkpoint), target)
    return target


# -- 1. entries named like the run's next checkpoint that are none -------------------------------------------------


def _plain_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("mine")


def _self_loop(path: Path) -> None:
    path.symlink_to(path.name)


def _link_outside(path: Path) -> None:
    outside = path.parent.parent / "outside.txt"
    outside.write_text("keep me")
    path.symlink_to(outside)


def _link_to_dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


OBSTACLES = {
    "a plain folder": (_plain_folder, "is a folder"),
    "a self-loop link": (_self_loop, "symbolic link"),
    "a link outside": (_link_outside, "symbolic link"),
    "a link to /dev/zero": (_link_to_dev_zero, "symbolic link"),
    "a FIFO": (_fifo, "is a FIFO"),
}


@pytest.mark.parametrize("obstacle", OBSTACLES)
def test_an_entry_named_like_the_next_checkpoint_is_refused_before_training(tmp_path: Path, obstacle: str) -> None:
    make, what = OBSTACLES[obstacle]
    folder = tmp_path / "run"
    folder.mkdir()
    make(folder / NEXT)
    trainer = _trainer(save_folder=str(folder))
    with pytest.raises(FileExistsError, match=f"{what}.*named like one of this run's checkpoints"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0, "refused when fit starts, not after an epoch of training"


def test_a_socket_named_like_a_checkpoint_is_refused_when_fit_starts(tmp_path: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / NEXT))
    try:
        trainer = _trainer(save_folder=str(tmp_path), autoresume=True, run_name="r")
        with pytest.raises(FileExistsError, match="is a socket"):
            trainer.fit()
    finally:
        server.close()
    assert trainer.state.timestamp.batch == 0


def test_a_folder_named_like_the_next_checkpoint_is_refused_under_autoresume(tmp_path: Path) -> None:
    first = _trainer(save_folder=str(tmp_path), autoresume=True, run_name="r")
    first.fit()
    _plain_folder(tmp_path / "ep2-ba8-rank0.pt")
    resumed = _trainer(save_folder=str(tmp_path), autoresume=True, run_name="r", max_duration="2ep")
    assert resumed.state.resumed_from == str(tmp_path / NEXT)
    with pytest.raises(FileExistsError, match="is a folder"):
        resumed.fit()
    assert resumed.state.timestamp.batch == 4, "refused before the second epoch ran"


def test_a_folder_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    _plain_folder(tmp_path / NEXT)
    trainer = _trainer(save_folder=str(tmp_path), save_overwrite=True)
    with pytest.raises(FileExistsError, match="even with overwrite"):
        trainer.fit()
    assert (tmp_path / NEXT / "notes.txt").read_text() == "mine", "the folder is left as it was"


@pytest.mark.parametrize("make", [_self_loop, _link_outside], ids=["self-loop", "outside"])
def test_with_overwrite_a_link_is_replaced_by_the_checkpoint_itself(tmp_path: Path, make: Callable) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    make(folder / NEXT)
    _trainer(save_folder=str(folder), save_overwrite=True).fit()
    saved = folder / NEXT
    assert not saved.is_symlink() and read_checkpoint(str(saved))["state"]["timestamp"]["batch"] == 4
    outside = tmp_path / "outside.txt"
    assert not outside.exists() or outside.read_text() == "keep me", "nothing the link led to was written"


def test_folders_of_nested_names_latest_links_and_sharded_checkpoints_are_not_in_the_way(tmp_path: Path) -> None:
    """The folders a nested save_filename creates (``ep1/``) do not match the whole pattern; a sharded checkpoint
    folder of that name is a checkpoint (its save may replace it with overwrite), never an obstacle."""
    nested = {"save_filename": "ep{epoch}/ba{batch}.pt", "save_latest_filename": "latest.pt", "run_name": "n"}
    _trainer(save_folder=str(tmp_path / "nested"), autoresume=True, **nested).fit()
    resumed = _trainer(save_folder=str(tmp_path / "nested"), autoresume=True, max_duration="2ep", **nested)
    resumed.fit()
    assert (tmp_path / "nested" / "ep2" / "ba8.pt").is_file() and resumed.state.timestamp.batch == 8
    source = tmp_path / "c.pt"
    _trainer(save_folder=str(tmp_path), save_filename="c.pt").fit()
    convert(str(source), "sharded", str(tmp_path / "sharded" / "ep1-ba4.pt"))
    trainer = _trainer(save_folder=str(tmp_path / "sharded"), save_filename="ep{epoch}-ba{batch}.pt", run_name="s")
    with pytest.raises(FileExistsError, match="already holds checkpoints"):  # the existing guard, not this one
        trainer.fit()


# -- 2. an optimizer's step count ------------------------------------------------------------------------------------


def _set_step(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(checkpoint: dict[str, Any]) -> None:
        optimizer = next(iter(checkpoint["state"]["optimizers"].values()))
        for parameter in optimizer["state"].values():
            parameter["step"] = value

    return edit


@pytest.mark.parametrize(
    "step",
    [torch.tensor(-5.0), torch.tensor(math.nan), torch.tensor(math.inf), -5, 1e400, torch.tensor([1.0, 2.0]), "7"],
    ids=["-5", "nan", "inf", "int -5", "float inf", "two elements", "a string"],
)
def test_an_optimizer_step_no_optimizer_counts_is_refused_on_load(
    tmp_path: Path, checkpoint_file: Path, step: Any
) -> None:
    crafted = _resealed(checkpoint_file, _set_step(step), tmp_path / "s.pt")
    with pytest.raises(CheckpointCorruptError, match="step"):
        _trainer(load_path=str(crafted))


def test_a_step_of_zero_or_a_plain_number_loads_and_trains(tmp_path: Path, checkpoint_file: Path) -> None:
    crafted = _resealed(checkpoint_file, _set_step(torch.tensor(0.0)), tmp_path / "s.pt")
    trainer = _trainer(load_path=str(crafted), max_duration="5ba")
    trainer.fit()
    assert trainer.state.timestamp.batch == 5


# -- 3. the file's own metadata --------------------------------------------------------------------------------------


def _set_metadata(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda checkpoint: checkpoint["state"]["metadata"].update(values)


def test_a_file_of_a_newer_format_asks_for_a_newer_cairn(tmp_path: Path, checkpoint_file: Path) -> None:
    crafted = _resealed(checkpoint_file, _set_metadata(format_version=99), tmp_path / "c.pt")
    expected = f"written by a newer cairn \\(format 99; this cairn reads {FORMAT_VERSION}\\): upgrade cairn"
    with pytest.raises(CheckpointIncompatibleError, match=expected):
        _trainer(load_path=str(crafted))


def test_autoresume_stops_at_a_newer_format_and_keeps_the_file(tmp_path: Path, checkpoint_file: Path) -> None:
    """Not skipped as damage and set aside: the run would start over, and later overwrite the newer run's files."""
    crafted = _resealed(checkpoint_file, _set_metadata(format_version=FORMAT_VERSION + 1), tmp_path / NEXT)
    with pytest.raises(CheckpointIncompatibleError, match="upgrade cairn"):
        _trainer(save_folder=str(tmp_path), autoresume=True, run_name="r")
    assert crafted.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [NEXT]


@pytest.mark.parametrize(
    "values",
    [
        {"format_version": "x"},
        {"format_version": 0},
        {"format_version": True},
        {"format_version": 2**70},
        {"world_size": 0},
        {"world_size": -3},
        {"world_size": "x"},
        {"world_size": 2.0},
        {"world_size": [1] * 3},
    ],
    ids=repr,
)
def test_metadata_no_cairn_writes_is_refused_as_damage(
    tmp_path: Path, checkpoint_file: Path, values: dict[str, Any]
) -> None:
    crafted = _resealed(checkpoint_file, _set_metadata(**values), tmp_path / "c.pt")
    with pytest.raises(CheckpointCorruptError, match=next(iter(values)).replace("_", " ")):
        read_checkpoint(str(crafted))


def test_a_file_without_a_format_version_or_with_an_odd_created_at_still_loads(
    tmp_path: Path, checkpoint_file: Path
) -> None:
    """Older files have no format version; ``created_at`` is only shown, so a nan there costs nothing."""

    def edit(checkpoint: dict[str, Any]) -> None:
        del checkpoint["state"]["metadata"]["format_version"]
        checkpoint["state"]["metadata"]["created_at"] = math.nan

    crafted = _resealed(checkpoint_file, edit, tmp_path / "c.pt")
    assert _trainer(load_path=str(crafted)).state.resumed_from == str(crafted)


# -- 4. timestamps ---------------------------------------------------------------------------------------------------


def _set_timestamp(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda checkpoint: checkpoint["state"]["timestamp"].update(values)


@pytest.mark.parametrize(
    "values",
    [
        {"epoch": 2**63},
        {"batch": 2**64, "batch_in_epoch": 0},
        {"batch_in_epoch": 5},  # the file's batch is 4
        {"sample_in_epoch": 33},  # of 32 samples
        {"token_in_epoch": 1},  # of 0 tokens
        {"total_wct": math.nan},
        {"epoch_wct": -1.0},
        {"batch_wct": math.inf},
    ],
    ids=repr,
)
def test_a_timestamp_no_training_loop_produces_is_refused_on_load(
    tmp_path: Path, checkpoint_file: Path, values: dict[str, Any]
) -> None:
    crafted = _resealed(checkpoint_file, _set_timestamp(**values), tmp_path / "c.pt")
    with pytest.raises(CheckpointCorruptError, match="timestamp field"):
        _trainer(load_path=str(crafted), max_duration="2ep")


def test_timestamps_the_loop_can_reach_still_load() -> None:
    """Epochs without batches, an epoch's first batch, and the largest count an int64 holds."""
    assert Timestamp.from_state_dict({"epoch": 5}).epoch == 5
    assert Timestamp.from_state_dict({"batch": 3, "batch_in_epoch": 3, "sample": 24, "sample_in_epoch": 24}).batch == 3
    assert Timestamp.from_state_dict({"token": 2**63 - 1, "token_in_epoch": 2**63 - 1}).token == 2**63 - 1
    timestamp = Timestamp()
    for _ in range(3):
        timestamp = timestamp.to_next_batch(8, 16, 0.1)
        timestamp = timestamp.to_next_epoch()
    assert Timestamp.from_state_dict(timestamp.state_dict()) == timestamp


# -- 5. a FIFO swapped in for a shard after its index was checked ---------------------------------------------------


@pytest.fixture
def sharded_folder(tmp_path: Path, checkpoint_file: Path) -> Path:
    folder = tmp_path / "sharded"
    convert(str(checkpoint_file), "sharded", str(folder))
    return folder


def _swap_in_fifo(folder: Path) -> Path:
    shard = next(p for p in folder.iterdir() if p.suffix == ".distcp")
    shard.unlink()
    os.mkfifo(shard)
    return shard


def test_a_fifo_swapped_in_before_the_digests_are_checked_is_never_opened(sharded_folder: Path) -> None:
    from cairn.checkpoint.load.shard_index import read_shard_index, verify_shard_digests

    index = read_shard_index(str(sharded_folder))
    digests = torch.load(sharded_folder / "cairn.pt", weights_only=True)["state"]["metadata"]["shards"]
    with fifo_writer(_swap_in_fifo(sharded_folder)) as connected:
        with pytest.raises(UnsafeCheckpointError, match="not a regular file"):
            verify_shard_digests(str(sharded_folder), index, digests)
        assert not connected.is_set(), "the FIFO was opened for reading"


def test_a_fifo_swapped_in_before_the_shards_are_read_is_never_opened(sharded_folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from cairn.checkpoint.load.shard_index import SafeLoadPlanner, SafeReader, read_shard_index
    from cairn.checkpoint.load.sharded import _shard_errors, read_whole_shards

    tensors = read_whole_shards(str(sharded_folder))
    index = read_shard_index(str(sharded_folder))  # as load_shards does, just before DCP reads the shards
    with fifo_writer(_swap_in_fifo(sharded_folder)) as connected:
        with pytest.raises(UnsafeCheckpointError, match="not a regular file"), _shard_errors(str(sharded_folder)):
            dcp.load(tensors, storage_reader=SafeReader(str(sharded_folder), index), planner=SafeLoadPlanner())
        assert not connected.is_set(), "the FIFO was opened for reading"
