"""A training script for tests/test_resume_world_size.py, launched with torchrun: a sample-ID ledger.

It trains the shared tiny MLP (with dropout) on a plain shuffled ``DataLoader`` over a map-style dataset whose
samples carry their own ID; the Trainer splits it between the ranks (``DistributedSampler``). Every rank appends
one JSON line per batch it trains to ``--out/ledger-rank<r>.jsonl`` (its epoch and sample IDs, and on the first
batch this process trains, one draw of torch's global generator: where that rank's random state starts). A
construction refused with ``CheckpointIncompatibleError`` is written to ``--out/refused-rank<r>.txt`` on every rank,
which then exits cleanly (or, told to, builds the Trainer again with ``load_at_epoch_boundary=True``, as the
refusal offers, and trains), so the test sees each rank's own refusal (not torchrun's teardown of the others); a
rank that finished training writes ``--out/finished-rank<r>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.errors import CheckpointIncompatibleError  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import IndexedDataset, TinyNet  # noqa: E402


class Ledger(Callback):
    """One JSON line per batch this rank trains, flushed at once: a run killed afterwards still has its ledger."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.first = True

    def after_dataloader(self, state, logger) -> None:
        line = {"epoch": int(state.timestamp.epoch), "ids": [int(i) for i in state.batch[2]]}
        if self.first:  # before the forward pass draws its dropout mask: the generator as the run left it to us
            line["rand"] = torch.rand(1).item()
            self.first = False
        with open(self.path, "a") as file:
            file.write(json.dumps(line) + "\n")
            file.flush()


class TripleClassifier(Classifier):
    def forward(self, batch):
        return self.module(batch[0])

    def loss(self, outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch[1])

    def update_metric(self, batch, outputs, metric) -> None:
        metric.update(outputs, batch[1])


def build(args: argparse.Namespace, rank: int, *, at_epoch_boundary: bool) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=TripleClassifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=DataLoader(IndexedDataset(args.samples), batch_size=4, shuffle=True),
        max_duration=args.max_duration,
        device="cpu",
        seed=11,
        run_name="ledger",
        progress_bar=False,
        callbacks=[Ledger(os.path.join(args.out, f"ledger-rank{rank}.jsonl"))],
        save_folder=args.save_folder,
        save_interval="1ba",
        load_path=args.load_path,
        load_at_epoch_boundary=at_epoch_boundary,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-duration", required=True)
    parser.add_argument("--save-folder")
    parser.add_argument("--load-path")
    parser.add_argument("--at-epoch-boundary", action="store_true", help="load_at_epoch_boundary=True")
    parser.add_argument(
        "--then-at-epoch-boundary", action="store_true", help="refused: build again with load_at_epoch_boundary=True"
    )
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    try:
        trainer = build(args, rank, at_epoch_boundary=args.at_epoch_boundary)
    except CheckpointIncompatibleError as err:
        with open(os.path.join(args.out, f"refused-rank{rank}.txt"), "w") as file:
            file.write(str(err))
        if not args.then_at_epoch_boundary:
            return
        trainer = build(args, rank, at_epoch_boundary=True)  # what the refusal offers, in the same processes
    trainer.fit()
    trainer.close()
    with open(os.path.join(args.out, f"finished-rank{rank}"), "w"):
        pass  # the run is over: a launch that fails after this failed in torch's teardown, not in training


if __name__ == "__main__":
    main()
