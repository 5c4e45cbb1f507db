"""A callback for tests/dist_scripts/train.py (``--await-shards-at``): what the store holds in the middle of a run."""

from __future__ import annotations

import os
import posixpath
import time

from cairn import Callback
from cairn.storage.uri import store_from_uri

WAIT_S = 60.0


class AwaitShards(Callback):
    """Rank 0, at one batch: waits (at most a minute) until the store holds a sharded folder's shard files of every
    rank, and writes ``stored`` or ``missing`` to ``<out>/shards-at-batch.txt``. Polling the store is waiting on
    the real signal: an async save's shards must go up once its folder is published, not at the next save."""

    def __init__(self, batch: int, save_folder: str, out: str) -> None:
        self.batch = batch
        self.save_folder = save_folder
        self.out = out

    def batch_end(self, state, logger) -> None:  # noqa: ANN001
        if state.timestamp.batch != self.batch or int(os.environ.get("RANK", 0)) != 0:
            return
        store, prefix = store_from_uri(self.save_folder)
        ranks = int(os.environ.get("WORLD_SIZE", 1))
        deadline = time.monotonic() + WAIT_S
        while not (stored := _shards_stored(store.list_objects(prefix), ranks)) and time.monotonic() < deadline:
            time.sleep(0.1)
        store.close()
        with open(os.path.join(self.out, "shards-at-batch.txt"), "w") as file:
            file.write("stored\n" if stored else "missing\n")


def _shards_stored(names: list[str], ranks: int) -> bool:
    """Whether one folder among ``names`` holds ``__<r>_0.distcp`` for every rank r."""
    by_folder: dict[str, set[str]] = {}
    for name in names:
        folder, base = posixpath.split(name)
        by_folder.setdefault(folder, set()).add(base)
    return any({f"__{rank}_0.distcp" for rank in range(ranks)} <= files for files in by_folder.values())
