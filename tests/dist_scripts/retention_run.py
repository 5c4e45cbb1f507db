"""One process of tests/test_retention_proof.py: a run saving every epoch to ``s3://<bucket>/run`` (local copies in
``run/`` under the working directory), whose eval metric follows a fixed script, with every retention rule on.

With ``--announce``, once each epoch's checkpoint is saved, uploaded and its ``latest`` pointer moved (at the next
epoch's start, the first event after the saver's), it prints ``SAVED <epoch>`` and waits for a line on stdin: the
test paces the run, so its SIGKILL lands at a moment it chose, and what the bucket holds then does not depend on
how fast the uploads were.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.core.logger import transfers_among  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import TinyNet, make_loader  # noqa: E402

METRIC = "metrics/eval/Accuracy"
#: the value logged at the end of epochs 1..13 (the test's copy says which checkpoints each rule keeps)
SCRIPT = [0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.4, 0.95, 0.6, 0.7, 0.3, 0.85, 0.5]


class ScriptedMetric(Callback):
    """Logs ``SCRIPT[epoch - 1]`` under :data:`METRIC` at each epoch's end, before the epoch's checkpoint, as an
    evaluation would."""

    def epoch_end(self, state, logger) -> None:
        logger.log_metrics({METRIC: SCRIPT[state.timestamp.epoch - 1]})


class Announce(Callback):
    """At each epoch's start after the first: the previous epoch's checkpoint is saved and pruned (the saver runs
    after the user's callbacks, at EPOCH_CHECKPOINT); wait for its uploads, say so, and wait for the test's go."""

    def epoch_start(self, state, logger) -> None:
        epoch = state.timestamp.epoch
        if epoch == 0:
            return
        for transfers in transfers_among(logger.destinations):
            transfers.wait()
        print(f"SAVED {epoch}", flush=True)
        if not sys.stdin.readline():  # the test is gone
            os._exit(3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--keep", type=int, default=1, help="save_num_checkpoints_to_keep")
    parser.add_argument("--remote-keep", type=int, default=2, help="save_remote_num_checkpoints_to_keep")
    parser.add_argument("--keep-best", type=int, default=2)
    parser.add_argument("--keep-every", default="3ep")
    parser.add_argument("--announce", action="store_true", help="print SAVED n after each epoch, wait for stdin")
    args = parser.parse_args()
    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(16),  # two batches an epoch
        max_duration=f"{args.epochs}ep",
        device="cpu",
        seed=7,
        progress_bar=False,
        run_name="proof",
        callbacks=[ScriptedMetric(), *([Announce()] if args.announce else [])],
        save_folder=f"s3://{args.bucket}/run",
        save_filename="ep{epoch}.pt",
        save_interval="1ep",
        save_num_checkpoints_to_keep=args.keep,
        save_remote_num_checkpoints_to_keep=args.remote_keep,
        save_keep_best=args.keep_best,
        save_best_metric=METRIC,
        save_keep_every=args.keep_every,
        autoresume=True,
    )
    trainer.fit()
    trainer.close()
    print(f"DONE {trainer.state.timestamp.epoch}", flush=True)


if __name__ == "__main__":
    main()
