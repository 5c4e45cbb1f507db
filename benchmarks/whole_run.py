"""What checkpointing costs a whole training run, as a user feels it: a real ``cairn.Trainer`` loop saving every k
batches, against the same loop saving nothing, with cairn (sync and async), DCP ``async_save`` and plain
``torch.save`` in the same run.

    python benchmarks/whole_run.py                       # ~0.75 GiB of MLP + AdamW, 36 batches, a save every 8
    python benchmarks/whole_run.py --busy 2              # two extra processes spin on the CPU meanwhile
    python benchmarks/whole_run.py --size-gib 0.5 --batches 60 --every 12 --runs 5
    python benchmarks/whole_run.py --device cuda         # the model on the GPU; DCP's pinned stager too

A save's own stall (``checkpoint_bench.py``'s "training stall") is not what it costs a run: a background write
competes with training for the CPU, the memory bus and the GIL, and the run ends only when the last write has.
Here each contender trains the same model for the same batches with the same saves, and the figures are:

- *run s*: ``Trainer.fit`` from start to return, the end-of-fit wait for the last background write included;
- *per save s*: (run time - the no-save run of the same round) / saves, the median over rounds;
- *w/o end wait*: the same up to ``FIT_END``, before the wait for the last background write: what each save costs
  while training goes on (in a run of hundreds of saves the one final wait is spread thin; here it is not);
- *median / slowest batch s*: a batch is timed from its ``BATCH_START`` to the next one's (the last to
  ``FIT_END``), so a save's stall on the training thread lands in the batch that saved;
- *share during write*: the median time of a batch that no write overlapped, divided by the mean time of the
  batches whose middle fell while a background write was in flight (their compute, ``BATCH_START`` to
  ``BATCH_END``, without the save calls): the training thread's rate while a checkpoint is written, as a share of
  its rate without one. The write's span is when cairn's background thread runs the write (its ``finish``
  function, wrapped here) or, for DCP, from ``async_save``'s return to its future's completion.

With ``--device cuda`` the model, its AdamW state and the batches live on the GPU, every batch boundary is stamped
after ``torch.cuda.synchronize()`` (so a batch's time is its kernels' time), cairn stages into pinned host memory,
and a sixth contender joins: DCP ``async_save`` with its pinned-memory stager (``DefaultStager`` with pinned
memory, staging on a side stream in its own thread; the next batch waits for the staging to end before it changes
the weights, as DCP asks). The batch size is then chosen so that a batch takes ``--batch-seconds`` of GPU time
(unless ``--batch-size`` is given): with batches of a few milliseconds no write could hide behind training.

Contenders take turns, one run each per round, the order rotated by one each round, with ``os.sync()`` between
runs (untimed) so that writeback of one does not fall on the next; a short untimed run comes first, so that no
contender pays for first-touch costs. Figures are medians over rounds. Scratch files live under
``benchmarks/.scratch/`` and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402 - the benchmark's own module, found beside this file

import cairn  # noqa: E402
from cairn.core import Callback  # noqa: E402

SCRATCH = Path(__file__).resolve().parent / ".scratch" / "whole_run"
CONTENDERS = ("no saves", "cairn sync", "cairn async", "DCP async_save", "torch.save")
DCP_PINNED = "DCP pinned"  # async_save with DCP's pinned-memory stager: on a GPU only (it needs an accelerator)
ASYNC_TARGET_CPU = 0.3
ASYNC_TARGET_GPU = 0.05


class LossOf(nn.Module):
    """The workload's MLP as a plain module whose forward returns its loss, as the Trainer takes it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch).pow(2).mean()


@dataclass
class Timeline:
    """When each batch started and ended, and when background writes were in flight (perf_counter seconds)."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    fit_start: float = 0.0
    fit_end: float = 0.0
    writes: list[tuple[float, float]] = field(default_factory=list)

    def until_fit_end(self) -> float:
        """``Trainer.fit`` up to FIT_END: the run without the end-of-fit wait for the last background write."""
        return self.fit_end - self.fit_start

    def steps(self) -> list[float]:
        """Each batch from its start to the next one's (the last to FIT_END): compute plus any save stall."""
        bounds = [*self.starts[1:], self.fit_end]
        return [end - start for start, end in zip(self.starts, bounds, strict=True)]

    def share_during_write(self) -> tuple[float | None, int]:
        """(the training rate while a write is in flight / its rate without one, batches that overlapped one)."""
        computes = [end - start for start, end in zip(self.starts, self.ends, strict=True)]
        middles = [(start + end) / 2 for start, end in zip(self.starts, self.ends, strict=True)]
        during = [c for c, m in zip(computes, middles, strict=True) if any(s <= m <= e for s, e in self.writes)]
        clear = [c for c, m in zip(computes, middles, strict=True) if not any(s <= m <= e for s, e in self.writes)]
        if not during or not clear:
            return None, len(during)
        return statistics.median(clear) / statistics.mean(during), len(during)


def synchronizer(device: str) -> Callable[[], None]:
    """What makes a timestamp mean "the work so far is done": on a GPU, waiting for its queued kernels."""
    return torch.cuda.synchronize if device == "cuda" else lambda: None


class BatchClock(Callback):
    """Records the training thread's batch boundaries; listed before the savers, so FIT_END is stamped before any
    end-of-fit wait for a background write (that wait is in the run's time, not in a batch's). On a GPU each stamp
    waits for the kernels queued so far, else a batch would be timed by its launches, not its work."""

    def __init__(self, timeline: Timeline, synchronize: Callable[[], None]) -> None:
        self.timeline = timeline
        self.synchronize = synchronize

    def batch_start(self, state: Any, logger: Any) -> None:
        self.synchronize()
        self.timeline.starts.append(time.perf_counter())

    def batch_end(self, state: Any, logger: Any) -> None:
        self.synchronize()
        self.timeline.ends.append(time.perf_counter())

    def fit_end(self, state: Any, logger: Any) -> None:
        self.synchronize()
        self.timeline.fit_end = time.perf_counter()


class EveryKBatches(Callback):
    """Calls ``save(folder_for_this_save)`` at the batch checkpoint of every k-th batch and of the run's last batch,
    and ``finish()`` at the end of fit: the way a user drives a checkpointer cairn's Trainer does not know. The last
    batch is saved as cairn's saver saves it (a run's end is always saved), so every contender writes the same
    checkpoints: with one save fewer, a contender's cost per save was averaged over other saves than cairn's."""

    def __init__(self, every: int, folder: Path, save: Callable[[Path], None], finish: Callable[[], None]) -> None:
        self.every, self.folder, self._save, self._finish = every, folder, save, finish

    def batch_checkpoint(self, state: Any, logger: Any) -> None:
        batch = int(state.timestamp.batch)
        if batch % self.every == 0 or state.is_done():
            self._save(self.folder / f"ba{batch}")

    def fit_end(self, state: Any, logger: Any) -> None:
        self._finish()


def state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def torch_save_callback(every: int, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Callback:
    """Plain ``torch.save`` of both state dicts on the training thread, then fsync (cairn's saves include one)."""

    def save(path: Path) -> None:
        with open(path.with_suffix(".pt"), "wb") as file:
            torch.save(state_dicts(model, optimizer), file)
            file.flush()
            os.fsync(file.fileno())

    return EveryKBatches(every, folder, save, lambda: None)


class WaitForStaging(EveryKBatches):
    """``EveryKBatches`` that, at the start of each batch, first waits for the staging of the save before it (DCP's
    pinned stager copies on a thread of its own; the weights must not change until it is done)."""

    def __init__(self, *args: Any, staging: list[Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.staging = staging

    def batch_start(self, state: Any, logger: Any) -> None:
        while self.staging:
            self.staging.pop().result()


def dcp_callback(
    every: int,
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    timeline: Timeline,
    *,
    pinned: bool = False,
) -> Callback:
    """DCP's ``async_save`` in one process (``no_dist=True``: no process group is needed) with its thread executor;
    like cairn's async saver, one save in flight at a time: the next waits for the previous.

    Without ``pinned``: DCP's default stager (plain host memory, copied on the training thread). With ``pinned`` (a
    GPU only): one ``DefaultStager`` kept for the run, pinned host memory reused from save to save, non-blocking
    copies on a side stream in the stager's thread; ``async_save`` then answers an ``AsyncSaveResponse`` whose
    staging must end before the next batch changes the weights (``WaitForStaging``)."""
    import torch.distributed.checkpoint as dcp

    in_flight: list[Any] = []
    staging: list[Any] = []
    stager = None
    if pinned:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        options = StagingOptions(
            use_pinned_memory=True, use_shared_memory=False, use_async_staging=True, use_non_blocking_copy=True
        )
        stager = DefaultStager(options)  # built on the training thread, after the model is on the GPU (DCP asks)

    def finish() -> None:
        while staging:
            staging.pop().result()
        while in_flight:
            in_flight.pop().result()
        if stager is not None:
            stager.close()  # the caller owns a stager it passes: its pinned memory is freed here

    def save(path: Path) -> None:
        while in_flight:
            in_flight.pop().result()
        extra = {} if stager is None else {"async_stager": stager}
        answer = dcp.async_save(state_dicts(model, optimizer), checkpoint_id=str(path), no_dist=True, **extra)
        future = getattr(answer, "upload_completion", answer)  # an AsyncSaveResponse when staging is asynchronous
        if future is not answer:
            staging.append(answer.staging_completion)
        started = time.perf_counter()
        span = len(timeline.writes)
        timeline.writes.append((started, float("inf")))  # closed by the callback below
        future.add_done_callback(lambda _: _close_span(timeline, span))
        in_flight.append(future)

    if pinned:
        return WaitForStaging(every, folder, save, finish, staging=staging)
    return EveryKBatches(every, folder, save, finish)


def _close_span(timeline: Timeline, index: int) -> None:
    start, _ = timeline.writes[index]
    timeline.writes[index] = (start, time.perf_counter())


def time_cairn_writes(trainer: cairn.Trainer, timeline: Timeline) -> None:
    """Wrap the async saver's background work so the timeline knows when each write runs (start to publish)."""
    for saver in trainer._savers():
        background = saver._background
        start = background.start

        def timed_start(finish: Callable[[], None], start: Callable[..., None] = start) -> None:
            def timed() -> None:
                began = time.perf_counter()
                try:
                    finish()
                finally:
                    timeline.writes.append((began, time.perf_counter()))

            start(timed)

        background.start = timed_start  # type: ignore[method-assign]


@dataclass
class Result:
    run_s: list[float] = field(default_factory=list)
    per_save_s: list[float] = field(default_factory=list)
    per_save_until_fit_end_s: list[float] = field(default_factory=list)
    median_batch_s: list[float] = field(default_factory=list)
    slowest_batch_s: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)
    overlapped: list[int] = field(default_factory=list)
    saves: int = 0


def one_run(
    name: str, args: argparse.Namespace, model: nn.Module, optimizer: torch.optim.Optimizer, loader: list[Any]
) -> tuple[float, Timeline, int]:
    """Train ``args.batches`` batches with contender ``name``'s saves; (fit seconds, its timeline, saves made)."""
    timeline = Timeline()
    folder = SCRATCH / name.replace(" ", "-").replace(".", "-")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    callbacks: list[Callback] = [BatchClock(timeline, synchronizer(args.device))]
    saving: dict[str, Any] = {}
    if name in ("DCP async_save", DCP_PINNED):
        callbacks.append(dcp_callback(args.every, folder, model, optimizer, timeline, pinned=name == DCP_PINNED))
    elif name == "torch.save":
        callbacks.append(torch_save_callback(args.every, folder, model, optimizer))
    elif name != "no saves":
        saving = {
            "save_folder": str(folder),
            "save_interval": f"{args.every}ba",
            "save_overwrite": True,
            "save_async": name == "cairn async",
        }
    trainer = cairn.Trainer(
        model=LossOf(model),
        train_dataloader=loader,
        max_duration=f"{args.batches}ba",
        optimizers=optimizer,
        device=args.device,
        progress_bar=False,
        callbacks=callbacks,
        **saving,
    )
    time_cairn_writes(trainer, timeline)
    try:
        started = timeline.fit_start = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
        saves = len(trainer.saved_checkpoints)
    finally:
        trainer.close()
    if name in ("DCP async_save", DCP_PINNED, "torch.save"):
        saves = sum(1 for _ in folder.iterdir())
    shutil.rmtree(folder, ignore_errors=True)
    return seconds, timeline, saves


def contenders(device: str) -> tuple[str, ...]:
    """Every contender on the CPU; on a GPU, DCP's pinned stager too, where this torch has it."""
    if device != "cuda":
        return CONTENDERS
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa: F401
    except ImportError:
        print(f"{DCP_PINNED}: left out (this torch has no torch.distributed.checkpoint.staging.DefaultStager)")
        return CONTENDERS
    return (*CONTENDERS, DCP_PINNED)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    """One step as the Trainer takes it (``LossOf``'s loss, backward, AdamW), outside any Trainer."""
    model(batch).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def calibrated_batch_size(model: nn.Module, optimizer: torch.optim.Optimizer, seconds: float) -> int:
    """On a GPU, the batch size whose step takes about ``seconds``: timed at a probe size (after two warm-up steps),
    scaled linearly, rounded to 256 and kept within what the activations of a large MLP leave room for."""
    probe = 1024
    batch = torch.randn(probe, workload.WIDTH, device="cuda")
    for _ in range(2):
        train_step(model, optimizer, batch)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        train_step(model, optimizer, batch)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - started) / 3
    return int(min(max(round(probe * seconds / per_step / 256) * 256, 256), 32768))


def prepare(args: argparse.Namespace) -> tuple[nn.Module, torch.optim.Optimizer, list[torch.Tensor]]:
    """The model and its AdamW, with moments already (one real step), and the batches, all on ``args.device``."""
    model = workload.build_model(args.size_gib).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, torch.randn(2, workload.WIDTH, device=args.device))  # moments before any run
    if args.batch_size is None:  # on a GPU only (16 on the CPU)
        args.batch_size = calibrated_batch_size(model, optimizer, args.batch_seconds)
        print(f"batches of {args.batch_size}: a step takes about {args.batch_seconds} s", flush=True)
    torch.manual_seed(1)
    loader = [torch.randn(args.batch_size, workload.WIDTH, device=args.device) for _ in range(args.batches + 1)]
    return model, optimizer, loader  # one batch more than the run takes: no epoch ends


def run_rounds(
    args: argparse.Namespace, results: dict[str, Result], after_round: Callable[[], None] = lambda: None
) -> None:
    """Fills ``results`` round by round (``after_round`` is told after each), so that an interrupted run (Ctrl-C,
    ``timeout -s INT``) keeps every finished round's figures."""
    model, optimizer, loader = prepare(args)
    warm_up = argparse.Namespace(**{**vars(args), "batches": 3})
    one_run("no saves", warm_up, model, optimizer, loader)  # untimed: first-touch costs fall on no contender
    names = tuple(results)
    for round_number in range(args.runs):
        order = names[round_number % len(names) :] + names[: round_number % len(names)]
        measured = {}
        for name in order:
            os.sync()  # untimed: the writeback of the run before is not this one's
            measured[name] = one_run(name, args, model, optimizer, loader)
            print(f"  round {round_number + 1} {name:<15} {measured[name][0]:7.2f} s", flush=True)
        none_s, none_timeline, _ = measured["no saves"]
        for name in names:
            record(results[name], *measured[name], none_s=none_s, none_until_fit_end_s=none_timeline.until_fit_end())
        after_round()


def record(
    result: Result, seconds: float, timeline: Timeline, saves: int, *, none_s: float, none_until_fit_end_s: float
) -> None:
    """One run's figures; its overhead per save is against the no-save run of the same round."""
    result.saves = saves
    result.run_s.append(seconds)
    if saves:
        result.per_save_s.append((seconds - none_s) / saves)
        result.per_save_until_fit_end_s.append((timeline.until_fit_end() - none_until_fit_end_s) / saves)
    steps = timeline.steps()
    result.median_batch_s.append(statistics.median(steps))
    result.slowest_batch_s.append(max(steps))
    share, overlapped = timeline.share_during_write()
    if share is not None:
        result.share.append(share)
    result.overlapped.append(overlapped)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def table(results: dict[str, Result]) -> str:
    sync = _median(results["cairn sync"].per_save_s)
    lines = [
        f"{'':<16}{'run s':>8}{'per save s':>12}{'vs cairn sync':>15}{'w/o end wait':>14}{'median batch s':>16}"
        f"{'slowest batch s':>17}{'share during write':>20}"
    ]
    for name, result in results.items():
        per_save = _median(result.per_save_s)
        ratio = None if per_save is None or not sync else per_save / sync
        share = _median(result.share)
        overlapped = statistics.median(result.overlapped) if result.overlapped else 0
        lines.append(
            f"{name:<16}{_cell(_median(result.run_s)):>8}{_cell(per_save):>12}{_cell(ratio, suffix='x'):>15}"
            f"{_cell(_median(result.per_save_until_fit_end_s)):>14}"
            f"{_cell(_median(result.median_batch_s), 3):>16}{_cell(_median(result.slowest_batch_s), 3):>17}"
            f"{_cell(share) + (f' ({overlapped:g} ba)' if share is not None else ''):>20}"
        )
    return "\n".join(lines)


def targets(results: dict[str, Result], device: str = "cpu") -> str:
    sync, async_ = _median(results["cairn sync"].per_save_s), _median(results["cairn async"].per_save_s)
    if sync is None or async_ is None or sync <= 0:
        return "target: async overhead per save <= its bar x sync's: not measurable (sync cost nothing measurable)"
    ratio = async_ / sync
    share = _median(results["cairn async"].share)
    figures = f"{ratio:.2f}x ({async_:.2f} s against {sync:.2f} s)"
    bars = {"CPU": ASYNC_TARGET_CPU, "GPU": ASYNC_TARGET_GPU}
    here, other = ("GPU", "CPU") if device == "cuda" else ("CPU", "GPU")
    lines = [
        f"target ({here}): cairn async overhead per save <= {bars[here]}x sync's: {figures} "
        f"-> {'met' if ratio <= bars[here] else 'MISS'}",
        f"target ({other}): <= {bars[other]}x sync's: not measured here (this run is on the {here})",
        f"issue 19 point 1: the training thread keeps >= 90% of its rate during a write: "
        f"{_cell(share)} -> {'met' if share is not None and share >= 0.9 else 'MISS'}",
    ]
    sync_in_fit = _median(results["cairn sync"].per_save_until_fit_end_s)
    async_in_fit = _median(results["cairn async"].per_save_until_fit_end_s)
    if sync_in_fit and async_in_fit is not None:
        lines.append(
            f"without the end-of-fit wait for the last write: cairn async {async_in_fit / sync_in_fit:.2f}x sync's "
            f"({async_in_fit:.2f} s against {sync_in_fit:.2f} s; the bar {bars[here]}x, for reading only)"
        )
    for peer in ("DCP async_save", DCP_PINNED, "torch.save"):
        theirs = _median(results[peer].per_save_s) if peer in results else None
        if theirs:
            lines.append(f"cairn async per save / {peer}'s: {async_ / theirs:.2f}x ({theirs:.2f} s)")
    return "\n".join(lines)


def spin_processes(count: int) -> list[subprocess.Popen[bytes]]:
    """``count`` processes that keep a core busy each, as dataloader workers would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def machine(device: str = "cpu") -> str:
    cores = os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if device == "cuda" else ""
    return (
        f"machine: {cores} cores, {memory:.0f} GiB RAM{gpu}; Python {platform.python_version()}, torch "
        f"{torch.__version__}, cairn {cairn.__version__}; load average {os.getloadavg()[0]:.2f} at the start"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=0.75, help="weights + AdamW moments (default 0.75)")
    parser.add_argument("--batches", type=int, default=36, help="batches per run (default 36)")
    parser.add_argument("--every", type=int, default=8, help="save every k batches (default 8)")
    parser.add_argument(
        "--batch-size", type=int, help="samples per batch (default 16 on the CPU; on a GPU, see --batch-seconds)"
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=0.15,
        help="on a GPU without --batch-size: the batch size is chosen so a step takes about this long (default 0.15)",
    )
    parser.add_argument("--runs", type=int, default=3, help="rounds, contenders in turns (default 3)")
    parser.add_argument("--busy", type=int, default=0, help="extra processes spinning on the CPU (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model trains (default cpu)")
    parser.add_argument("--json", help="also write every figure to this JSON file (rewritten after each round)")
    args = parser.parse_args()
    if args.batch_size is None and args.device == "cpu":
        args.batch_size = 16
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    return args


def write_json(path: str, args: argparse.Namespace, results: dict[str, Result], rounds: int) -> None:
    figures = {
        "machine": machine(args.device),
        "arguments": vars(args),
        "rounds_completed": rounds,
        "results": {name: asdict(result) for name, result in results.items()},
        "medians": {
            name: {key: _median(values) for key, values in asdict(result).items() if isinstance(values, list)}
            for name, result in results.items()
        },
    }
    if rounds:
        figures["table"], figures["targets"] = table(results), targets(results, args.device)
    Path(path).write_text(json.dumps(figures, indent=1))


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP's note for no_dist=True
    print(machine(args.device))
    size = workload.layers_for(args.size_gib) * (workload.WIDTH**2 + workload.WIDTH) * 4 * 3  # weights, 2 moments
    print(
        f"state: {size / 2**30:.2f} GiB of weights and AdamW moments; {args.batches} batches of "
        f"{args.batch_size or 'calibrated'}, a save every {args.every}; {args.runs} rounds; {args.busy} busy "
        f"processes; device {args.device}",
        flush=True,
    )
    results = {name: Result() for name in contenders(args.device)}

    def after_round() -> None:
        if args.json:  # a run cut short keeps the rounds it finished
            write_json(args.json, args, results, len(results["no saves"].run_s))

    spinners = spin_processes(args.busy)
    try:
        run_rounds(args, results, after_round)
    except KeyboardInterrupt:  # ``timeout -s INT``: the rounds finished so far still make a table
        print(f"interrupted: {len(results['no saves'].run_s)} of {args.runs} rounds finished", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        shutil.rmtree(SCRATCH, ignore_errors=True)
    rounds = len(results["no saves"].run_s)
    if args.json:
        write_json(args.json, args, results, rounds)
    if rounds:
        print(table(results))
        print(targets(results, args.device))


if __name__ == "__main__":
    main()
