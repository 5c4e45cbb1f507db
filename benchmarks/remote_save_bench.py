"""What a synchronous save to an object store costs training, beside a local one, with the upload timed apart.

    python benchmarks/remote_save_bench.py                         # ~1 GiB of model + AdamW state, 5 runs each
    python benchmarks/remote_save_bench.py --size-gib 0.25 --runs 3

The store is moto's S3 server, started by this script in a process of its own on 127.0.0.1 (as the tests start
it, but out of this process, as a real store would be: its work is not done under the training process's GIL).
A sync save to ``s3://`` writes the checkpoint locally exactly as a local save does, then hands it to the uploader,
which stages it (a hard link) and returns; a worker thread uploads and verifies it in the background. So the rows:

- ``cairn save (sync), local``: ``CheckpointSaver.save`` into a local folder, no uploader.
- ``cairn save (sync) to s3://``: the same save with a ``RemoteUploaderDownloader`` among the loggers: how long
  training stands still. The upload is waited for after each run, untimed; its own time (from the save's return to
  the object verified in the store) is the note beside it.
- ``... previous upload still running``: the save taken while the upload of the one before is still on the wire:
  what the upload's competition for the machine (disk, CPU, the store's own process here) costs the save.
- ``... staging on another filesystem``: the uploader's staging folder on another filesystem (``/dev/shm``, when it
  is one), where no hard link can be made and each file is copied before ``save`` returns: what every save paid
  before staging by link. Left out where ``/dev/shm`` is the same filesystem.

Every figure is the median of ``--runs`` runs, taken in turns (one of each per round, with a ``sync`` between), as
``benchmarks/checkpoint_bench.py`` does; "extra RSS" is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # no upload progress bars between the figures (read when tqdm loads)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from checkpoint_bench import GIB, MIB, _Contender, _machine, _round_robin, _trainer  # noqa: E402
from workload import Measurement, state_bytes  # noqa: E402

from cairn.callbacks import CheckpointSaver  # noqa: E402
from cairn.core.logger import Logger  # noqa: E402
from cairn.loggers import RemoteUploaderDownloader  # noqa: E402

_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_BUCKET = "cairn-bench"
_LOCAL = "cairn save (sync), local"
_REMOTE = "cairn save (sync) to s3://"
_BUSY = "cairn save (sync) to s3://, previous upload still running"
_COPIED = "cairn save (sync) to s3://, staging on another filesystem (copy)"


# -- the store --------------------------------------------------------------------------------------------------------


def _serve_moto(connection: Connection) -> None:
    """The store's process: moto's S3 server on a free port of 127.0.0.1, until the parent says stop."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    connection.send(server.get_host_and_port())  # sent once it listens: the parent waits on this, not on a clock
    connection.recv()
    server.stop()


class _Store:
    """moto in a child process, with one bucket; ``s3://`` URIs of this process reach it."""

    def __init__(self) -> None:
        os.environ.update(_CREDENTIALS)
        context = multiprocessing.get_context("spawn")
        self._parent, child = context.Pipe()
        self._process = context.Process(target=_serve_moto, args=(child,), daemon=True)
        self._process.start()
        host, port = self._parent.recv()
        self.endpoint = f"http://{host}:{port}"
        os.environ["S3_ENDPOINT_URL"] = self.endpoint
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=_BUCKET)

    def stop(self) -> None:
        self._parent.send("stop")
        self._process.join(timeout=30)


def _other_filesystem(scratch: Path) -> str | None:
    """A new folder on another filesystem than ``scratch`` (under ``/dev/shm``), or None when there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(scratch).st_dev:
        return None
    return tempfile.mkdtemp(prefix="cairn-bench-staging-", dir=shm)


# -- the run ----------------------------------------------------------------------------------------------------------


class _RemoteSaves:
    """One saver and one uploader, saving ``state`` to ``s3://`` with each save's upload timed apart: from the
    moment ``save`` returned to the moment the uploader has verified the object."""

    def __init__(self, state: Any, folder: Path, staging: str | None = None) -> None:
        self.state = state
        self.saver = CheckpointSaver(folder=str(folder), filename="ckpt.pt", overwrite=True)
        self.uploader = RemoteUploaderDownloader(f"s3://{_BUCKET}", use_procs=False, upload_staging_folder=staging)
        self.logger = Logger(state, [self.uploader])
        self.upload_seconds: list[float] = []
        self._returned_at = 0.0

    def save(self) -> None:
        self.saver.save(self.state, self.logger)
        self._returned_at = time.perf_counter()

    def wait_for_upload(self) -> None:
        self.uploader.wait()
        self.upload_seconds.append(time.perf_counter() - self._returned_at)

    def close(self) -> None:
        self.uploader.transfers.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    scratch = Path(args.dir)
    scratch.mkdir(parents=True, exist_ok=True)
    store = _Store()
    other_filesystem = _other_filesystem(scratch)
    try:
        trainer = _trainer(args.size_gib, torch.device("cpu"), "1ba")
        trainer.fit()  # one real step: AdamW's moments exist, as in any checkpoint taken mid-run
        state = trainer.state
        nbytes = state_bytes(state.model, state.optimizers[0])
        print(f"state: {nbytes / GIB:.2f} GiB ({nbytes:,} bytes) of weights and AdamW moments; {args.runs} runs each")
        print(f"store: moto {_moto_version()} in its own process at {store.endpoint}\n")
        local = CheckpointSaver(folder=str(scratch / "local"), filename="ckpt.pt", overwrite=True)
        remote = _RemoteSaves(state, scratch / "remote")
        busy = _RemoteSaves(state, scratch / "busy")
        contenders = [
            _Contender(_LOCAL, "write", lambda: local.save(state)),
            _Contender(_REMOTE, "write", remote.save, after=remote.wait_for_upload),
            _Contender(_BUSY, "write", busy.save, before=busy.save, after=busy.uploader.wait),
        ]
        copied = None
        if other_filesystem is not None:
            copied = _RemoteSaves(state, scratch / "copied", staging=other_filesystem)
            contenders.append(_Contender(_COPIED, "write", copied.save, after=copied.wait_for_upload))
        remote.save()  # untimed: the first upload builds the store's client and the worker thread
        remote.uploader.wait()
        rows = {row.name: row.result for row in _round_robin(contenders, args.runs)}
        uploads = {_REMOTE: remote.upload_seconds, **({_COPIED: copied.upload_seconds} if copied else {})}
        print(_machine())
        print(_table(rows, uploads, nbytes))
        print()
        print(_targets(rows))
        for saves in (remote, busy, *([copied] if copied else [])):
            saves.close()
        trainer.close()
        return {
            "state_bytes": nbytes,
            "rows": {name: result.as_dict() for name, result in rows.items()},
            "upload_seconds": uploads,
        }
    finally:
        store.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        if other_filesystem is not None:
            shutil.rmtree(other_filesystem, ignore_errors=True)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _table(rows: dict[str, Measurement], uploads: dict[str, list[float]], nbytes: int) -> str:
    local = rows[_LOCAL].median_s
    lines = [f"{'':66} {'median s':>9} {'best s':>7} {'GiB/s':>7} {'vs local':>9} {'extra RSS':>10} {'% state':>8}"]
    for name, result in rows.items():
        seconds, extra = result.median_s, result.median_extra_rss
        note = ""
        if name in uploads:
            upload = _median(uploads[name])
            note = f"  upload, in the background: {upload:.2f}s ({nbytes / upload / MIB:.0f} MiB/s)"
        lines.append(
            f"{name:66} {seconds:9.3f} {min(result.seconds):7.3f} {nbytes / seconds / GIB:7.2f} "
            f"{seconds / local:8.2f}x {extra / MIB:8.0f}Mi {100 * extra / nbytes:7.1f}%{note}"
        )
    lines.append("vs local: this save's time (training standing still) over a local sync save's; 1.00x = no dearer.")
    lines.append("upload: from save's return to the object verified in the store; training runs meanwhile.")
    return "\n".join(lines)


def _targets(rows: dict[str, Measurement]) -> str:
    """The issue's target: a sync save to s3:// costs training no more than a local one (10% for noise)."""
    ratio = rows[_LOCAL].median_s / rows[_REMOTE].median_s
    bar = 1 / 1.1
    return (
        "targets (ratio: how many times the target is met, >= the bar passes):\n"
        f"  {'met ' if ratio >= bar else 'MISS'}  {'sync save to s3:// <= 1.1x local sync save':42} {ratio:6.2f} "
        f"(bar {bar:.2f})"
    )


def _moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size to aim for (default 1)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is shown (default 5)")
    parser.add_argument("--dir", default=str(HERE / ".scratch" / "remote-save"), help="scratch folder to measure")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
