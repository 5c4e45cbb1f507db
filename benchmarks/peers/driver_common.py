"""What both peer drivers share: their command line, the random data, the fsync step and the one line of output.

A driver runs inside its peer's venv (see setup.py), where cairn is not installed; it reaches the shared workload
by putting the benchmarks folder on ``sys.path``. Frameworks print banners and warnings, some from C, so stdout's
file descriptor is pointed at stderr for the whole run and only the final JSON line goes to the real stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workload  # noqa: E402  (needs the path above)


def claim_stdout() -> TextIO:
    """Send everything written to stdout (Python or C) to stderr; return a stream on the real stdout for the result."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return real


def parse_args(tool: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"Time {tool}'s checkpoint save and resume on the shared workload.")
    parser.add_argument("--size-gib", type=float, default=1.0, help="parameters plus AdamW moments, in GiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", required=True, help="scratch folder (its checkpoint file is deleted at the end)")
    parser.add_argument(
        "--take-turns",
        action="store_true",
        help="before each timed resume, print 'ready' and wait for 'go' on stdin (the bench times its own between)",
    )
    return parser.parse_args()


Turns = Callable[[Callable[[], object]], Callable[[], None]]  # taking_turns with the stream and flag bound


def taking_turns(before: Callable[[], object], out: TextIO, *, enabled: bool) -> Callable[[], None]:
    """(With ``--take-turns``) wait for the bench's word, then ``before``: the bench runs one resume of its own
    between two of the driver's, so both are timed at the same moments of a busy machine, not minutes apart.
    The wait is untimed and comes first, so that each side prepares (frees the last run, builds its model, evicts
    its file) just before its own timed run, as without turns; nothing of the driver's runs while the bench's
    resume is timed."""

    def wait_then_prepare() -> None:
        if enabled:
            out.write("ready\n")
            out.flush()
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("the bench stopped taking turns")
        before()

    return wait_then_prepare


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RandomBatches(Dataset[torch.Tensor]):
    """Fresh random ``x`` rows of the workload's width; with batch size 2 each batch is what ``take_one_step`` uses."""

    def __init__(self, rows: int = 64) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randn(workload.WIDTH)


def random_loader() -> DataLoader[torch.Tensor]:
    """Many more batches than the two steps taken, so neither save nor resume lands on an epoch's end."""
    return DataLoader(RandomBatches(), batch_size=2, num_workers=0)


def durable(path: str) -> None:
    """fsync the checkpoint file and its folder, as cairn's saves do, so both sides time data that is on disk."""
    workload.fsync_path(path)
    workload.fsync_path(os.path.dirname(os.path.abspath(path)) or ".")


def remove(path: str) -> None:
    if os.path.lexists(path):
        os.remove(path)


def emit(
    out: TextIO,
    *,
    tool: str,
    version: str,
    state_bytes: int,
    save: workload.Measurement,
    resume: workload.Measurement,
    notes: str,
) -> None:
    line = {
        "tool": tool,
        "version": version,
        "state_bytes": state_bytes,
        "save": save.as_dict(),
        "resume": resume.as_dict(),
        "notes": notes,
    }
    out.write(json.dumps(line) + "\n")
    out.flush()
