"""The CheckpointSaver: when it saves, what names it writes, what it keeps, and what it leaves out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Event, Time, Trainer
from cairn.callbacks import CheckpointSaver
from cairn.checkpoint import read_checkpoint
from cairn.models import Classifier
from conftest import TinyNet, make_loader


def _fit(tmp_path: Path, max_duration: str = "3ep", **kwargs: Any) -> Trainer:
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8),  # 4 batches an epoch
        max_duration=max_duration,
        progress_bar=False,
        run_name="saving",
        **kwargs,
    )
    trainer.fit()
    return trainer


def _names(trainer: Trainer) -> list[str]:
    return [os.path.basename(p) for p in trainer.saved_checkpoints]


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        (1, ["ep1-ba4", "ep2-ba8", "ep3-ba12"]),
        ("2ep", ["ep2-ba8", "ep3-ba12"]),  # the end of training is always saved
        ("5ba", ["ep1-ba5", "ep2-ba10", "ep3-ba12"]),
        (Time(4, "ba"), ["ep0-ba4", "ep1-ba8", "ep2-ba12"]),
        ("20sp", ["ep0-ba3", "ep1-ba5", "ep1-ba8", "ep2-ba10", "ep3-ba12"]),
        ("0.5dur", ["ep2-ba8", "ep3-ba12"]),  # 1.5 epochs, checked at epoch ends since max_duration is in epochs
        (lambda state, event: state.timestamp.epoch > 1 and event is Event.EPOCH_CHECKPOINT, ["ep2-ba8", "ep3-ba12"]),
    ],
)
def test_save_interval_forms(tmp_path: Path, interval: Any, expected: list[str]) -> None:
    trainer = _fit(tmp_path, save_folder=str(tmp_path), save_filename="ep{epoch}-ba{batch}", save_interval=interval)
    assert _names(trainer) == expected


def test_a_run_ending_mid_epoch_is_saved_at_its_last_batch(tmp_path: Path) -> None:
    trainer = _fit(tmp_path, "6ba", save_folder=str(tmp_path), save_filename="ba{batch}.pt")
    assert _names(trainer) == ["ba4.pt", "ba6.pt"]
    assert read_checkpoint(trainer.saved_checkpoints[-1])["state"]["timestamp"]["batch_in_epoch"] == 2


def test_default_names_and_the_latest_link(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    trainer = _fit(tmp_path, "2ep", save_folder=str(folder))
    assert trainer.saved_checkpoints == [f"{folder}/ep1-ba4-rank0.pt", f"{folder}/ep2-ba8-rank0.pt"]
    latest = folder / "latest-rank0.pt"
    assert latest.is_symlink() and os.readlink(latest) == "ep2-ba8-rank0.pt"  # relative: the folder can move
    assert sorted(os.listdir(folder)) == ["ep1-ba4-rank0.pt", "ep2-ba8-rank0.pt", "latest-rank0.pt"]


def test_every_format_variable_renders_and_folders_are_created(tmp_path: Path) -> None:
    template = (
        "{run_name}/r{rank}-l{local_rank}-w{world_size}-lw{local_world_size}-n{node_rank}/"
        "e{epoch}-b{batch}-bie{batch_in_epoch}-s{sample}-sie{sample_in_epoch}-t{token}-tie{token_in_epoch}"
        "-{total_wct}-{epoch_wct}-{batch_wct}.pt"
    )
    trainer = _fit(tmp_path, "1ep", save_folder=str(tmp_path), save_filename=template)
    (path,) = trainer.saved_checkpoints
    relative = os.path.relpath(path, tmp_path)
    assert relative.startswith("saving/r0-l0-w1-lw1-n0/e1-b4-bie0-s32-sie0-t0-tie0-")
    assert os.path.isfile(path)


def test_unknown_format_variables_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"unknown variable \{step\}"):
        CheckpointSaver(filename="ckpt-{step}.pt")


def test_retention_keeps_the_newest_and_survives_a_restart(tmp_path: Path) -> None:
    _fit(tmp_path, "3ep", save_folder=str(tmp_path), save_interval="1ba", save_num_checkpoints_to_keep=2)
    # batch 12 was saved at its batch checkpoint, so the end of training is not saved a second time
    assert sorted(p.name for p in tmp_path.glob("ep*")) == ["ep2-ba11-rank0.pt", "ep2-ba12-rank0.pt"]
    # A new process continues the run: retention counts the files on disk, not a list in memory.
    _fit(
        tmp_path, "4ep", save_folder=str(tmp_path), save_interval="1ep", save_num_checkpoints_to_keep=2, autoresume=True
    )
    assert sorted(p.name for p in tmp_path.glob("ep*")) == ["ep3-ba12-rank0.pt", "ep4-ba16-rank0.pt"]


def test_ignore_keys_leave_parts_out(tmp_path: Path) -> None:
    trainer = _fit(
        tmp_path, "1ep", save_folder=str(tmp_path), save_ignore_keys=["state/optimizers", "state/*_metrics", "rng"]
    )
    checkpoint = read_checkpoint(trainer.saved_checkpoints[-1])
    assert "rng" not in checkpoint
    assert not {"optimizers", "train_metrics", "eval_metrics"} & set(checkpoint["state"])
    assert "model" in checkpoint["state"] and "timestamp" in checkpoint["state"]


def test_weights_only_files_hold_the_model_and_metadata(tmp_path: Path) -> None:
    trainer = _fit(tmp_path, "1ep", save_folder=str(tmp_path), save_weights_only=True)
    checkpoint = torch.load(trainer.saved_checkpoints[-1], weights_only=True)
    assert list(checkpoint) == ["state"]
    assert list(checkpoint["state"]) == ["model", "metadata"]
    metadata = checkpoint["state"]["metadata"]
    assert metadata["weights_only"] is True and metadata["content_hash"].startswith("xxh3-128:")
    assert {"cairn_version", "torch_version", "world_size", "created_at"} <= set(metadata)


def test_several_savers_run_side_by_side(tmp_path: Path) -> None:
    full = CheckpointSaver(folder=str(tmp_path / "full"), save_interval="2ep", num_checkpoints_to_keep=1)
    weights = CheckpointSaver(folder=str(tmp_path / "weights"), weights_only=True, filename="w{epoch}.pt")
    trainer = _fit(tmp_path, "4ep", callbacks=[full, weights])
    assert sorted(os.listdir(tmp_path / "full")) == ["ep4-ba16-rank0.pt", "latest-rank0.pt"]
    assert sorted(os.listdir(tmp_path / "weights")) == ["latest-rank0.pt", "w1.pt", "w2.pt", "w3.pt", "w4.pt"]
    assert len(trainer.saved_checkpoints) == 2 + 4


def test_no_temporary_file_is_left_behind(tmp_path: Path) -> None:
    _fit(tmp_path, "2ep", save_folder=str(tmp_path), save_interval="1ba")
    assert [p for p in tmp_path.iterdir() if ".cairn-tmp-" in p.name] == []


def test_a_failed_write_is_raised_and_earlier_checkpoints_stay(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"

    class BlockFolder(CheckpointSaver):
        """After the first save, turn the target's sub-folder into a file so the next write must fail."""

        def save(self, state, logger=None):  # noqa: ANN001
            path = super().save(state, logger)
            (folder / "sub").write_text("in the way")
            return path

    saver = BlockFolder(folder=str(folder), filename="ep{epoch}.pt")
    blocked = CheckpointSaver(folder=str(folder / "sub"), filename="ep{epoch}.pt")
    with pytest.raises(OSError):
        _fit(tmp_path, "2ep", callbacks=[saver, blocked])
    assert read_checkpoint(str(folder / "ep1.pt"))["state"]["timestamp"]["epoch"] == 1


def test_a_weights_only_file_loads_as_weights_only(tmp_path: Path) -> None:
    trained = _fit(
        tmp_path, "2ep", save_folder=str(tmp_path), save_weights_only=True, save_filename="w.pt", save_overwrite=True
    )
    fresh = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="1ep",
        load_path=str(tmp_path / "w.pt"),  # load_weights_only not set: the file decides
        progress_bar=False,
    )
    assert fresh.state.timestamp.batch == 0 and fresh.state.resumed_from is None
    assert fresh.state.optimizers[0].state == {}
    expected = trained.state.model.module.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state.model.module.state_dict().items())
