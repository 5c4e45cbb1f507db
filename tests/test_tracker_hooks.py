"""What the saver tells an experiment tracker: each complete checkpoint once, on rank 0, with its content hash and
its aliases, and the local file kept until the tracker says it is stored (issue 21's hooks, tracker-independent).

The destination here is a user's own ``LoggerDestination``: the trackers' real SDKs are tested in
test_tracker_mlflow.py and test_tracker_wandb.py.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from pathlib import Path

from cairn.checkpoint import read_checkpoint
from cairn.core.logger import LoggerDestination, SavedCheckpoint
from conftest import ScriptedMetric, build_trainer

METRIC = "metrics/eval/score"
LAST_BATCH = 12  # three epochs of four batches


class Recording(LoggerDestination):
    """Records every announced checkpoint, and stores it at once."""

    def __init__(self) -> None:
        self.saved: list[SavedCheckpoint] = []
        self.stored: list[Future[str]] = []

    def log_checkpoint(self, checkpoint: SavedCheckpoint) -> Future[str]:
        self.saved.append(checkpoint)
        self.stored.append(Future())
        if checkpoint.batch == LAST_BATCH or not self.slow:
            self.stored[-1].set_result("stored")
        return self.stored[-1]

    slow = False


class Slow(Recording):
    """Stores each checkpoint only when the next one is announced (the last at once, or fit would wait for it
    forever), noting whether every checkpoint still being stored was on disk at that moment: the prune before
    each announcement must have kept them."""

    slow = True

    def __init__(self) -> None:
        super().__init__()
        self.kept_while_storing: list[bool] = []

    def log_checkpoint(self, checkpoint: SavedCheckpoint) -> Future[str]:
        pending = [saved for saved, future in zip(self.saved, self.stored, strict=True) if not future.done()]
        self.kept_while_storing += [os.path.exists(saved.path) for saved in pending]
        for future in self.stored:
            if not future.done():
                future.set_result("stored")
        return super().log_checkpoint(checkpoint)


def _fit(tmp_path: Path, tracker: Recording, scores: list[float], **kwargs: object) -> None:
    trainer = build_trainer(
        tmp_path,
        max_duration=f"{len(scores)}ep",
        save_interval="1ep",
        save_filename="ep{epoch}.pt",
        save_best_metric=METRIC,
        loggers=[tracker],
        callbacks=[ScriptedMetric(METRIC, scores)],
        **kwargs,
    )
    trainer.fit()
    trainer.close()


def test_each_checkpoint_is_announced_once_with_its_hash_and_aliases(tmp_path: Path) -> None:
    tracker = Recording()
    _fit(tmp_path, tracker, [0.3, 0.9, 0.5], save_keep_best=1)
    assert [c.name for c in tracker.saved] == [f"run/checkpoints/ep{n}.pt" for n in (1, 2, 3)]  # save_remote_file_name
    assert [c.aliases for c in tracker.saved] == [("latest", "best"), ("latest", "best"), ("latest",)]
    assert [c.batch for c in tracker.saved] == [4, 8, 12]
    for checkpoint in tracker.saved[-1:]:  # the others may be pruned by now: the last is on disk
        recorded = read_checkpoint(checkpoint.path)["state"]["metadata"]["content_hash"]
        assert checkpoint.content_hash == recorded and recorded.startswith("xxh3-128:")


def test_a_checkpoint_the_tracker_has_not_stored_yet_is_not_pruned(tmp_path: Path) -> None:
    tracker = Slow()
    _fit(tmp_path, tracker, [0.1, 0.2, 0.3], save_num_checkpoints_to_keep=1)
    assert tracker.kept_while_storing == [True, True]  # ep1 at ep2's prune, ep2 at ep3's
    assert not (tmp_path / "ckpt" / "ep1.pt").exists()  # once stored, the rule takes it
