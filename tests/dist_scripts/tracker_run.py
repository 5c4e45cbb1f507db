"""A training run that logs to MLflow, for tests/test_tracker_mlflow.py: it checkpoints every ``--save-interval``
into ``--save-folder`` with autoresume and ``MLFlowLogger(log_artifacts=True)``, and with ``--kill-at N`` SIGKILLs
itself at the start of batch N+1, right after the checkpoint of batch N completed (no FIT_END, no close). The test
resumes it in its own process with :func:`tracked_trainer`."""

from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.loggers.mlflow import MLFlowLogger  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import TinyNet, make_loader  # noqa: E402


class KillAfter(Callback):
    """SIGKILL at the start of the batch after ``batch``: that batch's checkpoint is complete on disk."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_start(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


def tracked_trainer(
    tracking_uri: str,
    experiment: str,
    save_folder: str,
    *,
    kill_at: int | None = None,
    max_duration: str = "2ep",
    save_interval: str = "4ba",
) -> Trainer:
    """The run: 8 batches an epoch, a checkpoint every ``save_interval``, autoresume, MLflow with artifacts (the
    test builds the same one in its own process to resume)."""
    return Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(n=32, batch_size=4),
        max_duration=max_duration,
        run_name="tracked",
        save_folder=save_folder,
        save_interval=save_interval,
        autoresume=True,
        progress_bar=False,
        callbacks=[KillAfter(kill_at)] if kill_at is not None else [],
        loggers=[MLFlowLogger(tracking_uri, experiment_name=experiment, log_artifacts=True)],
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--save-folder", required=True)
    parser.add_argument("--max-duration", default="2ep")
    parser.add_argument("--save-interval", default="4ba")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    trainer = tracked_trainer(
        args.tracking_uri,
        args.experiment,
        args.save_folder,
        kill_at=args.kill_at,
        max_duration=args.max_duration,
        save_interval=args.save_interval,
    )
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
