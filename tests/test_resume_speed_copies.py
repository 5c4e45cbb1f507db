"""Resume copies the optimizer state out of the file once, while the file is read, and only after the hash passes.

``read_checkpoint(for_resume=True)`` (what the Trainer's ``load_path`` and autoresume use) copies the optimizer
state out of the file's mapping on a second thread while the hash walks the file, so that the copy an optimizer
needs (it keeps the tensors it is given) overlaps the disk read instead of following it. These tests pin what that
must not change: one copy, not two; private memory, not the file; a bad file refused before anything is applied,
with no thread left behind.
"""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.load import loader
from cairn.checkpoint.load.loader import apply_checkpoint
from cairn.errors import CheckpointCorruptError
from cairn.models import Classifier
from conftest import TinyNet, make_loader, params_of


def make_trainer(net: nn.Module, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_duration", "2ba")
    return Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(),
        optimizers=torch.optim.AdamW(net.parameters(), lr=1e-3),
        progress_bar=False,
        seed=1,
        **kwargs,
    )


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cairn checkpoint of TinyNet after two AdamW steps (treat as read-only)."""
    trainer = make_trainer(TinyNet(), save_folder=str(tmp_path_factory.mktemp("saved")))
    trainer.fit()
    trainer.close()
    return Path(trainer.saved_checkpoints[-1])


def optimizer_tensors(checkpoint: dict[str, Any]) -> list[torch.Tensor]:
    optimizer = next(iter(checkpoint["state"]["optimizers"].values()))
    return [value for fields in optimizer["state"].values() for value in fields.values() if torch.is_tensor(value)]


def copying_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "cairn-copy-optimizer-state"]


def test_the_optimizer_keeps_the_copies_the_read_made_without_copying_again(checkpoint_file: Path) -> None:
    checkpoint = read_checkpoint(str(checkpoint_file), for_resume=True)
    copied = {tensor.data_ptr() for tensor in optimizer_tensors(checkpoint)}
    trainer = make_trainer(TinyNet())
    apply_checkpoint(checkpoint, trainer.state, source=str(checkpoint_file))
    held = [v for state in trainer.state.optimizers[0].state.values() for v in state.values() if torch.is_tensor(v)]
    assert held and {tensor.data_ptr() for tensor in held} == copied  # the same memory: no second copy
    trainer.close()


def test_the_copies_are_private_memory_not_the_file(checkpoint_file: Path, tmp_path: Path) -> None:
    """Overwriting the file after the read changes nothing in the copies (a mapped tensor would see the new bytes);
    the copies hold exactly what a plain read of the file holds."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(checkpoint_file.read_bytes())
    expected = [tensor.clone() for tensor in optimizer_tensors(read_checkpoint(str(path)))]
    checkpoint = read_checkpoint(str(path), for_resume=True)
    size = path.stat().st_size
    with open(path, "r+b") as file:  # the same inode, every byte changed in place
        file.write(bytes(255 - b for b in path.read_bytes()[:size]))
    got = optimizer_tensors(checkpoint)
    assert len(got) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def damaged_copy(source: Path, target: Path) -> Path:
    """The file with one byte changed inside the last tensor record (AdamW's state is saved after the model)."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        records = [info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 0]
    record = max(records, key=lambda info: info.header_offset)
    # a local header is 30 bytes plus its name and extra field; the record's bytes follow it
    name_length = int.from_bytes(data[record.header_offset + 26 : record.header_offset + 28], "little")
    extra_length = int.from_bytes(data[record.header_offset + 28 : record.header_offset + 30], "little")
    start = record.header_offset + 30 + name_length + extra_length
    data[start + record.file_size // 2] ^= 0x10
    target.write_bytes(bytes(data))
    return target


def test_a_bad_hash_applies_nothing_and_leaves_no_copying_thread(checkpoint_file: Path, tmp_path: Path) -> None:
    damaged = damaged_copy(checkpoint_file, tmp_path / "damaged.pt")
    net = TinyNet()
    before = params_of(net)
    with pytest.raises(CheckpointCorruptError, match="content hash"):
        make_trainer(net, load_path=str(damaged))
    assert params_of(net).keys() == before.keys()
    assert all(torch.equal(params_of(net)[k], before[k]) for k in before)
    assert copying_threads() == []
    with pytest.raises(CheckpointCorruptError, match="content hash"):
        read_checkpoint(str(damaged), for_resume=True)
    assert copying_threads() == []


def test_a_resume_through_the_trainer_restores_the_saved_optimizer_state(checkpoint_file: Path) -> None:
    saved = [tensor.clone() for tensor in optimizer_tensors(read_checkpoint(str(checkpoint_file)))]
    trainer = make_trainer(TinyNet(), load_path=str(checkpoint_file))
    held = [v for state in trainer.state.optimizers[0].state.values() for v in state.values() if torch.is_tensor(v)]
    assert len(held) == len(saved) and all(torch.equal(a, b) for a, b in zip(held, saved, strict=True))
    trainer.close()


def held_optimizer_tensors(trainer: Trainer) -> list[torch.Tensor]:
    optimizer = trainer.state.optimizers[0]
    return [value for fields in optimizer.state.values() for value in fields.values() if torch.is_tensor(value)]


def holds_the_reads_copies(trainer: Trainer) -> bool:
    """Every tensor the optimizer holds is one of the copies a ``for_resume`` read made (apply kept it as it was)."""
    held = held_optimizer_tensors(trainer)
    return bool(held) and all(loader._PRIVATE_COPIES.get(id(tensor)) is tensor for tensor in held)


def test_a_load_path_in_a_store_keeps_the_copies_its_read_made(s3_env: str, s3_bucket: str) -> None:
    """A download from a store is applied whole as a local file is: its optimizer state is copied while it is read."""
    saving = make_trainer(TinyNet(), save_folder=f"s3://{s3_bucket}/ckpt", save_filename="ba{batch}.pt")
    saving.fit()
    saving.close()
    resumed = make_trainer(TinyNet(), load_path=f"s3://{s3_bucket}/ckpt/ba2.pt")
    assert resumed.state.timestamp.batch == 2
    assert holds_the_reads_copies(resumed)
    resumed.close()


def test_autoresume_from_a_store_keeps_the_copies_its_read_made(
    s3_env: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = f"s3://{s3_bucket}/run"
    monkeypatch.chdir(tmp_path)  # nothing local is left behind to resume from: the store is
    saving = make_trainer(TinyNet(), save_folder=folder, save_interval="1ba", run_name="r")
    saving.fit()
    saving.close()
    elsewhere = tmp_path / "machine-b"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = make_trainer(TinyNet(), max_duration="3ba", save_folder=folder, run_name="r", autoresume=True)
    assert resumed.state.resumed_from is not None and resumed.state.resumed_from.startswith("s3://")
    assert holds_the_reads_copies(resumed)
    resumed.close()
