"""The ranks agree on everything a checkpoint event decides in one small collective per batch, or in none: shown on
two real processes (torchrun, gloo), counting every collective Python code calls between batch starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "dist_scripts" / "collectives.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.slow


def test_savers_and_the_preemption_watch_cost_one_small_collective_per_batch_or_none(tmp_path: Path) -> None:
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT), "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert (tmp_path / "collectives.json").exists(), result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads((tmp_path / "collectives.json").read_text())
    # three savers (one on a wall-clock interval, one whose function says yes on rank 1 alone) and the preemption
    # watch: one all_reduce per batch; a saver counting batches alone: nothing at all
    assert found["asked"] == [{"all_reduce": 1}] * 6
    assert found["alike"] == [{}] * 6
    # rank 0's "no" won on rank 1 too: that saver saved only the run's end, and no rank waited for another
    assert sorted(os.listdir(tmp_path / "asked" / "rank1")) == ["ba7.pt", "latest-rank0.pt"]
