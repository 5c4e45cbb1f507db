"""Two ranks logging to both experiment trackers at once (tests/test_tracker_ranks.py), under torchrun with gloo.

``log``: a few batches with ``MLFlowLogger(log_artifacts=True)`` on the test's real MLflow server and a
``WandBLogger(log_artifacts=True)`` in offline mode (the test's environment sets ``WANDB_MODE`` and ``WANDB_DIR``),
a checkpoint after every batch. The test then reads what each tracker holds: one run each, rank 0's.

``mlflow-fails``: another run, in which rank 0 deletes its MLflow run after the first batch (the
real server then refuses every later metric and checkpoint tag of it), so that rank 0's background sends fail while
rank 1 has nothing to fail. Every rank must raise the failure, together, and not be left waiting for rank 0.

``wandb-fails`` (only where ``--cases`` names it): another run, in which rank 0's W&B artifacts fail from batch 2 on
(W&B's staging folder cannot be made: its place is taken by a file). Every rank must raise the failure, together.

Each rank writes ``--out/rank<r>.json``: what its trackers started, and per failing case the error its ``fit``
raised and the batch it stopped at. The process group is joined here with a short timeout, so a rank left waiting
in a collective fails within ``GROUP_TIMEOUT`` instead of gloo's default 30 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.loggers.mlflow import MLFlowLogger  # noqa: E402
from cairn.loggers.wandb import WandBLogger  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import TinyNet, make_loader  # noqa: E402

#: A rank left waiting in a collective by the other fails after this, not after gloo's default of 30 minutes.
GROUP_TIMEOUT = datetime.timedelta(seconds=60)
BATCHES = 4


class DeleteTheMLflowRun(Callback):
    """Rank 0, at the start of batch 2: delete the logger's MLflow run on the server (everything sent before is in;
    the server refuses whatever comes after), as an administrator cleaning up mid-run would."""

    def __init__(self, tracker: MLFlowLogger) -> None:
        self.tracker = tracker

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == 1 and dist.get_rank() == 0:
            self.tracker.wait()
            import mlflow

            mlflow.MlflowClient(self.tracker.tracking_uri).delete_run(self.tracker.run_id)


def trainer(save_folder: str, loggers: list[Any], callbacks: list[Callback], run_name: str) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(n=64, batch_size=4),  # eight batches an epoch on each rank
        max_duration=f"{BATCHES}ba",
        device="cpu",
        seed=1,
        run_name=run_name,
        progress_bar=False,
        loggers=loggers,
        callbacks=callbacks,
        save_folder=save_folder,
        save_filename="ba{batch}.pt",
        save_interval="1ba",
    )


def log_to_both(args: argparse.Namespace) -> dict[str, Any]:
    """The ``log`` case: both trackers, artifacts on; what each started on this rank."""
    mlflow_logger = MLFlowLogger(args.tracking_uri, experiment_name=args.experiment, log_artifacts=True)
    wandb_logger = WandBLogger(project="cairn-ranks", log_artifacts=True)
    run = trainer(os.path.join(args.save_folder, "log"), [mlflow_logger, wandb_logger], [], "ranks")
    run.fit()
    started = {"mlflow_run_id": mlflow_logger.run_id, "wandb_run": wandb_logger.run is not None}
    started["wandb_run_id"] = wandb_logger.run_id if started["wandb_run"] else None
    run.close()
    return started


def mlflow_fails(args: argparse.Namespace) -> dict[str, Any]:
    """The ``mlflow-fails`` case: the error this rank's ``fit`` raised, and at which batch."""
    tracker = MLFlowLogger(args.tracking_uri, experiment_name=f"{args.experiment}-fails", log_artifacts=True)
    run = trainer(os.path.join(args.save_folder, "fails"), [tracker], [DeleteTheMLflowRun(tracker)], "fails")
    return fit_and_report(run)


class BreakTheWandBStaging(Callback):
    """Rank 0, at the start of batch 2: point W&B's data folder where its ``artifacts/staging`` folder cannot be
    made (a file named ``artifacts`` is there), so that this and every later checkpoint's artifact fails."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == 1 and dist.get_rank() == 0:
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, "artifacts"), "w"):
                pass
            os.environ["WANDB_DATA_DIR"] = self.folder  # read by W&B at each artifact it stages


def wandb_fails(args: argparse.Namespace) -> dict[str, Any]:
    """The ``wandb-fails`` case (run last: it leaves rank 0's W&B data folder broken), its W&B run in a folder of
    its own: the error this rank's ``fit`` raised, and at which batch."""
    tracker = WandBLogger(
        project="cairn-ranks-fails", log_artifacts=True, init_kwargs={"dir": os.path.join(args.out, "wandb-fails")}
    )
    broken = BreakTheWandBStaging(os.path.join(args.out, "broken-wandb-data"))
    return fit_and_report(trainer(os.path.join(args.save_folder, "wandb-fails"), [tracker], [broken], "wfails"))


CASES = {"log": log_to_both, "mlflow-fails": mlflow_fails, "wandb-fails": wandb_fails}


def fit_and_report(run: Trainer) -> dict[str, Any]:
    raised: dict[str, Any] = {"type": None}
    try:
        run.fit()
    except Exception as err:  # noqa: BLE001 - what the test checks
        raised = {"type": type(err).__name__, "message": str(err)}
    raised["batch"] = int(run.state.timestamp.batch)
    try:
        run.close()
    except Exception as err:  # noqa: BLE001 - fit reported the failure already
        raised["close"] = type(err).__name__
    return raised


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--save-folder", required=True)
    parser.add_argument("--cases", default="log,mlflow-fails", help=f"some of {', '.join(CASES)}, in this order")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
    found = {case: CASES[case](args) for case in CASES if case in args.cases.split(",")}
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as file:
        json.dump(found, file)
    dist.barrier()  # both ranks are done: neither closes its connections while the other still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
