"""What a checkpoint write in the background takes from the training thread, and why.

One process holds a state of tensors (``--size-mib``) and, on its main thread, runs a workload whose rate is
measured: ``train`` (an MLP's forward, backward and SGD step on torch's own threads, what a training loop does) or
``python`` (a pure-Python loop: it can only lose to the GIL). While the workload runs, the same bytes are written in
the background by each writer in turn, in rotated order, ``--runs`` rounds:

- ``os.write + fsync``: the floor the issue names, a plain buffered write that releases the GIL;
- ``torch.save (path)``: torch's C++ writer into the page cache, then fsync (cairn's writer before issue 19);
- ``cairn``: :func:`cairn.checkpoint.save.commit.write_checkpoint`, ``torch.save`` into a
  :class:`~cairn.checkpoint.save.direct.DirectFile` (past the page cache), atomic commit included;
- ``cairn, async snapshot``: the same bytes from an async save's host buffers, which start on a page, so the
  direct write takes them where they lie, without the staging copy;
- ``cairn in a process``: the same, from a writer process fed from shared memory (forked; the tensors are shared,
  not copied), to see what a process buys over a thread;
- ``os.write O_DIRECT``: the direct-I/O floor, the bytes written straight from an aligned buffer.

"share" is the workload's rate while the write runs over its rate in the second just before (medians); "write" is
the write's duration. Shares near 1.0 for ``python`` and far below it for ``train`` mean the GIL is not what is lost:
the CPU the kernel spends on the write is (copying into the page cache, reclaiming older pages, writing back).

    python benchmarks/write_share.py                 # 384 MiB, both workloads, 3 rounds
    python benchmarks/write_share.py --workload train --runs 5
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from workload import fsync_path  # noqa: E402 - benchmarks/workload.py

from cairn.checkpoint.save.commit import write_checkpoint  # noqa: E402
from cairn.checkpoint.save.direct import BLOCK_BYTES, STAGING_BYTES  # noqa: E402
from cairn.checkpoint.save.snapshot import BufferKind  # noqa: E402

MIB = 1 << 20
BASELINE_S = 1.0  # the workload's own rate is measured over this long before each write

Write = Callable[[dict[str, torch.Tensor], str], None]


def _byte_views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    return [memoryview(tensor.numpy()).cast("B") for tensor in state.values()]


def write_buffered(state: dict[str, torch.Tensor], path: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for view in _byte_views(state):
            for start in range(0, len(view), STAGING_BYTES):
                os.write(descriptor, view[start : start + STAGING_BYTES])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_direct(state: dict[str, torch.Tensor], path: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    staging = mmap.mmap(-1, STAGING_BYTES)
    try:
        for view in _byte_views(state):
            for start in range(0, len(view), STAGING_BYTES):
                piece = view[start : start + STAGING_BYTES]
                staging[: len(piece)] = piece
                os.write(descriptor, memoryview(staging)[: -(-len(piece) // BLOCK_BYTES) * BLOCK_BYTES])
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        staging.close()


def write_torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    torch.save(state, path)
    fsync_path(path)


def write_cairn(state: dict[str, torch.Tensor], path: str) -> None:
    write_checkpoint(state, path)


def _write_in_child(state: dict[str, torch.Tensor], path: str) -> None:
    write_checkpoint(state, path)


_SNAPSHOTS: dict[int, dict[str, torch.Tensor]] = {}  # by id(state): the state copied into an async save's buffers


def write_cairn_snapshot(state: dict[str, torch.Tensor], path: str) -> None:
    """What an async save writes: the state's copy in page-aligned host buffers, handed to the disk in place."""
    write_checkpoint(_SNAPSHOTS[id(state)], path)


def _snapshot_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: BufferKind.of(tensor).allocate().copy_(tensor) for name, tensor in state.items()}


WRITERS: dict[str, tuple[Write, bool]] = {  # name -> (writer, in a process of its own)
    "os.write + fsync": (write_buffered, False),
    "torch.save (path)": (write_torch_save, False),
    "cairn": (write_cairn, False),
    "cairn, async snapshot": (write_cairn_snapshot, False),
    "cairn in a process": (_write_in_child, True),
    "os.write O_DIRECT": (write_direct, False),
}


class Workload:
    """The main thread's work, in steps whose rate is counted."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        torch.manual_seed(0)
        self._model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
        self._optimizer = torch.optim.SGD(self._model.parameters(), lr=1e-3)
        self._input = torch.randn(64, 1024)

    def step(self) -> None:
        if self.kind == "python":
            total = 0
            for number in range(20_000):
                total += number
            return
        self._optimizer.zero_grad()
        self._model(self._input).square().mean().backward()
        self._optimizer.step()

    def rate(self, until: Callable[[], bool]) -> float:
        steps, start = 0, time.perf_counter()
        while not until() or steps == 0:
            self.step()
            steps += 1
        return steps / (time.perf_counter() - start)


def _measure(workload: Workload, name: str, state: dict[str, torch.Tensor], folder: str) -> tuple[float, float]:
    """(share of the workload's rate kept while ``name`` writes, the write's duration)."""
    write, in_process = WRITERS[name]
    path = os.path.join(folder, "checkpoint.pt")
    if os.path.exists(path):
        os.remove(path)
    os.sync()  # each writer starts with no dirty pages of the one before
    start = time.perf_counter()
    before = workload.rate(lambda: time.perf_counter() - start > BASELINE_S)
    start = time.perf_counter()
    if in_process:
        process = multiprocessing.get_context("fork").Process(target=write, args=(state, path))
        process.start()
        during = workload.rate(lambda: not process.is_alive())
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"the writer process of {name!r} failed with exit code {process.exitcode}")
    else:
        failure: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                write(state, path)
            except BaseException as err:  # noqa: BLE001 - raised on the main thread below
                failure.append(err)
            finally:
                done.set()

        thread = threading.Thread(target=run, name="writer")
        thread.start()
        during = workload.rate(done.is_set)
        thread.join()
        if failure:
            raise failure[0]
    return during / before, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=384, help="bytes written per save (default 384)")
    parser.add_argument("--runs", type=int, default=3, help="rounds, writers in rotated order (default 3)")
    parser.add_argument("--workload", choices=["train", "python", "both"], default="both")
    parser.add_argument("--dir", default=str(HERE / ".scratch"), help="scratch folder on the disk to measure")
    args = parser.parse_args()

    if not hasattr(os, "O_DIRECT"):
        sys.exit("this system has no O_DIRECT: the direct-I/O rows cannot be measured")
    pieces = 8
    state = {f"tensor{i}": torch.randn(args.size_mib * MIB // 4 // pieces) for i in range(pieces)}
    for tensor in state.values():
        tensor.share_memory_()  # the writer process reads the same pages
    _SNAPSHOTS[id(state)] = _snapshot_of(state)
    kinds = ["train", "python"] if args.workload == "both" else [args.workload]
    names = list(WRITERS)
    os.makedirs(args.dir, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"state: {args.size_mib} MiB in {pieces} tensors; {args.runs} rounds; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for kind in kinds:
            workload = Workload(kind)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for round_ in range(args.runs):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    results[name].append(_measure(workload, name, state, folder))
            _report(kind, results)


def _report(kind: str, results: dict[str, list[tuple[float, float]]]) -> None:
    floor = statistics.median(share for share, _ in results["os.write + fsync"])
    print(f"\nworkload: {kind}")
    print("| writer | share kept (min–max) | vs os.write floor | write s |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        shares = [share for share, _ in runs]
        share = statistics.median(shares)
        seconds = statistics.median(duration for _, duration in runs)
        print(f"| {name} | {share:.2f} ({min(shares):.2f}–{max(shares):.2f}) | {share / floor:.2f}× | {seconds:.2f} |")
    cairn = statistics.median(share for share, _ in results["cairn, async snapshot"])
    verdict = "met" if cairn >= 0.9 else "MISS"
    print(f"target: the training thread keeps >= 90% of its rate during an async write: {cairn:.2f} -> {verdict}")


if __name__ == "__main__":
    main()
