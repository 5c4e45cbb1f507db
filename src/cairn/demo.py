"""The first run a new user makes: a small CNN learns scikit-learn's handwritten digits.

Run it with ``make demo``, ``cairn demo`` or ``python -m cairn.demo``. The data (1,797 8x8 images) ships inside
scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from cairn.core import Callback, State
from cairn.loggers import InMemoryLogger, Logger
from cairn.models import Classifier
from cairn.trainer import Trainer
from cairn.utils import seed_all

__all__ = ["DigitsCNN", "add_arguments", "digits_dataloaders", "main", "run"]

ACCURACY = "metrics/eval/MulticlassAccuracy"
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
        accuracy = state.eval_metrics["eval"]["MulticlassAccuracy"].compute().item()
        tqdm.write(f"epoch {state.timestamp.epoch}: test accuracy {accuracy:.2%}", file=sys.stdout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=5, help="epochs to train (default 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (default 32)")
    parser.add_argument("--seed", type=int, default=17, help="random seed (default 17)")
    parser.add_argument("--device", default=None, help="cpu or gpu (default: the GPU when one is visible)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run(args: argparse.Namespace) -> int:
    seed_all(args.seed)  # before the model is built, so its initial weights are the same every run
    train_loader, test_loader = digits_dataloaders(args.batch_size)
    model = Classifier(DigitsCNN(), num_classes=DigitsCNN.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total_batches = args.epochs * len(train_loader)
    history = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=test_loader,
        max_duration=f"{args.epochs}ep",
        optimizers=optimizer,
        schedulers=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_batches),
        seed=args.seed,
        device=args.device,
        callbacks=EpochReport(),
        loggers=history,
        progress_bar=not args.no_progress,
    )
    started = time.perf_counter()
    trainer.fit()
    elapsed = time.perf_counter() - started
    _print_summary(trainer.state, history, elapsed, len(train_loader.dataset), len(test_loader.dataset))  # type: ignore[arg-type]
    return 0


def _print_summary(state: State, history: InMemoryLogger, elapsed: float, n_train: int, n_test: int) -> None:
    timestamp = state.timestamp
    parameters = sum(p.numel() for p in state.model.parameters())
    print()
    print(f"run {state.run_name}: trained a {parameters:,}-parameter CNN on {n_train} handwritten digits")
    print(f"  {timestamp.epoch} epochs, {timestamp.batch} batches, {timestamp.sample:,} samples in {elapsed:.1f}s")
    accuracy = history.latest[ACCURACY]
    print(f"  final test accuracy {accuracy:.2%} on {n_test} held-out digits (seed {state.rank_zero_seed})")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cairn.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
