"""An upload that fails on one rank of a distributed run is raised on every rank, at the same checkpoint event,
instead of stopping that rank alone while the others wait for it in their next collective until the process
group's timeout: shown on two real processes (torchrun, gloo) uploading to the real moto server, for a sharded
folder's shard failing on rank 1, a single file failing on rank 0, and one failing at the end of ``fit``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from store_servers.moto import new_s3_bucket

SCRIPT = Path(__file__).parent / "dist_scripts" / "upload_failure.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
HANG = 120  # seconds: far beyond the run's own time; a rank left waiting would wait for gloo's timeout (minutes)

pytestmark = pytest.mark.slow


def test_an_upload_failing_on_one_rank_stops_every_rank_at_the_same_event(tmp_path: Path, s3_env: str) -> None:
    buckets = [new_s3_bucket(s3_env) for _ in range(6)]
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(SCRIPT), "--out", str(tmp_path)]
    command += ["--buckets", ",".join(buckets)]
    output = _run_or_kill(command, {**os.environ, "OMP_NUM_THREADS": "1"}, tmp_path)
    found = [_read(tmp_path / f"rank{rank}.json", output) for rank in (0, 1)]

    shard = [rank_found["shard"] for rank_found in found]
    assert shard[0] == shard[1], "every rank raises the same error, at the same batch"
    assert shard[0]["type"] == "ObjectStoreError"
    assert shard[0]["batch"] == 3, "raised at the checkpoint event after the failure, not at the end of fit"
    message = shard[0]["message"]
    assert "sharded checkpoint" in message and "ep0-ba2-rank0.pt" in message and "failed on rank 1" in message
    assert "__1_0.distcp" in message and buckets[1] in message, "the failed file and where it went"

    single = [rank_found["single"] for rank_found in found]
    assert single[0] == single[1], "every rank raises the same error, at the same batch"
    assert single[0]["type"] == "ObjectStoreError"
    assert single[0]["batch"] == 7
    message = single[0]["message"]
    assert message.startswith("on rank 0, uploading "), message
    assert "ep0-ba6-rank0.pt" in message and f"s3://{buckets[2]}/single/" in message
    # at each batch start: watched from each save until no rank had an upload in flight (batch 3's, 5's event);
    # unwatched, and deciding alike, the ranks run no collective (tests/test_agreement.py)
    assert single[0]["watching"] == [False, False, True, False, True, False, True]

    end = [rank_found["end"] for rank_found in found]
    assert end[0] == end[1], "found at FIT_END, once every upload finished: raised on every rank too"
    assert end[0]["type"] == "ObjectStoreError" and end[0]["batch"] == 4
    assert end[0]["message"].startswith("on rank 0, uploading 'end/ep0-ba4-rank0.pt' to "), end[0]["message"]


def test_a_failed_upload_waits_to_be_taken_once_and_drain_raises_nothing(
    tmp_path: Path, s3_env: str, s3_bucket: str
) -> None:
    """What the agreement reads and takes (one process): ``drain`` waits for every upload and its pointer move
    without raising; a failure stays (``has_failure``) until taken, once, naming the file and the object; an upload
    that succeeded is no failure, and once everything finished nothing is ``busy``."""
    from cairn.errors import ObjectStoreError
    from cairn.storage.transfer import Transfers

    (tmp_path / "good.pt").write_bytes(b"good")
    (tmp_path / "lost.pt").write_bytes(b"lost")
    stored = Transfers(f"s3://{s3_bucket}", use_procs=False)
    lost = Transfers(f"s3://{s3_bucket}-missing", use_procs=False)
    try:
        stored.upload("run/good.pt", str(tmp_path / "good.pt"), pointer_name="run/latest")
        lost.upload("run/lost.pt", str(tmp_path / "lost.pt"))
        for transfers in (stored, lost):
            transfers.drain()
            assert not transfers.busy
        assert not stored.has_failure and stored.take_failure() is None
        assert stored.store.get_object_size("run/latest") > 0, "drain waited for the pointer move too"
        assert lost.has_failure
        failure = lost.take_failure()
        assert isinstance(failure, ObjectStoreError) and failure.__cause__ is not None
        assert "lost.pt" in str(failure) and f"s3://{s3_bucket}-missing/run/lost.pt" in str(failure)
        assert not lost.has_failure and lost.take_failure() is None, "taken once"
    finally:
        stored.close()
        lost.close()


def _run_or_kill(command: list[str], env: dict[str, str], out: Path) -> str:
    """Run the launch; past ``HANG`` seconds, kill torchrun and each rank (in sessions of their own, by the process
    ids they wrote to ``out``), so that no rank is left behind."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        for pid_file in out.glob("pid*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"a rank was left waiting (killed after {HANG} s):\n{output[-4000:]}")
    return output


def _read(path: Path, output: str) -> dict:
    assert path.exists(), output[-6000:]
    return json.loads(path.read_text())
