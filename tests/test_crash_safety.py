"""Crash safety: a process killed (SIGKILL) in the middle of a save leaves every checkpoint it finished intact.

A child Python process trains a model of ~25 MB of weights and saves after every batch. To kill it at a known point of
a save, the child (never the test process) instruments its own copy of cairn's write path: it prints a ``STALL`` line
and blocks on stdin when it reaches that point, and the parent kills it on reading the line. A second test kills at
random moments. Afterwards the parent checks the folder and resumes the run in-process with ``autoresume=True``.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import pytest

from cairn.checkpoint import read_checkpoint
from cairn.core import Callback, State
from cairn.errors import CheckpointCorruptError
from cairn.loggers import Logger

TEMP_MARKER = ".cairn-tmp-"
CHECKPOINT_NAME = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt\Z")
LATEST = "latest-rank0.pt"
TOTAL_BATCHES = 8
STALLED_SAVE = 3  # the child stalls in its third save: two checkpoints are complete by then
LINE_TIMEOUT_S = 120.0

CHILD_SOURCE = '''
"""Trains with a CheckpointSaver saving every batch; optionally stalls at one point of one save, waiting to be killed.

usage: python crash_child.py FOLDER BATCHES STAGE SAVE_NUMBER
STAGE: none | write (half-way through writing the temporary file) | fsync (temporary file written, before the
rename) | link (checkpoint renamed into place, before the latest link is swapped)
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cairn import Trainer
from cairn.core import Callback
from cairn.models import Classifier

IN_FEATURES, HIDDEN = 2048, 3072  # about 25 MB of fp32 weights
TEMP_MARKER = ".cairn-tmp-"
STALL_AFTER_BYTES = 8 * 1024 * 1024


def make_trainer(folder: str, batches: int, *, autoresume: bool = False, callbacks: list[Any] | None = None) -> Trainer:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 3))
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, IN_FEATURES, generator=generator)
    data = TensorDataset(inputs, torch.randint(0, 3, (64,), generator=generator))
    return Trainer(
        model=Classifier(net),
        train_dataloader=DataLoader(data, batch_size=8),
        max_duration=f"{batches}ba",
        optimizers=torch.optim.SGD(net.parameters(), lr=0.01),
        save_folder=folder,
        save_interval="1ba",
        autoresume=autoresume,
        callbacks=callbacks or [],
        progress_bar=False,
        seed=0,
        run_name="crash",
    )


def stall(message: str) -> None:
    print("STALL " + message, flush=True)
    if not sys.stdin.readline():  # the parent went away without killing us
        os._exit(3)


class Announce(Callback):
    def fit_start(self, state: Any, logger: Any) -> None:
        print("READY", flush=True)

    def batch_end(self, state: Any, logger: Any) -> None:
        print(f"BATCH {state.timestamp.batch}", flush=True)


class StallingFile:
    """Passes writes through to cairn's file; once past STALL_AFTER_BYTES, flushes what it has and stalls (what
    reached the temporary by then is whatever whole blocks the direct write has put there)."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.written = 0
        self.stalled = False

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.stalled or self.written + len(view) < STALL_AFTER_BYTES:
            self.written += len(view)
            return self.file.write(view)
        head = STALL_AFTER_BYTES - self.written  # torch writes a whole tensor at once: stop inside it
        self.file.write(view[:head])
        self.file.flush()
        self.stalled = True
        stall(f"write {self.file.path} {STALL_AFTER_BYTES}")
        self.file.write(view[head:])
        self.written += len(view)
        return len(view)

    def flush(self) -> None:
        self.file.flush()


def instrument(stage: str, save_number: int) -> None:
    saves = {"count": 0, "links": 0}
    real_save, real_fsync, real_symlink = torch.save, os.fsync, os.symlink

    def save(obj: Any, file: Any, *args: Any, **kwargs: Any) -> None:
        saves["count"] += 1
        if stage == "write" and saves["count"] == save_number:  # cairn hands torch.save the temporary's DirectFile
            real_save(obj, StallingFile(file), *args, **kwargs)
            return
        real_save(obj, file, *args, **kwargs)

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        if stage == "fsync" and saves["count"] == save_number and TEMP_MARKER in os.path.basename(path):
            stall(f"fsync {path}")

    def symlink(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        saves["links"] += 1
        if stage == "link" and saves["links"] == save_number:
            stall(f"link {target} -> {source}")
        real_symlink(source, target, *args, **kwargs)

    torch.save, os.fsync, os.symlink = save, fsync, symlink


if __name__ == "__main__":
    folder, batches, stage, save_number = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    instrument(stage, save_number)
    trainer = make_trainer(folder, batches, callbacks=[Announce()])
    trainer.fit()
    print("DONE", flush=True)
'''


# -- driving the child ------------------------------------------------------------------------------------------


class Child:
    """A training process whose stdout lines arrive on a queue, so waiting for one can time out instead of hang."""

    def __init__(self, tmp_path: Path, folder: Path, batches: int, stage: str, save_number: int = 0) -> None:
        script = write_child_script(tmp_path)
        self.stderr_path = tmp_path / f"child-{stage}-stderr.txt"
        self._stderr = open(self.stderr_path, "w")  # closed by kill()
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(folder), str(batches), stage, str(save_number)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str) -> str:
        """The first stdout line starting with ``prefix``; fails with the child's stderr if it exits first."""
        while True:
            try:
                line = self.lines.get(timeout=LINE_TIMEOUT_S)
            except queue.Empty:
                self.kill()
                pytest.fail(f"the child printed no {prefix!r} line in {LINE_TIMEOUT_S} s; stderr:\n{self.stderr()}")
            if line is None:
                self.process.wait()
                pytest.fail(
                    f"the child exited ({self.process.returncode}) before printing {prefix!r}; stderr:\n{self.stderr()}"
                )
            if line.startswith(prefix):
                return line

    def kill(self) -> int:
        """SIGKILL the child (unless it already exited) and reap it; return its exit status."""
        if self.process.returncode is None:
            self.process.kill()
        returncode = self.process.wait(timeout=60)
        self._close()
        return returncode

    def wait_at_most(self, seconds: float) -> bool:
        """True when the child exited by itself within ``seconds`` (the random-kill test's clock, not a sync)."""
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def _close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        self._stderr.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Starts children; any still alive when the test ends (say, after a failed assertion) is killed."""
    children: list[Child] = []

    def start(stage: str, save_number: int = 0) -> Child:
        child = Child(tmp_path, tmp_path / "checkpoints", TOTAL_BATCHES, stage, save_number)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def write_child_script(tmp_path: Path) -> Path:
    script = tmp_path / "crash_child.py"
    if not script.exists():
        script.write_text(CHILD_SOURCE)
    return script


def load_child_module(tmp_path: Path) -> ModuleType:
    """The child's script imported in the test process, so the resumed run builds the very same trainer."""
    script = write_child_script(tmp_path)
    spec = importlib.util.spec_from_file_location(f"crash_child_{abs(hash(str(tmp_path)))}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- what must hold after any crash -------------------------------------------------------------------------------


def checkpoint_files(folder: Path) -> list[Path]:
    """Regular files under a checkpoint name (not the latest link, not temporaries), oldest first."""
    if not folder.exists():  # killed before the first save made the folder
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name) and not p.is_symlink()]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(2)))  # type: ignore[union-attr]


def temporaries(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if TEMP_MARKER in p.name)


def assert_folder_is_consistent(folder: Path, note: str) -> Path | None:
    """Every checkpoint-named file verifies and ``latest`` names one of them; return the newest, if any."""
    complete = checkpoint_files(folder)
    for path in complete:
        try:
            read_checkpoint(str(path))
        except Exception as err:  # the assertion message says what went wrong
            pytest.fail(f"{note}: {path.name} is under a checkpoint name but does not verify: {err!r}")
    latest = folder / LATEST
    if complete:
        assert latest.is_symlink(), f"{note}: checkpoints {[p.name for p in complete]} exist but {LATEST} does not"
    if latest.is_symlink():
        target = folder / os.readlink(latest)
        assert target.is_file(), f"{note}: {LATEST} -> {os.readlink(latest)}, which does not exist"
        assert target in complete, f"{note}: {LATEST} -> {target.name}, not a complete checkpoint"
        read_checkpoint(str(latest))
    return complete[-1] if complete else None


class TemporariesAtFirstBatch(Callback):
    """Records the temporaries left in ``folder`` when the first batch starts, i.e. after fit start's cleanup."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[str] | None = None

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.seen is None:
            self.seen = temporaries(self.folder)


def assert_resumes_and_finishes(tmp_path: Path, folder: Path, newest: Path | None, note: str) -> None:
    """A new trainer with autoresume continues from ``newest`` (or starts fresh), cleans up, and runs to the end."""
    child = load_child_module(tmp_path)
    spy = TemporariesAtFirstBatch(folder)
    trainer = child.make_trainer(str(folder), TOTAL_BATCHES, autoresume=True, callbacks=[spy])
    if newest is None:
        assert trainer.state.timestamp.batch == 0, f"{note}: nothing to resume from, yet it did not start fresh"
    else:
        saved: dict[str, Any] = read_checkpoint(str(newest))["state"]["timestamp"]
        assert trainer.state.resumed_from is not None, f"{note}: autoresume did not resume"
        assert trainer.state.timestamp.state_dict() == saved, (
            f"{note}: resumed from {trainer.state.resumed_from} at batch {trainer.state.timestamp.batch}, "
            f"not from the newest complete checkpoint {newest.name}"
        )
    trainer.fit()
    trainer.close()
    assert spy.seen in (None, []), f"{note}: fit start left the crashed save's temporaries: {spy.seen}"
    assert temporaries(folder) == [], f"{note}: temporaries left after the resumed run: {temporaries(folder)}"
    assert trainer.state.timestamp.batch == TOTAL_BATCHES, f"{note}: the resumed run did not reach the end"
    last = assert_folder_is_consistent(folder, note + " (after resuming)")
    assert last is not None and last.name.endswith(f"-ba{TOTAL_BATCHES}-rank0.pt"), f"{note}: final checkpoint {last}"


# -- kills at a known point of a save --------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["write", "fsync"])
def test_a_kill_while_writing_the_temporary_file_keeps_the_last_good_checkpoint(
    tmp_path: Path, spawn: Callable[..., Child], stage: str
) -> None:
    folder = tmp_path / "checkpoints"
    child = spawn(stage, STALLED_SAVE)
    stalled = child.wait_for("STALL")
    left_behind = temporaries(folder)
    assert len(left_behind) == 1, f"stalled at {stalled!r}, but the folder holds {sorted(os.listdir(folder))}"
    assert child.kill() == -signal.SIGKILL

    newest = assert_folder_is_consistent(folder, f"killed at {stalled!r}")
    assert newest is not None and newest.name == f"ep0-ba{STALLED_SAVE - 1}-rank0.pt"
    assert os.readlink(folder / LATEST) == newest.name
    assert temporaries(folder) == left_behind, "the partial file stays until the next run cleans it up"
    partial = (folder / left_behind[0]).stat().st_size
    if stage == "write":  # stopped half-way: the temporary is a truncated file, and nothing reads it as a checkpoint
        assert partial < newest.stat().st_size
        with pytest.raises(CheckpointCorruptError):
            read_checkpoint(str(folder / left_behind[0]))

    assert_resumes_and_finishes(tmp_path, folder, newest, f"killed at {stalled!r}")


def test_a_kill_between_the_rename_and_the_latest_link_resumes_from_the_newest_checkpoint(
    tmp_path: Path, spawn: Callable[..., Child]
) -> None:
    folder = tmp_path / "checkpoints"
    child = spawn("link", STALLED_SAVE)
    stalled = child.wait_for("STALL")
    assert child.kill() == -signal.SIGKILL

    newest = assert_folder_is_consistent(folder, f"killed at {stalled!r}")
    assert newest is not None and newest.name == f"ep0-ba{STALLED_SAVE}-rank0.pt", "the renamed file is complete"
    assert os.readlink(folder / LATEST) == f"ep0-ba{STALLED_SAVE - 1}-rank0.pt", "the link was not swapped yet"
    assert_resumes_and_finishes(tmp_path, folder, newest, f"killed at {stalled!r}")


# -- kills at random moments ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 3, 11])  # on a 2-core machine each of these lands inside a save
def test_a_kill_at_a_random_moment_leaves_a_resumable_folder(
    tmp_path: Path, spawn: Callable[..., Child], seed: int
) -> None:
    generator = random.Random(seed)
    after_batch = generator.randint(1, TOTAL_BATCHES - 2)
    delay = generator.uniform(0.0, 0.3)  # a batch and its save take about 0.2 s: lands in a save or a step
    folder = tmp_path / "checkpoints"
    child = spawn("none")
    child.wait_for(f"BATCH {after_batch}")
    finished = child.wait_at_most(delay)  # the random moment; nothing waits on this for synchronisation
    returncode = child.kill()
    note = (
        f"seed={seed}: killed {delay:.3f} s after batch {after_batch} ended, leaving "
        f"{sorted(os.listdir(folder)) if folder.exists() else 'no folder'}"
    )
    assert finished or returncode == -signal.SIGKILL, note

    newest = assert_folder_is_consistent(folder, note)
    assert_resumes_and_finishes(tmp_path, folder, newest, note)
