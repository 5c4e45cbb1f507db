"""One incremental save in a process of its own that stops between its chunks and its manifest, for
tests/test_incremental_crash.py.

``python paused_save.py ROOT PATH`` writes :func:`checkpoint` as a manifest at PATH whose chunks live in ROOT's chunk
folder. Once its chunks are written and fsynced, with the chunk folder's lock held shared, it prints
``CHUNKS WRITTEN`` and waits for a line on stdin (the test's go, or its SIGKILL); then it publishes the manifest and
prints ``PUBLISHED <chunks written> <chunks reused>``. The pause wraps ``write_checkpoint`` where the incremental
writer looks it up, from here: no test hook lives in the library.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from cairn.checkpoint.incremental import files


def checkpoint() -> dict[str, Any]:
    """The same checkpoint in every process: a 768 KiB body and a 256 KiB head, each chunked (one chunk apiece)."""
    return {
        "state": {
            "model": {
                "body": torch.arange(3 << 16, dtype=torch.float32),
                "head": torch.arange(1 << 15, dtype=torch.float64) / 7,
            },
            "metadata": {"format_version": 1, "world_size": 1},
        }
    }


def _pausing(write):  # noqa: ANN001, ANN202 - write_checkpoint's own signature
    def paused(manifest, path, *args, **kwargs):  # noqa: ANN001, ANN202
        print("CHUNKS WRITTEN", flush=True)
        if not sys.stdin.readline():  # the test is gone
            os._exit(3)
        return write(manifest, path, *args, **kwargs)

    return paused


def main() -> None:
    root, path = sys.argv[1], sys.argv[2]
    files.write_checkpoint = _pausing(files.write_checkpoint)
    written = files.write_incremental(checkpoint(), path, root=root)
    print(f"PUBLISHED {written.chunks} {written.reused}", flush=True)


if __name__ == "__main__":
    main()
