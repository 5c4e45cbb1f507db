"""Counts the collectives each training batch costs, on every rank of a torchrun launch (tests/test_agreement.py).

Two runs, one after the other in the same process group:

- ``asked``: a saver on a wall-clock interval (rank 0 must decide for every rank), one whose function says yes on
  rank 1 alone (rank 0's no must win everywhere), a saver every 100 batches, and ``save_on_preemption``;
- ``alike``: the saver every 100 batches alone, no preemption watch.

Every ``torch.distributed`` collective that Python code calls is counted (DDP's gradient reduction runs in C++ and
is not); rank 0 writes, per run, the collectives made between consecutive batch starts, as JSON, to
``--out/collectives.json``. No save falls inside those batches: the only save is the run's end.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.callbacks import CheckpointSaver  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import TinyNet, make_dataset  # noqa: E402

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "reduce",
    "barrier",
    "monitored_barrier",
)
CALLS: collections.Counter[str] = collections.Counter()


def count_collectives() -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, _name=name, _original=original, **kwargs):
            CALLS[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


class CountPerBatch(Callback):
    def __init__(self) -> None:
        self.snapshots: list[dict[str, int]] = []

    def batch_start(self, state, logger) -> None:
        self.snapshots.append(dict(CALLS))

    def per_batch(self) -> list[dict[str, int]]:
        pairs = zip(self.snapshots, self.snapshots[1:], strict=False)
        return [{k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
                for before, after in pairs]  # fmt: skip


def on_rank_one(state, event) -> bool:
    return int(os.environ.get("RANK", 0)) == 1


def run(out: str, mode: str) -> list[dict[str, int]]:
    torch.manual_seed(0)
    counter = CountPerBatch()
    intervals = {"every": "100ba"} if mode == "alike" else {"every": "100ba", "clock": "1h", "rank1": on_rank_one}
    savers = [
        CheckpointSaver(os.path.join(out, mode, name), filename="ba{batch}.pt", save_interval=interval)
        for name, interval in intervals.items()
    ]
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=DataLoader(make_dataset(n=64), batch_size=4),
        max_duration="7ba",
        callbacks=[*savers, counter],
        save_on_preemption=mode == "asked",
        device="cpu",
        seed=1,
        progress_bar=False,
    )
    trainer.fit()
    trainer.close()
    return counter.per_batch()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    count_collectives()
    found = {mode: run(args.out, mode) for mode in ("asked", "alike")}
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(args.out, "collectives.json"), "w") as file:
            json.dump(found, file)


if __name__ == "__main__":
    main()
