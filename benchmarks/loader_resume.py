"""What resuming mid-epoch costs before the first step, at batch 100 and at batch 100,000 of one epoch: with a data
loader that has its own state (torchdata's ``StatefulDataLoader``) and with plain ``DataLoader`` s that cairn has to
replay or skip.

    python benchmarks/loader_resume.py                   # N = 100 and 100,000; 5 rounds (1 to 2 minutes on 2 cores)
    python benchmarks/loader_resume.py --runs 9 --no-index-skip
    python benchmarks/loader_resume.py --points 100,10000,100000 --batch-size 8

The data is a synthetic tokenized corpus: a map-style dataset whose sample ``i`` is ``--seq-len`` token ids worked
out from ``i`` (no file, nothing cached), read in order, ``--batch-size`` samples a batch, one epoch long enough for
every resume point. The loaders:

- *StatefulDataLoader, 2 workers*: torchdata's loader; cairn saves its ``state_dict()`` per rank in the checkpoint
  and loads it back before the epoch's iterator is made, so nothing before the resume point is fetched;
- *DataLoader, 2 workers*: the same data through a plain loader, which offers no state: cairn replays the epoch,
  fetching the N batches before the resume point through the workers and throwing them away (with a warning);
- *DataLoader, 0 workers*: the same data loaded in the main process: cairn skips the N batches by index alone,
  drawing the sampler's indices without fetching a sample.

Every loader collates a batch into one NumPy array (the model turns it into a tensor): a batch then crosses from a
worker as a few hundred pickled bytes instead of a shared-memory tensor, the cheapest fetch there is, so the
replay's figures here are a lower bound on what a real corpus (files to read, text to tokenize) costs per batch.

**How the checkpoint at batch N is made** (once per loader and N, untimed; the N batches are not trained, which
at 100,000 would take longer than the whole benchmark). A ``cairn.Trainer`` with a one-parameter model and the
loader trains one batch and its own ``CheckpointSaver`` writes the checkpoint after it, so the file holds what a real
run's holds: the epoch's start (the random state the replay rewinds to, recorded by the Trainer when it made the
epoch's iterator), the model and optimizer, and, for the stateful loader, its ``state_dict()`` taken by cairn at
the save. To stand at batch N, a callback (a) moves the Trainer's timestamp to batch N - 1 of epoch 0 when the
first batch has been fetched, so that the step trained is batch N; and (b) for the stateful loader only, loads into
it, before the Trainer makes the epoch's iterator, the state the same kind of loader had after N - 1 batches,
taken from one that was driven there outside the Trainer (one pass over the largest N, through its workers). The
batch trained is then really batch N, and the state saved is that of a loader that has handed out N batches. The
plain loaders keep no state of their own, so for them the timestamp is all that tells batch 100 from batch 100,000.

**What is timed**: from just before ``cairn.Trainer(..., load_path=checkpoint)`` is called with a fresh loader of the
same kind to the end of the first training step of ``fit()`` (its ``BATCH_END``): loading the checkpoint, starting
the loader's workers, getting back to batch N by whatever means cairn has, fetching batch N + 1 and training on it.
Each timed run checks that the first batch trained after the resume is batch N + 1 of the epoch (sample
``N * batch_size`` first), and notes whether cairn warned that it replayed batches. The kinds and resume points take
turns, one run each per round, the order rotated by one each round; figures are medians over rounds, and the ratio
is the median at the largest N over the median at the smallest. Scratch files live under
``benchmarks/.scratch/loader_resume/`` and are removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import cairn
from cairn.core import Callback

SCRATCH = Path(__file__).resolve().parent / ".scratch" / "loader_resume"
STATEFUL, REPLAYED, INDEX_SKIP = "StatefulDataLoader, 2 workers", "DataLoader, 2 workers", "DataLoader, 0 workers"
VOCAB = 50_257
SEED = 17
REPLAY_WARNING = "fetches and throws away"  # in the warning cairn logs when it replays (trainer/dataloader.py)


class TokenCorpus(Dataset):
    """``length`` samples of ``seq_len`` token ids, sample ``i`` worked out from ``i``: a corpus that costs nothing
    to make, whatever its length, and whose every sample can be recognised."""

    def __init__(self, length: int, seq_len: int) -> None:
        self.length, self.seq_len = length, seq_len

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return (index * self.seq_len + np.arange(self.seq_len, dtype=np.int64)) % VOCAB


def stack(samples: list[np.ndarray]) -> np.ndarray:
    """The batch as one NumPy array: cheap to send from a worker (see the module's docstring)."""
    return np.stack(samples)


class OneWeight(nn.Module):
    """A model of one parameter, whose loss touches every token: the step costs next to nothing, so the figures are
    the resume's."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, batch: np.ndarray) -> torch.Tensor:
        tokens = torch.from_numpy(batch).float()
        return (tokens.mean() / VOCAB * self.weight).pow(2).sum()

    def num_samples(self, batch: np.ndarray) -> int:  # the Trainer counts samples in tensors; this batch is NumPy
        return len(batch)


def make_loader(kind: str, corpus: TokenCorpus, batch_size: int) -> Any:
    if kind == STATEFUL:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(corpus, batch_size=batch_size, num_workers=2, collate_fn=stack)
    workers = 2 if kind == REPLAYED else 0
    return DataLoader(corpus, batch_size=batch_size, num_workers=workers, collate_fn=stack)


def states_after(corpus: TokenCorpus, batch_size: int, counts: list[int]) -> dict[int, dict[str, Any]]:
    """The ``StatefulDataLoader``'s ``state_dict()`` after each of ``counts`` batches, from one pass through its
    workers: the loader states the checkpoints start from."""
    loader = make_loader(STATEFUL, corpus, batch_size)
    iterator = iter(loader)
    states, drawn = {}, 0
    for count in sorted(counts):
        for _ in range(count - drawn):
            next(iterator)
        drawn = count
        states[count] = loader.state_dict()
    del iterator
    return states


class StandAt(Callback):
    """Makes the one batch a Trainer trains batch ``batch`` of epoch 0 (see the module's docstring): loads
    ``loader_state`` (the loader's state after ``batch - 1`` batches) before the epoch's iterator is made, and moves
    the timestamp to ``batch - 1`` once the first batch is fetched, after the Trainer has recorded the epoch's
    start."""

    def __init__(self, batch: int, batch_size: int, loader_state: dict[str, Any] | None) -> None:
        self.batch, self.batch_size, self.loader_state = batch, batch_size, loader_state

    def epoch_start(self, state: Any, logger: Any) -> None:
        if self.loader_state is not None:
            state.train_dataloader.load_state_dict(self.loader_state)

    def after_dataloader(self, state: Any, logger: Any) -> None:
        if state.timestamp.batch == 0:
            before = self.batch - 1
            samples = before * self.batch_size
            state.timestamp = dataclasses.replace(
                state.timestamp, batch=before, batch_in_epoch=before, sample=samples, sample_in_epoch=samples
            )


def make_checkpoint(
    kind: str, batch: int, corpus: TokenCorpus, args: argparse.Namespace, loader_state: dict[str, Any] | None
) -> str:
    """The checkpoint a run of ``kind`` writes after batch ``batch`` of epoch 0, made as the docstring says."""
    folder = SCRATCH / kind.replace(" ", "-").replace(",", "") / str(batch)
    shutil.rmtree(folder, ignore_errors=True)
    trainer = cairn.Trainer(
        model=OneWeight(),
        train_dataloader=make_loader(kind, corpus, args.batch_size),
        max_duration=f"{batch}ba",
        device="cpu",
        seed=SEED,
        progress_bar=False,
        callbacks=[StandAt(batch, args.batch_size, loader_state if kind == STATEFUL else None)],
        save_folder=str(folder),
        save_interval=f"{batch}ba",
    )
    try:
        trainer.fit()
        saved = trainer.saved_checkpoints
    finally:
        trainer.close()
    if len(saved) != 1 or f"ba{batch}-" not in Path(saved[0]).name:
        raise RuntimeError(f"{kind}: expected one checkpoint at batch {batch}, the Trainer wrote {saved}")
    return saved[0]


class FirstStep(Callback):
    """Notes when the first step after the resume ends, and the first sample it trained on."""

    def __init__(self) -> None:
        self.ended: float | None = None
        self.first_sample: np.ndarray | None = None

    def batch_start(self, state: Any, logger: Any) -> None:
        if self.first_sample is None:
            self.first_sample = np.array(state.batch[0])

    def batch_end(self, state: Any, logger: Any) -> None:
        if self.ended is None:
            self.ended = time.perf_counter()


class ReplayWarnings(logging.Handler):
    """Catches cairn's replay warning, so each run can say whether batches were fetched and thrown away."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if REPLAY_WARNING in record.getMessage():
            self.messages.append(record.getMessage())


@dataclass
class Measured:
    seconds: list[float] = field(default_factory=list)
    replayed: list[bool] = field(default_factory=list)
    right_batch: list[bool] = field(default_factory=list)


def timed_resume(
    kind: str, batch: int, checkpoint: str, corpus: TokenCorpus, args: argparse.Namespace, warned: ReplayWarnings
) -> tuple[float, bool, bool]:
    """(seconds from the Trainer's construction to the end of its first step, replayed?, first batch right?)."""
    loader = make_loader(kind, corpus, args.batch_size)
    first = FirstStep()
    warnings_before = len(warned.messages)
    started = time.perf_counter()
    trainer = cairn.Trainer(
        model=OneWeight(),
        train_dataloader=loader,
        max_duration=f"{batch + 1}ba",
        device="cpu",
        seed=SEED,
        progress_bar=False,
        callbacks=[first],
        load_path=checkpoint,
    )
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert first.ended is not None, f"{kind}: the resumed run trained no batch"
    right = first.first_sample is not None and np.array_equal(first.first_sample, corpus[batch * args.batch_size])
    return first.ended - started, len(warned.messages) > warnings_before, right


def run_rounds(args: argparse.Namespace, kinds: tuple[str, ...], results: dict[tuple[str, int], Measured]) -> None:
    corpus = TokenCorpus((max(args.points) + 1_000) * args.batch_size, args.seq_len)
    started = time.perf_counter()
    loader_states = states_after(corpus, args.batch_size, [n - 1 for n in args.points]) if STATEFUL in kinds else {}
    checkpoints = {
        (kind, n): make_checkpoint(kind, n, corpus, args, loader_states.get(n - 1))
        for kind in kinds
        for n in args.points
    }
    print(f"checkpoints made in {time.perf_counter() - started:.1f} s (untimed)", flush=True)
    warned = ReplayWarnings()
    log = logging.getLogger("cairn.trainer.dataloader")
    log.addHandler(warned)
    log.propagate = False  # one warning per replaying run would bury the table; the first is printed below
    try:
        pairs = list(checkpoints)
        for round_number in range(args.runs):
            shift = round_number % len(pairs)
            for kind, n in pairs[shift:] + pairs[:shift]:
                seconds, replayed, right = timed_resume(kind, n, checkpoints[kind, n], corpus, args, warned)
                result = results[kind, n]
                result.seconds.append(seconds)
                result.replayed.append(replayed)
                result.right_batch.append(right)
                print(f"  round {round_number + 1} {kind:<30} N={n:<8,} {seconds:8.3f} s", flush=True)
    finally:
        log.removeHandler(warned)
        log.propagate = True
    if warned.messages:
        print(f"cairn's warning when it replays: {warned.messages[0]}")


def table(args: argparse.Namespace, kinds: tuple[str, ...], results: dict[tuple[str, int], Measured]) -> str:
    low, high = min(args.points), max(args.points)
    heads = "".join(f"{f'N={n:,} s':>14}" for n in args.points)
    lines = [f"{'time to first step':<32}{heads}{f'N={high:,} / N={low:,}':>22}{'replayed':>10}{'right batch':>13}"]
    for kind in kinds:
        medians = {n: statistics.median(results[kind, n].seconds) for n in args.points if results[kind, n].seconds}
        if len(medians) != len(args.points):
            continue
        cells = "".join(f"{medians[n]:>14.3f}" for n in args.points)
        replayed = {n for n in args.points if any(results[kind, n].replayed)}
        right = all(all(results[kind, n].right_batch) for n in args.points)
        lines.append(
            f"{kind:<32}{cells}{f'{medians[high] / medians[low]:.2f}x':>22}"
            f"{('yes' if replayed else 'no'):>10}{('yes' if right else 'NO'):>13}"
        )
    return "\n".join(lines)


def machine() -> str:
    cores = os.cpu_count()
    return (
        f"machine: {cores} cores; Python {platform.python_version()}, torch {torch.__version__}, cairn "
        f"{cairn.__version__}; load average {os.getloadavg()[0]:.2f} at the start"
    )


def available_kinds(wanted: list[str]) -> tuple[str, ...]:
    """The loaders to measure; the stateful one only where torchdata is installed (``pip install torchdata``)."""
    try:
        import torchdata.stateful_dataloader  # noqa: F401
    except ImportError:
        print(f"{STATEFUL}: left out (torchdata is not installed: pip install torchdata)")
        wanted = [kind for kind in wanted if kind != STATEFUL]
    return tuple(wanted)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds, every loader and point in turn (default 5)")
    parser.add_argument(
        "--points",
        default="100,100000",
        help="batches into the epoch to resume at, comma-separated (default 100,100000)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="samples per batch (default 4)")
    parser.add_argument("--seq-len", type=int, default=16, help="token ids per sample (default 16)")
    parser.add_argument("--no-index-skip", action="store_true", help=f"leave out '{INDEX_SKIP}'")
    args = parser.parse_args()
    args.points = sorted({int(point.replace("_", "")) for point in args.points.split(",")})
    if len(args.points) < 2 or args.points[0] < 1:
        parser.error("--points: give at least two resume points, each at least 1 batch into the epoch")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11's note on a torch internal
    print(machine())
    kinds = available_kinds([STATEFUL, REPLAYED] + ([] if args.no_index_skip else [INDEX_SKIP]))
    print(
        f"resume at batches {', '.join(f'{n:,}' for n in args.points)} of one epoch; batches of {args.batch_size} "
        f"samples x {args.seq_len} token ids; {args.runs} rounds",
        flush=True,
    )
    results = {(kind, n): Measured() for kind in kinds for n in args.points}
    try:
        run_rounds(args, kinds, results)
    except KeyboardInterrupt:  # ``timeout -s INT``: the rounds finished so far still make a table
        print("interrupted: the table holds the rounds finished", flush=True)
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    print(table(args, kinds, results))


if __name__ == "__main__":
    main()
