"""Upload worker processes that die: the run's uploads go on, and a failure names its real cause.

Against the real moto server, with real worker processes (``use_procs=True``) killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from cairn.storage.transfer import Transfers
from store_servers.moto import bucket_objects


def _kill_workers(transfers: Transfers) -> None:
    """SIGKILL every worker process of the uploader's pool and wait until each is gone (the real signal)."""
    processes = list(transfers._pool._processes.values())  # type: ignore[union-attr]
    assert processes, "the pool has started its workers"
    for process in processes:
        os.kill(process.pid, signal.SIGKILL)
    for process in processes:
        process.join(timeout=60)


def test_an_upload_after_its_idle_worker_was_killed_still_lands(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    first.write_bytes(b"a" * 1000)
    second.write_bytes(b"b" * 1000)
    transfers = Transfers(f"s3://{s3_bucket}", use_procs=True)
    try:
        transfers.upload("first.pt", str(first))
        transfers.wait()
        _kill_workers(transfers)  # an OOM killer, or an operator, between two saves

        transfers.upload("second.pt", str(second))
        transfers.wait()  # raised BrokenProcessPool (or blamed a missing __main__ guard) before
    finally:
        transfers.close()

    assert bucket_objects(s3_env, s3_bucket) == {"first.pt": b"a" * 1000, "second.pt": b"b" * 1000}
