"""Which chunk size incremental checkpoints should use, measured on this machine (docs/performance.md).

    python benchmarks/chunk_size.py                       # ~1 GiB state, a 256 MiB table, 3 runs each
    python benchmarks/chunk_size.py --sizes 4,8,16 --runs 5
    python benchmarks/chunk_size.py --sharded             # also: a DCP save of a frozen-body fine-tune

For each chunk size it measures:

- everything changed: ``CheckpointSaver(incremental=True).save`` of the bench's model and its AdamW state with the
  chunk folder emptied first (untimed), so every chunk is written and fsynced, against ``torch.save`` + fsync and
  cairn's full sync save of the same state, in turns (median of ``--runs``);
- a few rows changed: a 256 MiB embedding-like table saved once, then ``--rows`` random rows changed and saved
  again: the bytes that second save wrote (new chunk files plus the manifest);
- files: chunk files per full checkpoint of the first state, which is also the requests one upload of it costs.

``--sharded`` adds what a sharded (DCP) save of a fine-tune with a frozen body costs against an incremental single
file of the same state (one process): the question whether chunking sharded folders would be worth it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from checkpoint_bench import Regression, _loader, _machine, _trainer  # noqa: E402
from workload import build_finetune, finetune_optimizer, fsync_path, state_bytes, take_one_step  # noqa: E402

from cairn import Trainer  # noqa: E402
from cairn.callbacks import CheckpointSaver  # noqa: E402
from cairn.checkpoint.incremental import manifest  # noqa: E402
from cairn.names import CHUNK_FOLDER  # noqa: E402

MIB = 2**20
GIB = 2**30


class TableNet(nn.Module):
    """An embedding-like table (rows of ``dim`` floats) beside a small trained layer; the table is what is saved."""

    def __init__(self, rows: int, dim: int, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Parameter(torch.randn(rows, dim), requires_grad=False)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def files_in(folder: str) -> dict[str, int]:
    try:
        return {entry.name: entry.stat().st_size for entry in os.scandir(folder) if len(entry.name) == 32}
    except FileNotFoundError:
        return {}


def written_since(before: dict[str, int], folder: str, manifest_path: str) -> int:
    """Bytes a save wrote: the chunk files that were not there before, plus the manifest."""
    after = files_in(os.path.join(folder, CHUNK_FOLDER))
    return sum(size for key, size in after.items() if key not in before) + os.path.getsize(manifest_path)


def empty(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)


Turn = tuple[Callable[[], object], Callable[[], object]]  # untimed before, timed action


def timed_in_turns(actions: dict[str, Turn], runs: int) -> dict[str, list[float]]:
    """Seconds of each ``(before, action)``, one run of each per round (a sync between, untimed)."""
    seconds: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(runs):
        for name, (before, action) in actions.items():
            before()
            os.sync()
            started = time.perf_counter()
            action()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def everything_changed(args: argparse.Namespace, scratch: Path, sizes: list[int]) -> tuple[dict, dict, int]:
    trainer = _trainer(args.size_gib, torch.device("cpu"), "1ba")
    trainer.fit()
    state = trainer.state
    nbytes = state_bytes(state.model, state.optimizers[0])
    torch_state = {"model": state.model.weights_module().state_dict(), "optimizer": state.optimizers[0].state_dict()}
    floor = str(scratch / "torch.pt")

    def torch_save() -> None:
        torch.save(torch_state, floor)
        fsync_path(floor)

    full_folder = str(scratch / "full")
    full = CheckpointSaver(folder=full_folder, filename="ckpt.pt", overwrite=True)
    actions: dict[str, Turn] = {
        "torch": (lambda: None, torch_save),
        "full": (lambda: empty(full_folder), lambda: full.save(state)),
    }
    files: dict[int, int] = {}
    for size in sizes:
        folder = str(scratch / f"inc-{size}")
        saver = CheckpointSaver(folder=folder, filename="ckpt.pt", overwrite=True, incremental=True)
        actions[f"inc-{size}"] = (lambda folder=folder: empty(folder), _with_chunk_size(size, saver, state))
    seconds = timed_in_turns(actions, args.runs)
    for size in sizes:
        files[size] = len(files_in(os.path.join(scratch, f"inc-{size}", CHUNK_FOLDER)))
    trainer.close()
    for size in sizes:
        shutil.rmtree(scratch / f"inc-{size}", ignore_errors=True)
    return seconds, files, nbytes


def _with_chunk_size(size_mib: int, saver: CheckpointSaver, state: Any) -> Callable[[], object]:
    def save() -> None:
        manifest.CHUNK_BYTES = size_mib * MIB
        saver.save(state)

    return save


def few_rows_changed(args: argparse.Namespace, scratch: Path, sizes: list[int]) -> dict[int, list[int]]:
    """Per chunk size, the bytes each of ``--runs`` saves wrote after ``--rows`` random rows of the table changed."""
    dim = 128
    rows = args.table_mib * MIB // (dim * 4)
    net = TableNet(rows, dim, 4096)
    trainer = Trainer(
        model=Regression(net),
        train_dataloader=_loader(torch.device("cpu")),
        max_duration="1ba",
        optimizers=torch.optim.AdamW(net.out.parameters(), lr=1e-3),
        device="cpu",
        progress_bar=False,
        seed=0,
        run_name="table",
    )
    trainer.fit()
    state = trainer.state
    written: dict[int, list[int]] = {}
    for size in sizes:
        picker = torch.Generator().manual_seed(1)  # the same rows change for every chunk size
        folder = str(scratch / f"table-{size}")
        empty(folder)
        saver = CheckpointSaver(folder=folder, filename="ckpt.pt", overwrite=True, incremental=True)
        manifest.CHUNK_BYTES = size * MIB
        saver.save(state)
        written[size] = []
        for _ in range(args.runs):
            with torch.no_grad():
                changed = torch.randint(0, rows, (args.rows,), generator=picker)
                net.table[changed] += 1.0
            before = files_in(os.path.join(folder, CHUNK_FOLDER))
            saver.save(state)
            written[size].append(written_since(before, folder, os.path.join(folder, "ckpt.pt")))
        shutil.rmtree(folder, ignore_errors=True)
    trainer.close()
    return written


def sharded_vs_incremental(args: argparse.Namespace, scratch: Path) -> str:
    """A frozen-body fine-tune (1% trained) saved after each step: DCP folder vs incremental single file."""
    import torch.distributed.checkpoint as dcp

    manifest.CHUNK_BYTES = args.chosen * MIB
    net, head = build_finetune(args.size_gib)
    optimizer = finetune_optimizer(head)
    take_one_step(net, optimizer)
    nbytes = state_bytes(net, optimizer)
    trainer = Trainer(
        model=Regression(net),
        train_dataloader=_loader(torch.device("cpu")),
        max_duration="1ba",
        optimizers=optimizer,
        device="cpu",
        progress_bar=False,
        seed=0,
        run_name="finetune",
    )
    trainer.fit()
    state = trainer.state
    inc_folder = str(scratch / "ft-inc")
    empty(inc_folder)
    saver = CheckpointSaver(folder=inc_folder, filename="ckpt.pt", overwrite=True, incremental=True)
    saver.save(state)  # the body's chunks are there from the first save on
    dcp_folder = str(scratch / "ft-dcp")
    measured: dict[str, list[float]] = {"dcp": [], "inc": []}
    inc_bytes: list[int] = []
    dcp_bytes = 0
    for _ in range(args.runs):
        take_one_step(net, optimizer)
        shutil.rmtree(dcp_folder, ignore_errors=True)
        os.sync()
        started = time.perf_counter()
        dcp.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=dcp_folder)
        for name in os.listdir(dcp_folder):
            fsync_path(os.path.join(dcp_folder, name))
        measured["dcp"].append(time.perf_counter() - started)
        dcp_bytes = sum(os.path.getsize(os.path.join(dcp_folder, name)) for name in os.listdir(dcp_folder))
        before = files_in(os.path.join(inc_folder, CHUNK_FOLDER))
        os.sync()
        started = time.perf_counter()
        saver.save(state)
        measured["inc"].append(time.perf_counter() - started)
        inc_bytes.append(written_since(before, inc_folder, os.path.join(inc_folder, "ckpt.pt")))
    trainer.close()
    dcp_s, inc_s = statistics.median(measured["dcp"]), statistics.median(measured["inc"])
    inc_b = statistics.median(inc_bytes)
    return "\n".join(
        [
            f"fine-tune, frozen body: {nbytes / GIB:.2f} GiB of state, 1% of the parameters trained; "
            f"{args.runs} saves each, one step apart",
            f"  DCP save (one process) + fsync     {dcp_s:7.3f} s   {dcp_bytes / MIB:9.1f} MiB written",
            f"  cairn incremental single file      {inc_s:7.3f} s   {inc_b / MIB:9.1f} MiB written",
            f"  DCP / incremental                  {dcp_s / inc_s:7.1f}x    {dcp_bytes / inc_b:8.1f}x",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0, help="state to save when everything changed")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64", help="chunk sizes in MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is shown (default 3)")
    parser.add_argument("--table-mib", type=int, default=256, help="the embedding-like table's size")
    parser.add_argument("--rows", type=int, default=8, help="rows of the table changed between two saves")
    parser.add_argument("--sharded", action="store_true", help="also compare a DCP save of a frozen-body fine-tune")
    parser.add_argument("--chosen", type=int, default=manifest.CHUNK_BYTES // MIB, help="chunk size for --sharded")
    parser.add_argument("--dir", default=str(HERE / ".scratch" / "chunk-size"), help="scratch folder on the disk")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    scratch = Path(args.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    original = manifest.CHUNK_BYTES
    try:
        seconds, files, nbytes = everything_changed(args, scratch, sizes)
        written = few_rows_changed(args, scratch, sizes)
        print(_machine())
        median = {name: statistics.median(values) for name, values in seconds.items()}
        best = {name: min(values) for name, values in seconds.items()}
        print(
            f"everything changed: {nbytes / GIB:.2f} GiB of weights and AdamW moments, {args.runs} runs each: "
            f"torch.save + fsync {median['torch']:.3f} s (best {best['torch']:.3f}), cairn full sync save "
            f"{median['full']:.3f} s (best {best['full']:.3f})"
        )
        print(f"few rows changed: {args.rows} random rows of a {args.table_mib} MiB table of 128-float rows\n")
        print(
            f"{'chunk':>6} {'all changed s':>14} {'vs full':>8} {'vs torch':>9} {'best s':>7} {'vs full':>8} "
            f"{'files':>6} {'few rows: written':>18} {'vs rows':>8}"
        )
        row_bytes = args.rows * 128 * 4
        for size in sizes:
            inc, fastest = median[f"inc-{size}"], best[f"inc-{size}"]
            wrote = statistics.median(written[size])
            print(
                f"{size:>3}MiB {inc:14.3f} {inc / median['full']:7.2f}x {inc / median['torch']:8.2f}x "
                f"{fastest:7.3f} {fastest / best['full']:7.2f}x "
                f"{files[size]:6d} {wrote / MIB:14.1f} MiB {wrote / row_bytes:7.0f}x"
            )
        print(
            "vs full / vs torch: the incremental save's median time over cairn's full sync save / torch.save + fsync;"
        )
        print("best s, vs full: the fastest run of each, less disturbed by other work on the machine.")
        print("written: new chunk files plus the manifest; vs rows: over the bytes of the rows that changed.")
        if args.sharded:
            print()
            print(sharded_vs_incremental(args, scratch))
    finally:
        manifest.CHUNK_BYTES = original
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
