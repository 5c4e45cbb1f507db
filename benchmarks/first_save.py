"""What the first async save costs the training thread, against later ones, with and without ``Writer.prepare``.

    python benchmarks/first_save.py                # ~0.56 GiB of MLP + AdamW state, 3 runs of each mode
    python benchmarks/first_save.py --write        # also write each checkpoint (a background thread) between saves
    python benchmarks/first_save.py --runs 5 --width 4096 --layers 3 --saves 4

Each run is a fresh process (freed memory that a process keeps would hide the cost being measured): it builds the
model and AdamW, calls ``AsyncSingleFileWriter.prepare`` as the saver does at the start of fit (or not), trains a
few batches (AdamW makes its moments at the first), then saves ``--saves`` times with two batches between saves.
The stall is the time ``writer.start`` holds the training thread (collect the state, copy it into host buffers);
the faults are the process's minor page faults during it (``getrusage``), one per 4 KiB page faulted in. "prepare"
is what the call at the start of fit cost the training thread; the allocation and faulting-in run on a thread of
their own. Figures are medians over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import torch

from cairn.checkpoint.save.writers import AsyncSingleFileWriter
from cairn.core import Time
from cairn.core.state import State


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _train_batch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=False)
    model(batch).square().mean().backward()
    optimizer.step()


def one_run(*, prepare: bool, width: int, layers: int, saves: int, write: bool) -> dict[str, Any]:
    """One process's figures: the stall and faults of each save, and what prepare cost the training thread."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = State(
        model=model,
        run_name="first-save",
        rank_zero_seed=0,
        max_duration=Time.from_timestring("1ep"),
        device=torch.device("cpu"),
        optimizers=[optimizer],
    )
    batch = torch.randn(32, width)
    writer = AsyncSingleFileWriter(weights_only=False, ignore_keys=(), overwrite=True)
    started = time.perf_counter()
    if prepare:
        writer.prepare(state)
    prepare_s = time.perf_counter() - started
    for _ in range(4):
        _train_batch(model, optimizer, batch)
    stalls, faults = [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("FIRST_SAVE_DIR")) as folder:
        for index in range(saves):
            before, started = _minor_faults(), time.perf_counter()
            finish = writer.start(state, os.path.join(folder, f"ep{index}.pt"))
            stalls.append(time.perf_counter() - started)
            faults.append(_minor_faults() - before)
            writing = threading.Thread(target=finish) if write else None
            if writing is not None:
                writing.start()
            for _ in range(2):
                _train_batch(model, optimizer, batch)
            if writing is not None:
                writing.join()
    rss = _rss_mib()
    nbytes = writer._snapshot.nbytes
    writer.close()
    return {"prepare_s": prepare_s, "stalls": stalls, "faults": faults, "gib": nbytes / 2**30, "rss_mib": rss}


def _in_a_process(arguments: argparse.Namespace, prepare: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", "prepare" if prepare else "plain", "--width", str(arguments.width)]
    command += ["--layers", str(arguments.layers), "--saves", str(arguments.saves)] + (
        ["--write"] if arguments.write else []
    )
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _row(label: str, runs: list[dict[str, Any]]) -> str:
    first = statistics.median(run["stalls"][0] for run in runs)
    later = statistics.median(statistics.median(run["stalls"][1:]) for run in runs)
    first_faults = statistics.median(run["faults"][0] for run in runs)
    later_faults = statistics.median(statistics.median(run["faults"][1:]) for run in runs)
    prepare = statistics.median(run["prepare_s"] for run in runs)
    return (
        f"{label:<16} {first:>10.3f} {later:>10.3f} {first / later:>8.1f}x {first_faults:>12.0f} "
        f"{later_faults:>12.0f} {prepare:>10.3f} {runs[0]['gib']:>7.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--saves", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="write each checkpoint while training goes on")
    parser.add_argument("--one", choices=["plain", "prepare"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.saves < 2:
        parser.error("--saves must be 2 or more: later saves are the baseline")
    if arguments.one is not None:
        figures = one_run(
            prepare=arguments.one == "prepare",
            width=arguments.width,
            layers=arguments.layers,
            saves=arguments.saves,
            write=arguments.write,
        )
        print(json.dumps(figures))
        return
    results: dict[str, list[dict[str, Any]]] = {"no prepare": [], "prepare": []}
    for _ in range(arguments.runs):  # interleaved, so a busy moment of the machine falls on both modes
        for label in results:
            results[label].append(_in_a_process(arguments, prepare=label == "prepare"))
    print(f"{'':<16} {'first save':>10} {'later':>10} {'ratio':>9} {'faults 1st':>12} {'faults later':>12}", end="")
    print(f" {'prepare':>10} {'GiB':>7}")
    print(f"{'':<16} {'stall (s)':>10} {'stall (s)':>10} {'':>9} {'(minor)':>12} {'(minor)':>12} {'call (s)':>10}")
    for label, runs in results.items():
        print(_row(label, runs))
    print(
        f"medians of {arguments.runs} runs; each run's stalls: ",
        json.dumps({k: [r["stalls"] for r in v] for k, v in results.items()}),
    )


if __name__ == "__main__":
    main()
