"""The ranks agree on everything a checkpoint event decides in one small collective per batch, or in none: shown on
two real processes (torchrun, gloo), counting every collective Python code calls between batch starts, with sharded
folders uploading to the real moto server as well."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from store_servers.moto import bucket_objects

SCRIPT = Path(__file__).parent / "dist_scripts" / "collectives.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.slow


def test_savers_the_preemption_watch_and_shard_uploads_cost_one_small_collective_per_batch_or_none(
    tmp_path: Path, s3_env: str, s3_bucket: str
) -> None:
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT), "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "--bucket", s3_bucket], capture_output=True, text=True, timeout=300, env=env)
    assert (tmp_path / "collectives.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads((tmp_path / "collectives.json").read_text())
    # three savers (one on a wall-clock interval, one whose function says yes on rank 1 alone) and the preemption
    # watch: one all_reduce per batch; a saver counting batches alone: nothing at all
    assert found["asked"] == [{"all_reduce": 1}] * 6
    assert found["alike"] == [{}] * 6
    # rank 0's "no" won on rank 1 too: that saver saved only the run's end, and no rank waited for another
    assert sorted(os.listdir(tmp_path / "asked" / "rank1")) == ["ba7.pt", "latest-rank0.pt"]
    _shard_uploads_ride_in_the_one_all_reduce(found["uploading"], bucket_objects(s3_env, s3_bucket))


def _shard_uploads_ride_in_the_one_all_reduce(uploading: dict[str, list], objects: dict[str, bytes]) -> None:
    """Sharded folders saved asynchronously to the store every 4 batches by a batch-count saver: while a folder's
    shard uploads are in flight, the ranks compare upload notes inside the agreement's one all_reduce (no
    all_gather_object of their own), as they do while a save's uploads may be in flight on some rank (the saver
    watches them: its folder's ``cairn.pt`` on rank 0, whose failure every rank must raise), and with nothing in
    flight no collective runs; each folder still goes up whole, the pointer moving with the last."""
    saves = {4, 8, 12}  # the checkpoint events of these batches save (collectives of their own: DCP's, the store's)
    in_flight = dict(enumerate(uploading["in_flight"], 1))  # the folders uploading at each batch's start
    watching = dict(enumerate(uploading["watching"], 1))  # whether a save's uploads were watched then
    quiet = [(batch, calls) for batch, calls in enumerate(uploading["calls"], 1) if batch not in saves]
    assert [calls for _, calls in quiet if calls not in ({}, {"all_reduce": 1})] == [], "at most one all_reduce"
    assert in_flight[5] >= 1, "batch 4's folder is in flight at batch 5's checkpoint event"
    assert not any(watching[batch] for batch in range(1, 5)), "nothing watched before the first save"
    for batch, calls in quiet:
        busy = in_flight[batch] or watching[batch]
        assert calls == ({"all_reduce": 1} if busy else {}), (batch, calls, in_flight[batch], watching[batch])
    folders = sorted({name.rsplit("/", 1)[0] for name in objects if name.endswith("/cairn.pt")})
    assert folders == ["run/ep0-ba4-rank0.pt", "run/ep0-ba8-rank0.pt", "run/ep1-ba12-rank0.pt", "run/ep1-ba15-rank0.pt"]
    assert all(f"{folder}/__1_0.distcp" in objects for folder in folders), "each folder whole"
    assert objects["run/latest-rank0.pt.symlink"] == b"run/ep1-ba15-rank0.pt"
