"""How much a checkpoint costs a run, with cairn and with the alternatives, measured in one run on one machine.

    python benchmarks/checkpoint_bench.py                 # ~1 GiB of model + AdamW state, 5 runs each
    python benchmarks/checkpoint_bench.py --big           # ~4 GiB
    python benchmarks/checkpoint_bench.py --no-peers      # cairn and the plain-torch floor only
    make bench                                            # the first line, after setting up .venv

The incremental rows (issue 18) save a fine-tune with a frozen body and a 1%-trained head after each step, the
main state with every chunk new, and keep 10 incremental checkpoints of the fine-tune to measure their disk use
(docs/performance.md, "Incremental checkpoints"; the chunk size is measured by ``benchmarks/chunk_size.py``).

Every figure is the median of ``--runs`` runs. Reads start from the disk, not from memory: the file is fsynced and
its pages dropped from the page cache first. "extra RSS" is the peak resident memory during the operation minus
what the process held when it began, counting anonymous memory only (``RssAnon``): pages of a memory-mapped file
are page cache, which any read fills and the kernel reclaims. Lightning and Composer run in their own virtualenvs
under ``benchmarks/.peers/`` (created on first use), never as dependencies of cairn. cairn's resume runs alternate
with Lightning's, one each, so both are timed at the same moments of the machine (``_resumes``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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
    build_finetune,
    build_model,
    evict_from_page_cache,
    finetune_optimizer,
    fsync_path,
    measure,
    peak_rss,
    state_bytes,
    take_one_step,
)

import cairn  # noqa: E402
from cairn import Trainer  # noqa: E402
from cairn.callbacks import CheckpointSaver  # noqa: E402
from cairn.checkpoint import read_checkpoint  # noqa: E402
from cairn.models import Model  # noqa: E402
from cairn.names import CHUNK_FOLDER  # noqa: E402

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


def _trainer(
    size_gib: float, device: torch.device, max_duration: str, *, finetune: bool = False, **kwargs: Any
) -> Trainer:
    """The bench's model and AdamW after ``max_duration``; with ``finetune``, the frozen-body fine-tune of the same
    checkpoint size (AdamW on its head only, ``workload.build_finetune``)."""
    if finetune:
        net, head = build_finetune(size_gib)
        optimizer = finetune_optimizer(head)
    else:
        net = build_model(size_gib)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    return Trainer(
        model=Regression(net),
        train_dataloader=_loader(device),
        max_duration=max_duration,
        optimizers=optimizer,
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
    nbytes: int | None = None  # the state this row saved, when not the bench's main one


def _table(rows: list[Row], nbytes: int, cairn_save: float, cairn_resume: float) -> str:
    disk = {row.kind: row.result.median_s for row in rows if row.name.startswith("disk")}
    lines = [
        f"{'':34} {'median s':>9} {'best s':>7} {'GiB/s':>7} {'vs disk':>8} {'vs cairn':>9} {'extra RSS':>10}"
        f" {'% state':>8}",
    ]
    for row in rows:
        seconds, extra = row.result.median_s, row.result.median_extra_rss
        versus_cairn = seconds / (cairn_resume if row.kind == "read" else cairn_save)
        size = row.nbytes or nbytes
        lines.append(
            f"{row.name:34} {seconds:9.3f} {min(row.result.seconds):7.3f} {size / seconds / GIB:7.2f} "
            f"{disk[row.kind] / seconds:7.2f}x "
            f"{versus_cairn:8.2f}x {extra / MIB:8.0f}Mi {100 * extra / size:7.1f}%"
            + (f"  {row.note}" if row.note else "")
        )
    lines.append("vs disk: the disk's time over this one's (1.00x = as fast as a plain fsynced write or read).")
    lines.append("vs cairn: this one's time over cairn's sync save (writes) or cairn's resume (reads); >1 = slower.")
    lines.append("GiB/s and % state of the fine-tune rows are of the fine-tune's state (a frozen body, 1% trained).")
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
    if args.resume_only:
        return _resume_only(args, device, contenders, nbytes, [plain, floor, cairn_file], sync_saver, state)
    incremental = _Incremental(args, device, scratch, state)
    contenders += incremental.contenders()
    rows = _round_robin(contenders, runs)
    rows[3].note = f"background write done after {sorted(async_totals)[len(async_totals) // 2]:.2f}s"
    incremental.annotate(rows)
    cairn_resume, peers = _resumes(args, device, cairn_file, scratch, runs)
    rows.append(Row("cairn resume to first step", "read", cairn_resume))

    for name, result in peers.items():
        rows.append(Row(f"{name} save", "write", _as_measurement(result["save"]), note=result.get("version", "")))
        rows.append(Row(f"{name} resume to first step", "read", _as_measurement(result["resume"])))
    rows.sort(key=lambda row: (row.kind != "write", not row.name.startswith("disk")))

    cairn_save = next(r.result.median_s for r in rows if r.name == "cairn save (sync)")
    cairn_resume = next(r.result.median_s for r in rows if r.name == "cairn resume to first step")
    print(_machine())
    print(_table(rows, nbytes, cairn_save, cairn_resume))
    print()
    kept = incremental.kept_disk_use(args, device)
    print(f"\n{kept.summary()}")
    print()
    print(_targets(rows, nbytes, incremental, kept))
    incremental.close()
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "machine": _machine(),
        "state_bytes": nbytes,
        "rows": {row.name: row.result.as_dict() for row in rows},
        "async_total_seconds": async_totals,
        "incremental": {
            "finetune_state_bytes": incremental.finetune_bytes,
            "finetune_changed_bytes": incremental.changed_bytes,
            "finetune_written_bytes": incremental.written,
            "kept_disk_bytes": kept.used,
            "full_disk_bytes": kept.full,
        },
    }


def _resume_only(
    args: argparse.Namespace,
    device: torch.device,
    contenders: list[_Contender],
    nbytes: int,
    files: list[str],
    sync_saver: CheckpointSaver,
    state: Any,
) -> dict[str, Any]:
    """``--resume-only``: the read rows, cairn's resume and the peers' resume, for working on resume quickly.

    The three files are written once, untimed; the write rows and the incremental rows are skipped."""
    plain, floor, cairn_file = files
    next(c for c in contenders if c.name.startswith("disk write")).action()
    next(c for c in contenders if c.name.startswith("torch.save")).action()
    sync_saver.save(state)
    rows = _round_robin([c for c in contenders if c.kind == "read"], args.runs)
    cairn_resume_runs, peers = _resumes(args, device, cairn_file, Path(args.dir), args.runs)
    rows.append(Row("cairn resume to first step", "read", cairn_resume_runs))
    for name, result in peers.items():
        rows.append(Row(f"{name} resume to first step", "read", _as_measurement(result["resume"])))
    time_of = {row.name: row.result.median_s for row in rows}
    cairn_resume = time_of["cairn resume to first step"]
    print(_machine())
    print(_table(rows, nbytes, cairn_resume, cairn_resume))
    print(f"\ncairn load vs disk read: {time_of['disk read (plain file)'] / time_of['cairn load (read, verify)']:.2f}x")
    for name in peers:
        print(f"cairn resume / {name} resume: {cairn_resume / time_of[f'{name} resume to first step']:.2f}x")
    shutil.rmtree(args.dir, ignore_errors=True)
    return {"machine": _machine(), "state_bytes": nbytes, "rows": {row.name: row.result.as_dict() for row in rows}}


# -- incremental checkpoints (issue 18) ---------------------------------------------------------------------------

_FULL_FT = "cairn save (sync), fine-tune"
_INC_FT = "cairn incremental, fine-tune"
_INC_ALL = "cairn incremental, all changed"


def _disk_use(path: str) -> int:
    """What ``du`` counts: the blocks of every file under ``path`` (links not followed)."""
    if os.path.isfile(path):
        return os.stat(path).st_blocks * 512
    total = 0
    for folder, _, names in os.walk(path):
        total += sum(os.lstat(os.path.join(folder, name)).st_blocks * 512 for name in names)
    return total


def _chunk_files(root: str) -> dict[str, int]:
    try:
        return {e.name: e.stat().st_size for e in os.scandir(os.path.join(root, CHUNK_FOLDER)) if len(e.name) == 32}
    except FileNotFoundError:
        return {}


@dataclass
class _KeptDiskUse:
    used: int  # du of the saver's folder: manifests and the chunk folder
    full: int  # du of one full checkpoint of the same state
    kept: int

    def summary(self) -> str:
        return (
            f"{self.kept} kept incremental checkpoints of the fine-tune (one per step, keep {self.kept}): "
            f"{self.used / MIB:.0f} MiB on disk; one full checkpoint: {self.full / MIB:.0f} MiB "
            f"({self.used / self.full:.2f}x)"
        )


class _Incremental:
    """The rows of issue 18: (a) a fine-tune with a frozen body whose head alone trains, saved incrementally after
    each step, against a full sync save of the same state; (b) the bench's state saved incrementally when every
    chunk is new; (c) the disk that 10 kept incremental checkpoints of (a) take."""

    def __init__(self, args: argparse.Namespace, device: torch.device, scratch: Path, state: Any) -> None:
        self.scratch = scratch
        self.trainer = _trainer(args.size_gib, device, "1ba", finetune=True)
        self.trainer.fit()  # AdamW's moments of the head exist
        self.state = self.trainer.state
        net = self.state.model.weights_module()
        head = net[-1]
        self.net, self.optimizer = net, self.state.optimizers[0]
        self.finetune_bytes = state_bytes(net, self.optimizer)
        self.changed_bytes = state_bytes(head, self.optimizer)  # the head, its moments and steps
        self.full_folder = str(scratch / "ft-full")
        self.inc_folder = str(scratch / "ft-inc")
        self.all_folder = str(scratch / "inc-all")
        self.full_saver = CheckpointSaver(folder=self.full_folder, filename="ckpt.pt", overwrite=True)
        self.inc_saver = CheckpointSaver(folder=self.inc_folder, filename="ckpt.pt", overwrite=True, incremental=True)
        self.inc_saver.save(self.state)  # the body's chunks: written by the run's first save, reused after
        self.all_saver = CheckpointSaver(folder=self.all_folder, filename="ckpt.pt", overwrite=True, incremental=True)
        self.main_state = state
        self.written: list[int] = []
        self._before: dict[str, int] = {}

    def contenders(self) -> list[_Contender]:
        return [
            _Contender(_FULL_FT, "write", lambda: self.full_saver.save(self.state), self._train_a_step),
            _Contender(_INC_FT, "write", lambda: self.inc_saver.save(self.state), self._step_and_list, self._count),
            _Contender(_INC_ALL, "write", lambda: self.all_saver.save(self.main_state), _remove(self.all_folder)),
        ]

    def _train_a_step(self) -> None:
        """Untimed: one step of the head, as between two saves of a real fine-tune."""
        take_one_step(self.net, self.optimizer)

    def _step_and_list(self) -> None:
        self._train_a_step()
        self._before = _chunk_files(self.inc_folder)

    def _count(self) -> None:
        """The bytes the save just wrote: chunk files that were not there before it, and its manifest."""
        new = sum(size for key, size in _chunk_files(self.inc_folder).items() if key not in self._before)
        self.written.append(new + os.path.getsize(os.path.join(self.inc_folder, "ckpt.pt")))

    @property
    def median_written(self) -> int:
        return sorted(self.written)[len(self.written) // 2]

    def annotate(self, rows: list[Row]) -> None:
        for row in rows:
            if row.name in (_FULL_FT, _INC_FT):
                row.nbytes = self.finetune_bytes
            if row.name == _INC_FT:
                row.note = (
                    f"wrote {self.median_written / MIB:.1f} MiB per save; changed: {self.changed_bytes / MIB:.1f} MiB"
                )

    def kept_disk_use(self, args: argparse.Namespace, device: torch.device) -> _KeptDiskUse:
        """A fine-tune run saving incrementally after every step, keeping 10: the folder's ``du`` at the end."""
        folder = str(self.scratch / "ft-kept")
        kept = 10
        trainer = _trainer(
            args.size_gib,
            device,
            f"{kept + 2}ba",
            finetune=True,
            save_folder=folder,
            save_interval="1ba",
            save_num_checkpoints_to_keep=kept,
            save_incremental=True,
        )
        trainer.fit()
        trainer.close()
        del trainer
        return _KeptDiskUse(_disk_use(folder), _disk_use(os.path.join(self.full_folder, "ckpt.pt")), kept)

    def close(self) -> None:
        self.trainer.close()


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


def _resume_once(args: argparse.Namespace, device: torch.device, path: str, result: Measurement) -> None:
    """One new run from the checkpoint, timed from the Trainer's construction (the model is built before) to the
    end of its first training step, added to ``result``."""
    gc.collect()  # untimed, as the peer drivers do: the last run's trainer (its cycles) is freed here, not below
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


# The peer drivers that accept --take-turns (benchmarks/peers/driver_common.py ``taking_turns``); the others run
# whole after cairn's resumes, as before.
_TAKES_TURNS = frozenset({"lightning"})


def _resumes(
    args: argparse.Namespace, device: torch.device, path: str, scratch: Path, runs: int
) -> tuple[Measurement, dict[str, dict[str, Any]]]:
    """cairn's resume runs and every peer's figures (their saves and resumes).

    A peer that takes turns has its saves done first, then its resume runs alternate with cairn's, one each: both
    are timed at the same moments of the machine (on a shared machine, minutes apart is another machine). Each
    side builds its model, frees the last run's trainer and evicts its file untimed, and nothing of the other
    side runs while one is timed. cairn's runs are in this long-lived process, the peer's in its driver, which has
    saved before it resumes: neither starts fresh."""
    names = [] if args.no_peers else args.peers.split(",")
    turns = [_Peer(args, name, scratch, take_turns=True) for name in names if name in _TAKES_TURNS]
    cairn = Measurement()
    for _ in range(runs):
        _resume_once(args, device, path, cairn)
        for peer in turns:
            peer.take_turn()
    results = {peer.name: peer.finish() for peer in turns}
    for name in names:
        if name not in _TAKES_TURNS:
            results[name] = _Peer(args, name, scratch, take_turns=False).finish()
    return cairn, {name: result for name, result in results.items() if result is not None}


class _Peer:
    """A peer's driver, in its own venv and process; its figures are its last line of output (one JSON object)."""

    def __init__(self, args: argparse.Namespace, name: str, scratch: Path, *, take_turns: bool) -> None:
        sys.path.insert(0, str(HERE / "peers"))
        from setup import ensure_peer  # benchmarks/peers/setup.py

        python = ensure_peer(name, log=lambda message: print(message, file=sys.stderr))
        driver = HERE / "peers" / f"{name}_driver.py"
        command = [python, str(driver), "--size-gib", str(args.size_gib), "--runs", str(args.runs)]
        command += ["--dir", str(scratch / name)] + (["--take-turns"] if take_turns else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        self.name = name
        self._stderr = tempfile.TemporaryFile("w+")  # banners and warnings: read only if the driver fails
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if take_turns else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._result: dict[str, Any] | None = None
        self._ready = take_turns and self._next_word()  # its saves done, waiting for its first resume

    def _next_word(self) -> bool:
        """Read the driver's output up to its next ``ready`` (True) or its figures (False: it is done)."""
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.strip() == "ready":
                return True
            if line.startswith("{"):
                self._result = json.loads(line)
                return False
        return False

    def take_turn(self) -> None:
        """Let the driver prepare and time one resume; return once it is done with it."""
        if not self._ready:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.write("go\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            self._ready = False
            return
        self._ready = self._next_word()

    def finish(self) -> dict[str, Any] | None:
        """The driver's figures, or None (and its error shown) if it failed."""
        if self._process.stdin is not None:
            self._process.stdin.close()  # a driver still waiting for its turn stops
        if self._result is None:
            self._next_word()
        returncode = self._process.wait()
        if returncode != 0 or self._result is None:
            self._stderr.seek(0)
            print(
                f"{self.name} failed (exit {returncode}); its figures are left out:\n{self._stderr.read()[-2000:]}",
                file=sys.stderr,
            )
            return None
        return self._result


def _as_measurement(data: dict[str, Any]) -> Measurement:
    return Measurement(seconds=list(data["seconds"]), extra_rss=list(data["extra_rss"]))


def _targets(rows: list[Row], nbytes: int, incremental: _Incremental, kept: _KeptDiskUse) -> str:
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
    checks += [
        ("incremental fine-tune: bytes <= 1.25x changed", incremental.changed_bytes / incremental.median_written, 0.8),
        ("incremental fine-tune: time <= 10% of full", time_of[_FULL_FT] / time_of[_INC_FT], 10.0),
        ("incremental, all changed <= 1.1x sync save", time_of["cairn save (sync)"] / time_of[_INC_ALL], 1 / 1.1),
        ("10 kept incremental <= 1.6x one full on disk", kept.full / kept.used, 1 / 1.6),
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
        lines.append(f"  {'met ' if ratio >= bar else 'MISS'}  {name:46} {ratio:6.2f} (bar {bar:.3g})")
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
    parser.add_argument(
        "--resume-only", action="store_true", help="only the read rows and resume to first step (cairn and peers)"
    )
    args = parser.parse_args()
    if args.big:
        args.size_gib = 4.0
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
