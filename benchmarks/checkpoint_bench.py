"""How much a checkpoint costs a run, with cairn and with the alternatives, measured in one run on one machine.

    python benchmarks/checkpoint_bench.py                 # ~1 GiB of model + AdamW state, 5 runs each
    python benchmarks/checkpoint_bench.py --big           # ~4 GiB
    python benchmarks/checkpoint_bench.py --no-peers      # cairn and the plain-torch floor only
    make bench                                            # the first line, after setting up .venv

Every figure is the median of ``--runs`` runs. Reads start from the disk, not from memory: the file is fsynced and
its pages dropped from the page cache first. "extra RSS" is the peak resident memory during the operation minus
what the process held when it began, counting anonymous memory only (``RssAnon``): pages of a memory-mapped file
are page cache, which any read fills and the kernel reclaims. Lightning and Composer run in their own virtualenvs
under ``benchmarks/.peers/`` (created on first use), never as dependencies of cairn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workload import (  # noqa: E402
    WIDTH,
    Measurement,
    build_model,
    evict_from_page_cache,
    fsync_path,
    measure,
    peak_rss,
    state_bytes,
)

import cairn  # noqa: E402
from cairn import Trainer  # noqa: E402
from cairn.callbacks import CheckpointSaver  # noqa: E402
from cairn.checkpoint import read_checkpoint  # noqa: E402
from cairn.models import Model  # noqa: E402

GIB = 2**30
MIB = 2**20
_CHUNK = 64 * MIB


class Regression(Model):
    """The shared MLP as a cairn model: the same loss as ``workload.take_one_step``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: Any) -> torch.Tensor:
        return self.net(batch[0])

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return outputs.pow(2).mean()

    def weights_module(self) -> nn.Module:
        return self.net


def _loader(device: torch.device) -> DataLoader:
    del device
    return DataLoader(TensorDataset(torch.randn(64, WIDTH, generator=torch.Generator().manual_seed(0))), batch_size=2)


def _trainer(size_gib: float, device: torch.device, max_duration: str, **kwargs: Any) -> Trainer:
    net = build_model(size_gib)
    return Trainer(
        model=Regression(net),
        train_dataloader=_loader(device),
        max_duration=max_duration,
        optimizers=torch.optim.AdamW(net.parameters(), lr=1e-3),
        device=device.type,
        progress_bar=False,
        seed=0,
        run_name="bench",
        **kwargs,
    )


# -- the disk and the floor ---------------------------------------------------------------------------------------


_BLOCK = bytearray(os.urandom(_CHUNK))  # allocated once, outside the measurements


def _write_plain(path: str, nbytes: int) -> None:
    block = _BLOCK
    with open(path, "wb", buffering=0) as file:
        left = nbytes
        while left > 0:
            left -= file.write(memoryview(block)[: min(left, _CHUNK)])
        os.fsync(file.fileno())


def _read_plain(path: str) -> None:
    block = _BLOCK
    with open(path, "rb", buffering=0) as file:
        while file.readinto(block):
            pass


def _remove(path: str) -> Callable[[], None]:
    def remove() -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)

    return remove


# -- results ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    kind: str  # "write" or "read": which disk figure it is held against
    result: Measurement
    note: str = ""


def _table(rows: list[Row], nbytes: int, cairn_save: float, cairn_resume: float) -> str:
    disk = {row.kind: row.result.median_s for row in rows if row.name.startswith("disk")}
    lines = [
        f"{'':34} {'median s':>9} {'best s':>7} {'GiB/s':>7} {'vs disk':>8} {'vs cairn':>9} {'extra RSS':>10}"
        f" {'% state':>8}",
    ]
    for row in rows:
        seconds, extra = row.result.median_s, row.result.median_extra_rss
        versus_cairn = seconds / (cairn_resume if row.kind == "read" else cairn_save)
        lines.append(
            f"{row.name:34} {seconds:9.3f} {min(row.result.seconds):7.3f} {nbytes / seconds / GIB:7.2f} "
            f"{disk[row.kind] / seconds:7.2f}x "
            f"{versus_cairn:8.2f}x {extra / MIB:8.0f}Mi {100 * extra / nbytes:7.1f}%"
            + (f"  {row.note}" if row.note else "")
        )
    lines.append("vs disk: the disk's time over this one's (1.00x = as fast as a plain fsynced write or read).")
    lines.append("vs cairn: this one's time over cairn's sync save (writes) or cairn's resume (reads); >1 = slower.")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    scratch = Path(args.dir)
    scratch.mkdir(parents=True, exist_ok=True)
    runs = args.runs

    trainer = _trainer(args.size_gib, device, "1ba")
    trainer.fit()  # one real step: AdamW's moments exist, as in any checkpoint taken mid-run
    state = trainer.state
    nbytes = state_bytes(state.model, state.optimizers[0])
    print(f"state: {nbytes / GIB:.2f} GiB ({nbytes:,} bytes) of weights and AdamW moments; {runs} runs each\n")
    plain = str(scratch / "plain.bin")
    floor = str(scratch / "torch.pt")
    cairn_file = str(scratch / "cairn-sync" / "ckpt.pt")
    torch_state = {"model": state.model.weights_module().state_dict(), "optimizer": state.optimizers[0].state_dict()}
    sync_saver = CheckpointSaver(folder=str(scratch / "cairn-sync"), filename="ckpt.pt", overwrite=True)
    async_saver = CheckpointSaver(
        folder=str(scratch / "cairn-async"), filename="ckpt.pt", overwrite=True, async_save=True
    )
    async_saver.save(state)  # the first async save allocates the buffers later ones reuse: the steady state is shown
    async_saver._background.wait()
    async_totals: list[float] = []

    def torch_save() -> None:
        torch.save(torch_state, floor)
        fsync_path(floor)

    def async_stall() -> None:
        started = time.perf_counter()
        async_saver.save(state)
        async_totals.append(time.perf_counter() - started)  # finished below, outside the timed part

    def torch_load() -> None:
        loaded = torch.load(floor, map_location=device, weights_only=True)
        state.model.weights_module().load_state_dict(loaded["model"])
        state.optimizers[0].load_state_dict(loaded["optimizer"])

    def finish_async() -> None:
        started = time.perf_counter()
        async_saver._background.wait()
        async_totals[-1] += time.perf_counter() - started

    contenders = [
        _Contender("disk write (plain file + fsync)", "write", lambda: _write_plain(plain, nbytes), _remove(plain)),
        _Contender("torch.save + fsync", "write", torch_save, _remove(floor)),
        _Contender("cairn save (sync)", "write", lambda: sync_saver.save(state), _remove(cairn_file)),
        _Contender("cairn save (async): training stall", "write", async_stall, after=finish_async),
        _Contender("disk read (plain file)", "read", lambda: _read_plain(plain), lambda: evict_from_page_cache(plain)),
        _Contender("torch.load + load_state_dict", "read", torch_load, lambda: evict_from_page_cache(floor)),
        _Contender(
            "cairn load (read, verify)",
            "read",
            lambda: read_checkpoint(cairn_file),
            lambda: evict_from_page_cache(cairn_file),
        ),
    ]
    rows = _round_robin(contenders, runs)
    rows[3].note = f"background write done after {sorted(async_totals)[len(async_totals) // 2]:.2f}s"
    rows.append(Row("cairn resume to first step", "read", _resume_to_first_step(args, device, cairn_file, runs)))

    peers = {} if args.no_peers else _run_peers(args, scratch)
    for name, result in peers.items():
        rows.append(Row(f"{name} save", "write", _as_measurement(result["save"]), note=result.get("version", "")))
        rows.append(Row(f"{name} resume to first step", "read", _as_measurement(result["resume"])))
    rows.sort(key=lambda row: (row.kind != "write", not row.name.startswith("disk")))

    cairn_save = next(r.result.median_s for r in rows if r.name == "cairn save (sync)")
    cairn_resume = next(r.result.median_s for r in rows if r.name == "cairn resume to first step")
    print(_machine())
    print(_table(rows, nbytes, cairn_save, cairn_resume))
    print()
    print(_targets(rows, nbytes))
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "machine": _machine(),
        "state_bytes": nbytes,
        "rows": {row.name: row.result.as_dict() for row in rows},
        "async_total_seconds": async_totals,
    }


@dataclass
class _Contender:
    name: str
    kind: str
    action: Callable[[], object]
    before: Callable[[], object] | None = None
    after: Callable[[], object] | None = None


def _round_robin(contenders: list[_Contender], runs: int) -> list[Row]:
    """One run of each contender in turn, ``runs`` rounds: the machine's moods (page-cache reclaim, writeback) fall
    on all of them alike instead of on whichever ran first."""
    results = {c.name: Measurement() for c in contenders}
    for _ in range(runs):
        for contender in contenders:
            os.sync()  # untimed: no contender pays for the writeback of the one before it
            once = measure(contender.action, 1, before=contender.before)
            if contender.after is not None:
                contender.after()
            results[contender.name].seconds += once.seconds
            results[contender.name].extra_rss += once.extra_rss
    return [Row(c.name, c.kind, results[c.name]) for c in contenders]


def _resume_to_first_step(args: argparse.Namespace, device: torch.device, path: str, runs: int) -> Measurement:
    """A new run from the checkpoint, timed from the Trainer's construction (the model is built before) to the end
    of its first training step."""
    result = Measurement()
    for _ in range(runs):
        evict_from_page_cache(path)
        net = build_model(args.size_gib)
        with peak_rss() as memory:
            started = time.perf_counter()
            trainer = Trainer(
                model=Regression(net),
                train_dataloader=_loader(device),
                max_duration="2ba",
                optimizers=torch.optim.AdamW(net.parameters(), lr=1e-3),
                device=device.type,
                progress_bar=False,
                load_path=path,
            )
            trainer.fit()
            result.seconds.append(time.perf_counter() - started)
        result.extra_rss.append(memory.extra)
        trainer.close()
        del trainer, net
    return result


def _run_peers(args: argparse.Namespace, scratch: Path) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(HERE / "peers"))
    from setup import ensure_peer  # benchmarks/peers/setup.py

    results = {}
    for name in args.peers.split(","):
        python = ensure_peer(name, log=lambda message: print(message, file=sys.stderr))
        driver = HERE / "peers" / f"{name}_driver.py"
        folder = scratch / name
        command = [
            python,
            str(driver),
            "--size-gib",
            str(args.size_gib),
            "--runs",
            str(args.runs),
            "--dir",
            str(folder),
        ]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(
                f"{name} failed (exit {done.returncode}); its figures are left out:\n{done.stderr[-2000:]}",
                file=sys.stderr,
            )
            continue
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def _as_measurement(data: dict[str, Any]) -> Measurement:
    return Measurement(seconds=list(data["seconds"]), extra_rss=list(data["extra_rss"]))


def _targets(rows: list[Row], nbytes: int) -> str:
    """The issue's targets, each with the figures it compares."""
    time_of = {row.name: row.result.median_s for row in rows}
    extra_of = {row.name: row.result.median_extra_rss for row in rows}
    checks = [
        (
            "sync save >= 0.8x disk write",
            time_of["disk write (plain file + fsync)"] / time_of["cairn save (sync)"],
            0.8,
        ),
        (
            "async stall <= 10% of sync save",
            time_of["cairn save (sync)"] / max(time_of["cairn save (async): training stall"], 1e-9),
            10.0,
        ),
        ("load >= 0.8x disk read", time_of["disk read (plain file)"] / time_of["cairn load (read, verify)"], 0.8),
        ("sync save extra memory <= 10% of state", 0.10 * nbytes / max(extra_of["cairn save (sync)"], 1), 1.0),
    ]
    for peer in ("lightning", "composer"):
        if f"{peer} save" in time_of:
            checks.append(
                (f"save >= 1.5x faster than {peer}", time_of[f"{peer} save"] / time_of["cairn save (sync)"], 1.5)
            )
            checks.append(
                (
                    f"resume >= 1.5x faster than {peer}",
                    time_of[f"{peer} resume to first step"] / time_of["cairn resume to first step"],
                    1.5,
                )
            )
    lines = ["targets (ratio: how many times the target is met, >= the bar passes):"]
    for name, ratio, bar in checks:
        lines.append(f"  {'met ' if ratio >= bar else 'MISS'}  {name:42} {ratio:6.2f} (bar {bar:g})")
    return "\n".join(lines)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"machine: {os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM{gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, cairn {cairn.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size to aim for (default 1)")
    parser.add_argument("--big", action="store_true", help="the 4 GiB workload (same as --size-gib 4)")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure; the median is shown (default 5)")
    parser.add_argument("--dir", default=str(HERE / ".scratch"), help="scratch folder on the disk to measure")
    parser.add_argument("--device", default="cpu", help="where the model lives: cpu or cuda (pinned staging)")
    parser.add_argument("--peers", default="lightning,composer", help="peers to compare, comma-separated")
    parser.add_argument("--no-peers", action="store_true", help="measure cairn and the plain-torch floor only")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()
    if args.big:
        args.size_gib = 4.0
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
