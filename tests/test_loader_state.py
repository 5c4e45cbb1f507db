"""A data loader that can say where it stands is resumed from that state, per rank, with no batch fetched twice;
one that cannot is replayed, loudly (issue 20, points 1 and 2).

Each dataset here writes the index of every sample it reads to a file (worker processes included), so a test sees
exactly what a resumed run fetched: a replay shows up as samples read before the resume point.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from cairn import Callback, Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.cli.main import main as cli_main
from cairn.errors import CheckpointCorruptError, CheckpointIncompatibleError
from cairn.models import Classifier
from conftest import TinyNet, make_dataset, params_of

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13

SAMPLES = 48
BATCH = 4  # 12 batches an epoch
STOP_AT = 17  # batch 5 of the second epoch


class Crash(RuntimeError):
    """Stands in for a node dying: raised from a callback, it ends fit() without any cleanup."""


class CrashAfter(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_start(self, state: Any, logger: Any) -> None:  # the next batch: this one's checkpoint is written
        if state.timestamp.batch == self.batch:
            raise Crash(f"simulated failure after batch {self.batch}")


def _note_read(log_file: Path, index: int) -> None:
    with open(log_file, "a") as file:  # one short append per read: whole lines, from any worker process
        file.write(f"{index}\n")


def _reads(log_file: Path) -> list[int]:
    return [int(line) for line in log_file.read_text().split()] if log_file.exists() else []


class LoggedDataset(Dataset):
    """A map-style dataset that notes every sample read."""

    def __init__(self, log_file: Path) -> None:
        self.inner = make_dataset(n=SAMPLES)
        self.log_file = log_file

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> Any:
        _note_read(self.log_file, index)
        return self.inner[index]


class LoggedStream(IterableDataset):
    """An iterable dataset that knows how far it has read: each worker takes every n-th sample and remembers how
    many it has yielded (StatefulDataLoader keeps one such state per worker)."""

    def __init__(self, log_file: Path) -> None:
        self.inner = make_dataset(n=SAMPLES)
        self.log_file = log_file
        self.yielded = 0

    def __iter__(self) -> Any:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = list(range(worker, SAMPLES, workers))
        while self.yielded < len(mine):
            index = mine[self.yielded]
            self.yielded += 1
            _note_read(self.log_file, index)
            yield self.inner[index]
        self.yielded = 0  # the next epoch starts from the beginning

    def state_dict(self) -> dict[str, int]:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.yielded = state["yielded"]


class UnplainStream(LoggedStream):
    def state_dict(self) -> dict[str, Any]:
        return {"yielded": self.yielded, "opened": open}  # a function: torch.load(weights_only=True) refuses it


def _trainer(loader: Any, folder: Path, **kwargs: Any) -> Trainer:
    torch.manual_seed(0)  # a resumed run starts from other weights: the checkpoint must replace them
    return Trainer(
        model=Classifier(TinyNet(hidden=16, dropout=0.3), num_classes=3),
        train_dataloader=loader,
        max_duration="2ep",
        device="cpu",
        seed=42,
        save_folder=str(folder),
        save_interval="1ba",
        save_num_checkpoints_to_keep=2,
        **{"progress_bar": False, **kwargs},
    )


def _stopped_and_resumed(
    make_loader: Any, tmp_path: Path, stop_at: int = STOP_AT, **kwargs: Any
) -> tuple[Trainer, Trainer, list[int]]:
    """(the uninterrupted run, the resumed run, the samples the resumed run read)."""

    def seeded_loader(log_file: Path) -> Any:
        torch.manual_seed(7)  # torchdata's sampler draws its generator's seed when it is built, as users build it
        return make_loader(log_file)

    whole = _trainer(seeded_loader(tmp_path / "whole.log"), tmp_path / "whole")
    whole.fit()
    stopped = _trainer(seeded_loader(tmp_path / "stopped.log"), tmp_path / "ckpt", callbacks=[CrashAfter(stop_at)])
    with pytest.raises(Crash):
        stopped.fit()
    stopped.close()
    resumed = _trainer(seeded_loader(tmp_path / "resumed.log"), tmp_path / "ckpt", autoresume=True, **kwargs)
    assert int(resumed.state.timestamp.batch) == stop_at
    resumed.fit()
    return whole, resumed, _reads(tmp_path / "resumed.log")


def _assert_same_weights(a: Trainer, b: Trainer) -> None:
    left, right = params_of(a.state.model), params_of(b.state.model)
    assert all(torch.equal(left[name], right[name]) for name in left), "the resumed run ended with other weights"


LEFT_AFTER_STOP = SAMPLES - (STOP_AT - SAMPLES // BATCH) * BATCH  # samples of the second epoch still to train


def test_a_stateful_dataloader_with_workers_resumes_from_its_state_without_replaying(tmp_path: Path) -> None:
    def loader(log_file: Path) -> StatefulDataLoader:
        return StatefulDataLoader(LoggedDataset(log_file), batch_size=BATCH, shuffle=True, num_workers=2)

    whole, resumed, reads = _stopped_and_resumed(loader, tmp_path)
    _assert_same_weights(whole, resumed)
    assert len(reads) == LEFT_AFTER_STOP  # only what was left of the epoch: none of the 5 batches before it
    saved = read_checkpoint(str(tmp_path / "ckpt" / "latest-rank0.pt"))["state"]["dataset_state"]["loader_states"]
    assert len(saved) == 1 and set(saved[0]) == {"loader"}  # one rank, its loader's own state
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert cli_main(["ckpt", "show", str(tmp_path / "ckpt" / "latest-rank0.pt")]) == 0
    assert "loader      state saved for 1 rank (loader)" in shown.getvalue()


def test_a_stateful_dataloader_resumed_at_an_epoch_boundary_shuffles_the_next_epoch_as_the_whole_run_did(
    tmp_path: Path,
) -> None:
    """Its sampler's generator is its own, seeded when the loader was built: only the saved state brings it back."""

    def loader(log_file: Path) -> StatefulDataLoader:
        return StatefulDataLoader(LoggedDataset(log_file), batch_size=BATCH, shuffle=True, num_workers=2)

    whole, resumed, reads = _stopped_and_resumed(loader, tmp_path, stop_at=SAMPLES // BATCH)
    _assert_same_weights(whole, resumed)
    assert len(reads) == SAMPLES


def test_an_iterable_dataset_with_state_resumes_in_a_stateful_dataloader_with_workers(tmp_path: Path) -> None:
    def loader(log_file: Path) -> StatefulDataLoader:
        return StatefulDataLoader(LoggedStream(log_file), batch_size=BATCH, num_workers=2)

    whole, resumed, reads = _stopped_and_resumed(loader, tmp_path)
    _assert_same_weights(whole, resumed)
    assert len(reads) == LEFT_AFTER_STOP


def test_a_plain_dataloader_in_the_main_process_resumes_from_its_datasets_state(tmp_path: Path) -> None:
    def loader(log_file: Path) -> DataLoader:
        return DataLoader(LoggedStream(log_file), batch_size=BATCH)

    whole, resumed, reads = _stopped_and_resumed(loader, tmp_path)
    _assert_same_weights(whole, resumed)
    assert reads == list(range(SAMPLES - LEFT_AFTER_STOP, SAMPLES))  # it continued at the next sample


def test_a_loader_without_state_is_replayed_with_a_warning_that_says_how_to_avoid_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Stateless(IterableDataset):
        def __init__(self, log_file: Path) -> None:
            self.stream = LoggedStream(log_file)

        def __iter__(self) -> Any:
            return iter(self.stream)

    def loader(log_file: Path) -> DataLoader:
        return DataLoader(Stateless(log_file), batch_size=BATCH, num_workers=2)

    with caplog.at_level(logging.WARNING, logger="cairn.trainer.dataloader"):
        whole, resumed, reads = _stopped_and_resumed(loader, tmp_path)
    _assert_same_weights(whole, resumed)
    assert len(reads) == SAMPLES  # the 5 batches before the resume point were fetched again
    warnings = [r.getMessage() for r in caplog.records if "fetches and throws away" in r.getMessage()]
    assert len(warnings) == 1 and "StatefulDataLoader" in warnings[0] and "batch 5 of epoch 1" in warnings[0]


def test_a_stateful_dataset_behind_worker_processes_is_replayed_and_the_warning_names_the_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In a plain DataLoader with workers the dataset's state lives in the workers' copies: not trusted."""

    def loader(log_file: Path) -> DataLoader:
        return DataLoader(LoggedStream(log_file), batch_size=BATCH, num_workers=2)

    with caplog.at_level(logging.WARNING, logger="cairn.trainer.dataloader"):
        whole, resumed, _ = _stopped_and_resumed(loader, tmp_path)
    _assert_same_weights(whole, resumed)
    message = next(r.getMessage() for r in caplog.records if "fetches and throws away" in r.getMessage())
    assert "its dataset offer state_dict(), but with num_workers=2" in message


def test_a_checkpoint_of_a_stateful_loader_refuses_a_loader_of_another_kind_when_the_trainer_is_built(
    tmp_path: Path,
) -> None:
    stopped = _trainer(
        StatefulDataLoader(LoggedDataset(tmp_path / "a.log"), batch_size=BATCH, num_workers=0),
        tmp_path / "ckpt",
        callbacks=[CrashAfter(3)],
    )
    with pytest.raises(Crash):
        stopped.fit()
    stopped.close()
    plain = DataLoader(LoggedStream(tmp_path / "b.log"), batch_size=BATCH)  # its state is the dataset's
    with pytest.raises(CheckpointIncompatibleError, match="holds the state of the data loader's loader, but this"):
        _trainer(plain, tmp_path / "ckpt", autoresume=True)


def test_a_loader_state_that_is_not_plain_data_is_refused_at_the_first_save(tmp_path: Path) -> None:
    trainer = _trainer(DataLoader(UnplainStream(tmp_path / "a.log"), batch_size=BATCH), tmp_path / "ckpt")
    refusal = r"train_dataloader's dataset.state_dict\(\) holds a value of type builtin_function"
    with pytest.raises(TypeError, match=refusal):
        trainer.fit()
    trainer.close()
    assert not (tmp_path / "ckpt" / "latest-rank0.pt").exists()


def test_load_at_epoch_boundary_starts_a_mid_epoch_checkpoint_at_the_next_epoch(tmp_path: Path) -> None:
    def loader(log_file: Path) -> DataLoader:
        return DataLoader(LoggedStream(log_file), batch_size=BATCH)

    stopped = _trainer(loader(tmp_path / "a.log"), tmp_path / "ckpt", callbacks=[CrashAfter(3)])
    with pytest.raises(Crash):
        stopped.fit()
    stopped.close()
    resumed = _trainer(loader(tmp_path / "b.log"), tmp_path / "ckpt", autoresume=True, load_at_epoch_boundary=True)
    stamp = resumed.state.timestamp
    assert (int(stamp.epoch), int(stamp.batch_in_epoch), int(stamp.batch)) == (1, 0, 3)
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 3 + SAMPLES // BATCH  # one whole epoch more, from its start
    assert _reads(tmp_path / "b.log") == list(range(SAMPLES))


def test_loader_states_for_another_number_of_ranks_are_refused_as_damage(tmp_path: Path) -> None:
    stopped = _trainer(
        DataLoader(LoggedStream(tmp_path / "a.log"), batch_size=BATCH), tmp_path / "ckpt", callbacks=[CrashAfter(3)]
    )
    with pytest.raises(Crash):
        stopped.fit()
    stopped.close()
    path = tmp_path / "ckpt" / "latest-rank0.pt"
    checkpoint = torch.load(path, weights_only=True)
    states = checkpoint["state"]["dataset_state"]["loader_states"]
    checkpoint["state"]["dataset_state"]["loader_states"] = [copy.deepcopy(states[0]) for _ in range(3)]  # 3 ranks'

    torch.save(seal(checkpoint), tmp_path / "edited.pt")
    with pytest.raises(CheckpointCorruptError, match="holds data-loader states for 3 ranks, but it was saved by 1"):
        _trainer(
            DataLoader(LoggedStream(tmp_path / "b.log"), batch_size=BATCH),
            tmp_path / "other",
            load_path=str(tmp_path / "edited.pt"),
        )


def test_a_replay_shows_a_progress_bar_when_the_run_shows_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def loader() -> DataLoader:
        return DataLoader(LoggedStream(tmp_path / "reads.log"), batch_size=BATCH, num_workers=1)

    stopped = _trainer(loader(), tmp_path / "ckpt", callbacks=[CrashAfter(3)])
    with pytest.raises(Crash):
        stopped.fit()
    stopped.close()
    capsys.readouterr()
    resumed = _trainer(loader(), tmp_path / "ckpt", autoresume=True, progress_bar=True)
    resumed.fit()
    resumed.close()
    assert "replaying batches" in capsys.readouterr().err


def test_a_saved_state_the_dataset_refuses_is_a_clear_error(tmp_path: Path) -> None:
    stopped = _trainer(
        DataLoader(LoggedStream(tmp_path / "a.log"), batch_size=BATCH), tmp_path / "ckpt", callbacks=[CrashAfter(3)]
    )
    with pytest.raises(Crash):
        stopped.fit()
    stopped.close()
    checkpoint = torch.load(tmp_path / "ckpt" / "latest-rank0.pt", weights_only=True)
    checkpoint["state"]["dataset_state"]["loader_states"] = [{"dataset": {"offset": 12}}]  # not the key it reads
    torch.save(seal(checkpoint), tmp_path / "edited.pt")
    resumed = _trainer(
        DataLoader(LoggedStream(tmp_path / "b.log"), batch_size=BATCH),
        tmp_path / "other",
        load_path=str(tmp_path / "edited.pt"),
    )
    with pytest.raises(CheckpointIncompatibleError, match="train_dataloader's dataset refused the state it saved"):
        resumed.fit()
    resumed.close()
