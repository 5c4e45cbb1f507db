"""The first run a new user makes: a small CNN learns scikit-learn's handwritten digits, and survives a kill -9.

Run it with ``make demo``, ``cairn demo`` or ``python -m cairn.demo``. The data (1,797 8x8 images) ships inside
scikit-learn, so nothing is downloaded. The run checkpoints every epoch; a child process trains until it kills
itself with SIGKILL part-way (as a dying node would), a new run resumes with ``autoresume=True``, and its final
weights are compared, bit for bit, with a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from cairn.core import Callback, State
from cairn.loggers import Logger
from cairn.models import Classifier
from cairn.trainer import Trainer
from cairn.utils import seed_all
from cairn.utils.dist import get_rank, get_world_size

__all__ = ["DigitsCNN", "add_arguments", "digits_dataloaders", "main", "run", "train"]

TEST_FRACTION = 0.2


class DigitsCNN(nn.Module):
    """Two convolutions and a linear head: about 11k parameters, enough for ~97% on the digits."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 4 * 4, self.num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def digits_dataloaders(batch_size: int, split_seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders over the digits, split 80/20 by a fixed permutation (the same for every run)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the demo reads scikit-learn's bundled digits: pip install 'cairn[demo]'") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(len(labels) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    train_loader = DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(TensorDataset(images[test], labels[test]), batch_size=256)
    return train_loader, test_loader


class EpochReport(Callback):
    """Prints the test accuracy after each evaluation, above the progress bars."""

    def eval_end(self, state: State, logger: Logger) -> None:
        accuracy = state.eval_metrics["eval"]["MulticlassAccuracy"].compute().item()  # every rank joins the sync
        if get_rank() == 0:
            tqdm.write(f"epoch {state.timestamp.epoch}: test accuracy {accuracy:.2%}", file=sys.stdout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=5, help="epochs to train (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (default 32)")
    parser.add_argument("--seed", type=int, default=17, help="random seed (default 17)")
    parser.add_argument("--device", default="cpu", help="cpu (default: bit-for-bit results) or gpu")
    parser.add_argument("--workdir", default="cairn-demo", help="where checkpoints go (default ./cairn-demo)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--train-only", metavar="FOLDER", help=argparse.SUPPRESS)  # one run, checkpointing here
    parser.add_argument("--kill-at", metavar="EPOCH:BATCH", help=argparse.SUPPRESS)  # SIGKILL itself there


def run(args: argparse.Namespace) -> int:
    """Train, get killed mid-run, resume, and compare with a run that was never interrupted."""
    if args.train_only:
        train(args, save_folder=args.train_only, autoresume=True, kill_at=_parse_kill_at(args.kill_at))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_distributed(args)
    root = Path(args.workdir)
    interrupted, uninterrupted = root / "interrupted", root / "uninterrupted"
    for folder in (interrupted, uninterrupted):
        shutil.rmtree(folder, ignore_errors=True)
    batches_per_epoch = len(digits_dataloaders(args.batch_size)[0])
    kill_epoch, kill_batch = max(1, args.epochs // 2 + 1), batches_per_epoch // 2
    print(f"1/3 training with a checkpoint every epoch; the process will be killed in epoch {kill_epoch}")
    died = _train_in_child(args, interrupted, f"{kill_epoch}:{kill_batch}")
    print(f"    the training process died at epoch {kill_epoch}, batch {kill_batch}/{batches_per_epoch} ({died})")
    print("2/3 resuming with autoresume=True from the newest complete checkpoint")
    resumed, resumed_from, elapsed = train(args, save_folder=str(interrupted), autoresume=True)
    print("3/3 the same run without interruption, for comparison")
    reference, _, _ = train(args, save_folder=str(uninterrupted), autoresume=False)
    identical = _same_weights(resumed.state.model, reference.state.model)
    _print_summary(resumed, elapsed, resumed_from, identical)
    return 0 if identical else 1


def train(
    args: argparse.Namespace, *, save_folder: str, autoresume: bool, kill_at: tuple[int, int] | None = None
) -> tuple[Trainer, str | None, float]:
    """One training run of the digits CNN, checkpointing every epoch into ``save_folder``."""
    if args.device != "cpu":
        # Some CUDA kernels (cuDNN convolutions, cuBLAS) sum in a varying order; bit-for-bit needs the fixed ones.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    seed_all(args.seed)  # before the model is built, so its initial weights are the same every run
    train_loader, test_loader = digits_dataloaders(args.batch_size)
    model = Classifier(DigitsCNN(), num_classes=DigitsCNN.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total_batches = args.epochs * len(train_loader)
    callbacks: list[Callback] = [EpochReport()]
    if kill_at is not None:
        callbacks.append(KillAt(*kill_at))
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=test_loader,
        max_duration=f"{args.epochs}ep",
        optimizers=optimizer,
        schedulers=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_batches),
        seed=args.seed,
        device=args.device,
        callbacks=callbacks,
        progress_bar=not args.no_progress,
        run_name="digits",
        save_folder=save_folder,
        save_interval="1ep",
        autoresume=autoresume,
    )
    resumed_from = trainer.state.resumed_from
    if resumed_from and get_rank() == 0:
        stamp = trainer.state.timestamp
        print(f"    resuming from {resumed_from} (epoch {stamp.epoch}, batch {stamp.batch})")
    started = time.perf_counter()
    trainer.fit()
    return trainer, resumed_from, time.perf_counter() - started


def _run_distributed(args: argparse.Namespace) -> int:
    """Under torchrun: one run across every rank, checkpointing each epoch; run it again to see it resume."""
    folder = str(Path(args.workdir) / "distributed")
    trainer, resumed_from, elapsed = train(args, save_folder=folder, autoresume=True)
    state = trainer.state
    accuracy = state.eval_metrics["eval"]["MulticlassAccuracy"].compute().item()
    if get_rank() == 0:
        print()
        print(f"run {state.run_name} on {get_world_size()} processes, each training on its share of the digits")
        print(f"  {'resumed from ' + resumed_from if resumed_from else 'started fresh'}; {elapsed:.1f}s of training")
        print(f"  {state.timestamp.epoch} epochs, {state.timestamp.batch} batches per rank")
        print(f"  final test accuracy {accuracy:.2%}; checkpoints in {folder} (run it again: it resumes from there)")
    return 0


class KillAt(Callback):
    """Ends its own process with SIGKILL, as a dying node would: no cleanup, no exception handlers."""

    def __init__(self, epoch: int, batch_in_epoch: int) -> None:
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch

    def batch_end(self, state: State, logger: Logger) -> None:
        if state.timestamp.epoch + 1 == self.epoch and state.timestamp.batch_in_epoch == self.batch_in_epoch:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _parse_kill_at(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    epoch, batch = text.split(":")
    return int(epoch), int(batch)


def _train_in_child(args: argparse.Namespace, folder: Path, kill_at: str) -> str:
    command = [sys.executable, "-m", "cairn.demo", "--train-only", str(folder), "--kill-at", kill_at]
    command += ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    command += ["--device", args.device] + (["--no-progress"] if args.no_progress else [])
    sys.stdout.flush()
    returncode = subprocess.run(command, check=False).returncode
    if returncode != -signal.SIGKILL:
        raise SystemExit(f"the demo's training process should have been killed, but it exited with {returncode}")
    return "killed by SIGKILL"


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _print_summary(trainer: Trainer, elapsed: float, resumed_from: str | None, identical: bool) -> None:
    state = trainer.state
    timestamp = state.timestamp
    parameters = sum(p.numel() for p in state.model.parameters())
    accuracy = state.eval_metrics["eval"]["MulticlassAccuracy"].compute().item()
    print()
    print(f"run {state.run_name}: a {parameters:,}-parameter CNN on scikit-learn's handwritten digits")
    print(f"  killed mid-run, resumed from {resumed_from or 'nothing (no checkpoint yet)'}")
    print(f"  {timestamp.epoch} epochs, {timestamp.batch} batches, {timestamp.sample:,} samples")
    print(f"  the resumed part took {elapsed:.1f}s")
    print(f"  final test accuracy {accuracy:.2%} (seed {state.rank_zero_seed})")
    verdict = "yes, bit for bit" if identical else "NO - they differ"
    print(f"  resumed run's final weights equal the uninterrupted run's: {verdict}")
    print(f"  checkpoints: {trainer.saved_checkpoints[-1]} and its folder")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cairn.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
