"""A run stopped and resumed ends with the same weights, bit for bit, as a run never stopped (CPU, fixed seed).

The setting is chosen to catch every source of drift: a shuffled DataLoader with no explicit generator (its
order comes from torch's global RNG), dropout, AdamW, a per-batch LR scheduler, gradient accumulation and
evaluation metrics.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cairn import Callback, Trainer
from cairn.checkpoint import read_checkpoint
from cairn.models import Classifier
from conftest import TinyNet, make_dataset, make_loader, params_of

SEED = 42
EPOCHS = "3ep"  # 4 batches an epoch: 12 batches


class Crash(RuntimeError):
    """Stands in for a node dying: raised from a callback, it ends fit() without any cleanup."""


class CrashAt(Callback):
    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            raise Crash(f"simulated failure after batch {self.batch}")


class CountingDataset(Dataset):
    """Counts reads, to show that skipped batches are not loaded again."""

    def __init__(self) -> None:
        self.inner = make_dataset(n=32)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> Any:
        self.reads += 1
        return self.inner[index]


def _trainer(max_duration: str, *, loader: DataLoader | None = None, init_seed: int = 0, **kwargs: Any) -> Trainer:
    torch.manual_seed(init_seed)  # a resumed run starts from other weights: the checkpoint must replace them
    net = TinyNet(hidden=16, dropout=0.3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
    return Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=loader or make_loader(n=32, batch_size=8, shuffle=True),
        eval_dataloader=make_loader(n=16, batch_size=8, seed=3),
        max_duration=max_duration,
        optimizers=optimizer,
        schedulers=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.97**step),
        device="cpu",
        device_train_microbatch_size=3,  # 8 = 3 + 3 + 2: uneven on purpose
        seed=SEED,
        progress_bar=False,
        **kwargs,
    )


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, torch.Tensor]:
    trainer = _trainer(EPOCHS)
    trainer.fit()
    return params_of(trainer.state.model)


def _assert_bit_identical(resumed: Trainer, expected: dict[str, torch.Tensor]) -> None:
    assert resumed.state.timestamp.batch == 12 and resumed.state.timestamp.epoch == 3
    got = params_of(resumed.state.model)
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert different == [], f"weights differ from the uninterrupted run: {different}"


def test_resume_at_an_epoch_boundary_is_bit_identical(tmp_path, uninterrupted) -> None:
    first = _trainer("1ep", save_folder=str(tmp_path), save_filename="ep{epoch}.pt")
    first.fit()
    resumed = _trainer(EPOCHS, init_seed=1, load_path=str(tmp_path / "ep1.pt"))
    assert resumed.state.timestamp.epoch == 1
    resumed.fit()
    _assert_bit_identical(resumed, uninterrupted)


@pytest.mark.parametrize("stop_batch", [1, 2, 3, 6])
def test_resume_mid_epoch_is_bit_identical(tmp_path, uninterrupted, stop_batch: int) -> None:
    first = _trainer(f"{stop_batch}ba", save_folder=str(tmp_path), save_interval="1ba")
    first.fit()
    assert first.state.timestamp.batch_in_epoch == stop_batch % 4
    resumed = _trainer(EPOCHS, init_seed=1, save_folder=str(tmp_path), save_interval="1ba", autoresume=True)
    assert resumed.state.timestamp.batch == stop_batch
    resumed.fit()
    _assert_bit_identical(resumed, uninterrupted)


def test_resume_after_a_crash_continues_from_the_last_checkpoint(tmp_path, uninterrupted) -> None:
    crashing = _trainer(EPOCHS, save_folder=str(tmp_path), save_interval="2ba", callbacks=CrashAt(batch=7))
    with pytest.raises(Crash):
        crashing.fit()
    latest = os.path.join(str(tmp_path), "latest-rank0.pt")
    assert read_checkpoint(latest)["state"]["timestamp"]["batch"] == 6
    resumed = _trainer(EPOCHS, init_seed=1, save_folder=str(tmp_path), save_interval="2ba", autoresume=True)
    assert resumed.state.timestamp.batch == 6 and resumed.state.timestamp.batch_in_epoch == 2
    resumed.fit()
    _assert_bit_identical(resumed, uninterrupted)


def test_resume_from_the_last_batch_of_an_epoch_finishes_that_epoch(tmp_path, uninterrupted) -> None:
    first = _trainer("8ba", save_folder=str(tmp_path), save_interval="1ba", save_filename="ba{batch}.pt")
    first.fit()
    resumed = _trainer(EPOCHS, init_seed=1, load_path=str(tmp_path / "ba4.pt"))
    assert (resumed.state.timestamp.epoch, resumed.state.timestamp.batch_in_epoch) == (0, 4)
    resumed.fit()
    _assert_bit_identical(resumed, uninterrupted)


def test_mid_epoch_resume_skips_batches_without_loading_them(tmp_path) -> None:
    dataset = CountingDataset()
    _trainer("2ba", loader=DataLoader(dataset, batch_size=8, shuffle=True), save_folder=str(tmp_path)).fit()
    fresh = CountingDataset()
    resumed = _trainer(
        "1ep", loader=DataLoader(fresh, batch_size=8, shuffle=True), save_folder=str(tmp_path), autoresume=True
    )
    resumed.fit()
    assert fresh.reads == 16, "only the two batches left in the epoch are read"


@pytest.mark.slow
def test_mid_epoch_resume_with_worker_processes_is_bit_identical(tmp_path) -> None:
    def loader() -> DataLoader:
        return DataLoader(make_dataset(n=32), batch_size=8, shuffle=True, num_workers=1)

    whole = _trainer("2ep", loader=loader())
    whole.fit()
    _trainer("3ba", loader=loader(), save_folder=str(tmp_path), save_interval="1ba").fit()
    resumed = _trainer("2ep", loader=loader(), init_seed=1, save_folder=str(tmp_path), autoresume=True)
    resumed.fit()
    expected, got = params_of(whole.state.model), params_of(resumed.state.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resumed_eval_metrics_and_schedule_match(tmp_path) -> None:
    whole = _trainer("2ep")
    whole.fit()
    _trainer("5ba", save_folder=str(tmp_path), save_interval="1ba").fit()
    resumed = _trainer("2ep", init_seed=1, save_folder=str(tmp_path), autoresume=True)
    resumed.fit()
    assert resumed.state.optimizers[0].param_groups[0]["lr"] == whole.state.optimizers[0].param_groups[0]["lr"]
    for name in ("MulticlassAccuracy",):
        assert torch.equal(
            resumed.state.eval_metrics["eval"][name].compute(), whole.state.eval_metrics["eval"][name].compute()
        )
        assert torch.equal(resumed.state.train_metrics[name].compute(), whole.state.train_metrics[name].compute())


@pytest.mark.parametrize("stop_batch", [2, 4, 6])
def test_a_loader_with_its_own_generator_resumes_bit_identical(tmp_path, stop_batch: int) -> None:
    def loader() -> DataLoader:  # a restarted script seeds its generator afresh, as it did the first time
        return DataLoader(make_dataset(n=32), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(9))

    whole = _trainer(EPOCHS, loader=loader())
    whole.fit()
    _trainer(f"{stop_batch}ba", loader=loader(), save_folder=str(tmp_path), save_interval="1ba").fit()
    resumed = _trainer(EPOCHS, loader=loader(), init_seed=1, save_folder=str(tmp_path), autoresume=True)
    resumed.fit()
    _assert_bit_identical(resumed, params_of(whole.state.model))
