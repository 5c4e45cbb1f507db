"""One process of tests/test_tracker_wandb.py: a run with autoresume that logs to W&B (offline mode, set by the
test's environment) and saves a checkpoint every two batches; with ``--kill-at N`` it SIGKILLs itself at the start of
the batch after batch N, once the checkpoint of batch N is complete, W&B holds its artifact, and W&B's transaction
log on disk holds batch N's loss (W&B writes that file in batches, every ``_transaction_log_flush_interval``
seconds: what it had not written when a process is killed is lost, see docs/trackers.md)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.loggers.wandb import WandBLogger  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import TinyNet, make_loader  # noqa: E402
from store_servers.wandb_standin import history_steps  # noqa: E402


class KillAfterCheckpoint(Callback):
    """At the first event of the batch after ``batch`` (its checkpoint is complete), wait for W&B to hold the
    checkpoint's artifact, then die as a preempted machine does: no cleanup, no flush."""

    def __init__(self, batch: int, tracker: WandBLogger) -> None:
        self.batch, self.tracker = batch, tracker

    def batch_start(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            self.tracker.wait()
            log_file = self.tracker.run.settings.sync_file
            deadline = time.monotonic() + 60
            while not any(step == self.batch for step, _ in history_steps(log_file, "loss/train/total")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"W&B never wrote batch {self.batch} to {log_file}")
                time.sleep(0.05)  # polls the file itself: the record on disk is the signal
            print(f"KILLED {self.tracker.run_id}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    tracker = WandBLogger(project="cairn-test", log_artifacts=True)
    callbacks = [KillAfterCheckpoint(args.kill_at, tracker)] if args.kill_at is not None else []
    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(32),  # four batches an epoch
        max_duration=f"{args.epochs}ep",
        device="cpu",
        seed=7,
        progress_bar=False,
        run_name="wandb-resume",
        callbacks=callbacks,
        loggers=[tracker],
        save_folder=args.folder,
        save_filename="ba{batch}.pt",
        save_interval="2ba",
        autoresume=True,
    )
    trainer.fit()
    trainer.close()
    print(f"DONE {tracker.run_id}", flush=True)


if __name__ == "__main__":
    main()
