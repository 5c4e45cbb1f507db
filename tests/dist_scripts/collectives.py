"""Counts the collectives each training batch costs, on every rank of a torchrun launch (tests/test_agreement.py).

Two runs, one after the other in the same process group:

- ``asked``: a saver on a wall-clock interval (rank 0 must decide for every rank), one whose function says yes on
  rank 1 alone (rank 0's no must win everywhere), a saver every 100 batches, and ``save_on_preemption``;
- ``alike``: the saver every 100 batches alone, no preemption watch.

With ``--bucket`` (a bucket of the S3 server whose endpoint is ``S3_ENDPOINT_URL``), one more:

- ``uploading``: FSDP with sharded folders saved asynchronously to ``s3://<bucket>/run`` every 4 batches, 15 batches:
  each folder's shard uploads are in flight for a batch or more after its save;

Every ``torch.distributed`` collective that Python code calls on the training thread is counted (DDP's gradient
reduction runs in C++ and is not; an async save's background thread shares its outcome over a group of its own, once
per save, at a moment of its own); rank 0 writes, per run, the collectives made between consecutive batch starts, as
JSON, to ``--out/collectives.json``, and for ``uploading`` how many folders were in flight at each batch start. In
``asked`` and ``alike`` no save falls inside those batches: the only save is the run's end.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import threading

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
            if threading.current_thread() is threading.main_thread():
                CALLS[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


class CountPerBatch(Callback):
    def __init__(self, saver: CheckpointSaver | None = None) -> None:
        self.snapshots: list[dict[str, int]] = []
        self.saver = saver
        self.in_flight: list[int] = []  #: the saver's sharded folders uploading at each batch start
        self.watching: list[bool] = []  #: whether the saver watched its uploads (some rank's may be in flight)

    def batch_start(self, state, logger) -> None:
        self.snapshots.append(dict(CALLS))
        if self.saver is not None and hasattr(self.saver, "upload_notes"):  # not on the code before it
            self.in_flight.append(len(self.saver.upload_notes().records))
        if self.saver is not None and hasattr(self.saver, "watches_uploads"):  # not on the code before it
            self.watching.append(self.saver.watches_uploads)

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


def run_uploading(bucket: str) -> dict[str, list]:
    """Sharded folders saved asynchronously to the store: the batches while one uploads."""
    torch.manual_seed(0)
    counter = CountPerBatch()
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=DataLoader(make_dataset(n=64), batch_size=4),
        max_duration="15ba",
        callbacks=[counter],
        device="cpu",
        seed=1,
        run_name="shards",
        progress_bar=False,
        save_folder=f"s3://{bucket}/run",
        save_interval="4ba",
        save_async=True,
        parallelism_config={"fsdp": {"state_dict_type": "sharded"}},
    )
    counter.saver = next(c for c in trainer.state.callbacks if isinstance(c, CheckpointSaver))
    trainer.fit()
    trainer.close()
    return {"calls": counter.per_batch(), "in_flight": counter.in_flight[:-1], "watching": counter.watching[:-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--bucket", help="a bucket of the S3 server at S3_ENDPOINT_URL: the sharded runs too")
    args = parser.parse_args()
    count_collectives()
    found: dict[str, object] = {mode: run(args.out, mode) for mode in ("asked", "alike")}
    if args.bucket:
        found["uploading"] = run_uploading(args.bucket)
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(args.out, "collectives.json"), "w") as file:
            json.dump(found, file)


if __name__ == "__main__":
    main()
