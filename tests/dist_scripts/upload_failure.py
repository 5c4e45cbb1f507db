"""An upload that fails on one rank stops every rank, together (tests/test_upload_failure_everywhere.py).

Run under torchrun with two ranks, the S3 server at ``S3_ENDPOINT_URL``. Each rank uploads to a bucket of its own
(``--buckets``: six names, two per case, rank 0's first), so that one rank can lose its bucket after ``fit_start``
has probed it: its uploads then fail, the other rank's do not. Three cases, one after the other:

- ``shard``: FSDP saving sharded folders every 2 batches; rank 1 loses its bucket, so its shard of batch 2's folder
  fails to upload;
- ``single``: single files every 2 batches, which rank 0 alone uploads; rank 0 loses its bucket before batch 5, so
  batch 6's upload fails (batch 2's and 4's went up);
- ``end``: as ``single``, but 4 batches saved once, at the end: rank 0 loses its bucket before the first batch, and
  the failure is found at ``FIT_END``, which waits for the uploads.

The failing rank waits at batch 3's end (and 7's) until its uploads have finished (the real signal: the uploads
themselves), so that a failure is there at that batch's checkpoint event, and in ``single`` no rank has an upload
in flight there: the saver stops watching them (recorded at each batch start). Each rank writes the error its
``fit`` raised, per case, to ``--out/rank<r>.json``, and waits at a barrier for the other rank before the next
case: a rank that was left behind (the failure raised on one rank alone) never reaches it. Each rank writes its
process id to ``--out/pid<r>`` first, so that the test can stop a launch that hangs (on the code before the fix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.callbacks import CheckpointSaver  # noqa: E402
from cairn.core.logger import transfers_among  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import TinyNet, make_dataset  # noqa: E402


class LoseTheBucket(Callback):
    """On ``rank``: at the start of batch ``lose_at + 1`` (after ``fit_start`` probed it), wait for this rank's
    uploads so far, then delete its bucket; at batch ``fail_by``'s end and at batch 3's, wait until this rank's
    uploads have finished (the failed one too). Records, at each batch start, whether the saver watched uploads."""

    def __init__(self, rank: int, bucket: str, *, lose_at: int, fail_by: int) -> None:
        self.rank, self.bucket, self.lose_at, self.fail_by = rank, bucket, lose_at, fail_by
        self.watching: list[bool] = []

    def batch_start(self, state, logger) -> None:
        saver = next(callback for callback in state.callbacks if isinstance(callback, CheckpointSaver))
        self.watching.append(saver.watches_uploads)
        if int(state.timestamp.batch) == self.lose_at and dist.get_rank() == self.rank:
            _wait_for_uploads(state)
            _delete_bucket(self.bucket)

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) in (3, self.fail_by) and dist.get_rank() == self.rank:
            _wait_for_uploads(state)


def _wait_for_uploads(state) -> None:
    for transfers in transfers_among(state.callbacks):
        transfers.drain()


def _delete_bucket(bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"], region_name="us-east-1")
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


def run(case: str, buckets: list[str]) -> dict[str, object]:
    """Train until the failure stops ``fit``; the error it raised on this rank."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    failing = 1 if case == "shard" else 0
    losing = LoseTheBucket(failing, buckets[failing], lose_at=4 if case == "single" else 0, fail_by=7)
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=DataLoader(make_dataset(n=64), batch_size=4),
        max_duration="4ba" if case == "end" else "12ba",
        callbacks=[losing],
        device="cpu",
        seed=1,
        run_name=case,
        progress_bar=False,
        save_folder=f"s3://{buckets[rank]}/{case}",
        save_interval="4ba" if case == "end" else "2ba",
        parallelism_config={"fsdp": {"state_dict_type": "sharded"}} if case == "shard" else None,
    )
    raised: dict[str, object] = {"watching": losing.watching}
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - what the test checks
        raised |= {"type": type(err).__name__, "message": str(err), "batch": int(trainer.state.timestamp.batch)}
    try:
        trainer.close()
    except Exception:  # noqa: BLE001 - the failure was reported by fit already
        pass
    dist.barrier()  # both ranks stopped: on to the next case
    return raised


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--buckets", required=True, help="six bucket names: shard rank 0, 1; single 0, 1; end 0, 1")
    args = parser.parse_args()
    with open(os.path.join(args.out, f"pid{os.environ['RANK']}"), "w") as file:
        file.write(str(os.getpid()))  # torchrun starts each rank in a session of its own: the test kills it by this
    buckets = args.buckets.split(",")
    found = {case: run(case, buckets[index : index + 2]) for case, index in (("shard", 0), ("single", 2), ("end", 4))}
    with open(os.path.join(args.out, f"rank{dist.get_rank()}.json"), "w") as file:
        json.dump(found, file)


if __name__ == "__main__":
    main()
