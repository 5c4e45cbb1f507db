"""Async saves: training goes on while a background thread writes, and nothing about the files changes."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Trainer
from cairn.callbacks import CheckpointSaver
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.save.snapshot import SnapshotBuffers
from cairn.models import Classifier
from conftest import TinyNet, make_loader


def _trainer(tmp_path: Path, max_duration: str = "3ep", **kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8, shuffle=True),
        max_duration=max_duration,
        seed=5,
        progress_bar=False,
        run_name="async",
        **kwargs,
    )


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.state.model.state_dict().items()}


def test_async_checkpoints_hold_what_sync_checkpoints_hold(tmp_path: Path) -> None:
    saved = {}
    for mode in ("sync", "async"):
        trainer = _trainer(
            tmp_path,
            save_folder=str(tmp_path / mode),
            save_interval="1ba",
            save_async=mode == "async",
            save_num_checkpoints_to_keep=3,
        )
        trainer.fit()  # returns only once the last background write is published
        saved[mode] = sorted(os.listdir(tmp_path / mode))
        trainer.close()
    assert (
        saved["sync"]
        == saved["async"]
        == ["ep2-ba10-rank0.pt", "ep2-ba11-rank0.pt", "ep2-ba12-rank0.pt", "latest-rank0.pt"]
    )
    for name in saved["sync"]:
        sync, background = (read_checkpoint(str(tmp_path / mode / name)) for mode in ("sync", "async"))
        counters = ("epoch", "batch", "sample", "batch_in_epoch")  # the wall-clock fields differ from run to run
        assert all(sync["state"]["timestamp"][k] == background["state"]["timestamp"][k] for k in counters)
        assert all(torch.equal(v, background["state"]["model"][k]) for k, v in sync["state"]["model"].items())
        assert torch.equal(sync["rng"][0]["torch"], background["rng"][0]["torch"]), "RNG taken at the same moment"


def test_a_run_resumed_from_an_async_checkpoint_mid_epoch_is_bit_identical(tmp_path: Path) -> None:
    whole = _trainer(tmp_path)
    whole.fit()
    folder = str(tmp_path / "ckpt")
    _trainer(tmp_path, "6ba", save_folder=folder, save_interval="1ba", save_async=True).fit()
    resumed = _trainer(tmp_path, save_folder=folder, save_interval="1ba", save_async=True, autoresume=True)
    assert resumed.state.timestamp.batch == 6
    resumed.fit()
    assert all(torch.equal(v, _weights(resumed)[k]) for k, v in _weights(whole).items())


class _SlowFirstWrite(CheckpointSaver):
    """Holds the first background write until the test has seen training go on past it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.release = threading.Event()
        self.batches_while_writing = 0

    def _start_write(self, state, path):  # noqa: ANN001, ANN202
        write = super()._start_write(state, path)

        def held() -> None:
            assert self.release.wait(timeout=60), "the test never released the write"
            write()

        return held if not self.release.is_set() and not os.listdir(self.folder) else write

    def batch_end(self, state, logger) -> None:  # noqa: ANN001
        if self._background.busy:
            self.batches_while_writing += 1
            if self.batches_while_writing == 3:  # batches 5, 6 and 7 ran; the save at 8 waits for this one
                self.release.set()


def test_training_goes_on_while_the_file_is_written(tmp_path: Path) -> None:
    os.makedirs(tmp_path / "ckpt")
    saver = _SlowFirstWrite(
        folder=str(tmp_path / "ckpt"), filename="ba{batch}.pt", save_interval="4ba", async_save=True
    )
    trainer = _trainer(tmp_path, "8ba", callbacks=saver)
    trainer.fit()
    assert saver.batches_while_writing >= 3, "the loop ran on while the first checkpoint was still being written"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["ba4.pt", "ba8.pt", "latest-rank0.pt"]


def test_a_background_failure_is_raised_on_the_training_thread(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "blocked").write_text("a file where a folder must go")
    trainer = _trainer(
        tmp_path, save_folder=str(tmp_path / "ckpt"), save_filename="blocked/ep{epoch}.pt", save_async=True
    )
    with pytest.raises(OSError):
        trainer.fit()
    assert trainer.state.timestamp.epoch < 3, "raised at an event after the failed save, not only at the end"


def test_an_existing_file_is_not_replaced_in_the_background_without_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _trainer(tmp_path, "1ep", save_folder=str(folder), save_filename="fixed.pt").fit()
    before = (folder / "fixed.pt").read_bytes()
    saver = CheckpointSaver(folder=str(folder), filename="fixed.pt", async_save=True, overwrite=False)
    resumed = _trainer(tmp_path, "2ep", callbacks=saver, load_path=str(folder / "fixed.pt"))
    with pytest.raises(FileExistsError):
        resumed.fit()
    assert (folder / "fixed.pt").read_bytes() == before


def test_snapshot_buffers_are_reused_and_frozen() -> None:
    buffers = SnapshotBuffers()
    weights = {"w": torch.arange(6.0).reshape(2, 3), "step": 3, "groups": [{"lr": 0.1}]}
    first = buffers.take(weights)
    address = first["w"].data_ptr()
    weights["w"].add_(100)
    weights["groups"][0]["lr"] = 0.5
    assert torch.equal(first["w"], torch.arange(6.0).reshape(2, 3)) and first["groups"][0]["lr"] == 0.1
    second = buffers.take(weights)
    assert second["w"].data_ptr() == address, "the same host buffer is refilled, not reallocated"
    assert torch.equal(second["w"], weights["w"])
    assert buffers.nbytes == 6 * 4


def test_snapshot_keeps_tensors_apart_whose_paths_are_spelled_alike() -> None:
    """``{"a/b": t1, "a": {"b": t2}}`` (callback state may use such keys): both tensors are ``a/b`` by path, and
    an async save must still write each one's own values, not the last one copied into a shared buffer."""
    first, second = torch.ones(3), torch.full((3,), 2.0)
    snapshot = SnapshotBuffers().take({"a/b": first, "a": {"b": second}})
    assert torch.equal(snapshot["a/b"], first)
    assert torch.equal(snapshot["a"]["b"], second)
