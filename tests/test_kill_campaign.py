"""The SIGKILL campaign: runs that save every batch are killed again and again at random moments, each new run
resuming from what the last one left; after every kill ``latest`` must name a checkpoint that verifies, and the run
that finally reaches the end must hold the same weights, bit for bit, as a run never killed.

Modes: sync and async single files (one process), sync and async sharded folders (torchrun, 2 ranks, FSDP).
The default run (``make test``) kills a few times per mode; ``make campaign`` runs the full campaign, 50 kills per
mode (``CAIRN_KILLS=N`` for another count). Every process of a run is killed at once, torchrun and each rank.
Each kill's seed, batch and delay are printed (shown with ``-s`` or on failure).
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cairn.checkpoint import read_checkpoint
from cairn.names import TEMP_MARKER

SCRIPT = Path(__file__).parent / "dist_scripts" / "train.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
LINE_TIMEOUT_S = 120

MODES = {
    "sync": ((), 1, 6),
    "async": (("--async-save",), 1, 6),
    "sharded": (("--fsdp", "--sharded"), 2, 3),
    "sharded-async": (("--fsdp", "--sharded", "--async-save"), 2, 3),
}

# pytest-timeout's 300 s covers the default run; the full campaign gets half a minute a kill (a sharded kill, with
# its torchrun start and resume, takes about ten seconds on two cores)
_KILLS = int(os.environ.get("CAIRN_KILLS", 0))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(max(300, 120 + 30 * _KILLS))]


def _command(out: Path, nproc: int, *args: str) -> list[str]:
    launcher = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return [*launcher, str(SCRIPT), "--out", str(out), *args]


class Run:
    """One training run in its own process group (torchrun and its ranks die together); stdout lines on a queue."""

    def __init__(self, command: list[str], log: Path) -> None:
        self._log = open(log, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ended = False  # the output ended (the process exited)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def batches(self):  # noqa: ANN201 - a generator of finished batch numbers
        while not self.ended:
            line = self.lines.get(timeout=LINE_TIMEOUT_S)
            if line is None:
                self.ended = True
            elif line.startswith("BATCH "):
                yield int(line.split()[1])
                self.go()

    def go(self) -> None:
        """Let the run go on past the batch it just announced."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        except BrokenPipeError:  # it exited meanwhile
            pass

    def kill(self) -> None:
        """SIGKILL the run and every process under it at once, as a lost node would. torchrun starts each rank in a
        session of its own, so killing torchrun's process group alone would leave the ranks running (and saving)."""
        if self.process.poll() is None:
            for pid in [*_descendants(self.process.pid), self.process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        self._log.close()
        if self.process.stdin is not None:
            self.process.stdin.close()

    def finish(self) -> int:
        for _ in self.batches():
            pass
        code = self.process.wait(timeout=300)
        self._log.close()
        return code


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # it exited meanwhile
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TEMP_MARKER in p.name) if folder.exists() else []


@pytest.mark.parametrize("mode", list(MODES))
def test_runs_killed_at_random_moments_lose_nothing_and_end_bit_for_bit(tmp_path: Path, mode: str) -> None:
    flags, nproc, default_kills = MODES[mode]
    kills = int(os.environ.get("CAIRN_KILLS", default_kills))
    folder = tmp_path / "ckpt"
    flags = (*flags, "--max-duration", f"{(kills + 2) * 6}ba")  # room for every kill, then a stretch to finish
    saving = (*flags, "--save-folder", str(folder), "--save-interval", "1ba", "--keep", "2", "--announce")
    (tmp_path / "whole").mkdir()
    whole = Run(_command(tmp_path / "whole", nproc, *flags), tmp_path / "whole.log")
    assert whole.finish() == 0, (tmp_path / "whole.log").read_text()[-3000:]

    survived = 0
    for kill in range(kills):
        seed = random.randrange(2**32)
        generator = random.Random(seed)
        out = tmp_path / f"run{kill}"
        out.mkdir()
        run = Run(_command(out, nproc, *saving, "--autoresume"), tmp_path / f"run{kill}.log")
        first = None
        # a batch and its save take a few milliseconds: the kill lands a few batches on, often inside a save
        target_offset, delay = generator.randint(0, 5), generator.uniform(0.0, 0.03)
        for batch in run.batches():  # each batch waits for the test's go, given when the loop asks for the next
            first = batch if first is None else first
            if batch >= first + target_offset:
                run.go()  # the last go: the kill lands somewhere in the next batch, its save, or its async write
                break
        else:  # the run ended before its moment came: it must have finished the whole run, cleanly
            code = run.finish()
            assert code == 0, f"run {kill} failed:\n" + (tmp_path / f"run{kill}.log").read_text()[-3000:]
            break
        try:
            run.process.wait(timeout=delay)  # the random moment; nothing is synchronised on this wait
        except subprocess.TimeoutExpired:
            pass
        run.kill()
        note = f"{mode} kill {kill} (seed {seed}): {delay:.3f} s after batch {batch}"
        print(note)
        latest = folder / "latest-rank0.pt"
        if latest.exists():
            try:
                read_checkpoint(str(latest))
            except Exception as err:  # noqa: BLE001 - the assertion says what went wrong
                pytest.fail(f"{note}: latest -> {os.readlink(latest)} does not verify: {err!r}")
        survived += 1

    (tmp_path / "final").mkdir()
    final = Run(_command(tmp_path / "final", nproc, *saving, "--autoresume"), tmp_path / "final.log")
    assert final.finish() == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert _temporaries(folder) == [], "the resumed run cleared what the killed saves left"
    expected = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    ended = torch.load(tmp_path / "final" / "final.pt", weights_only=True)
    assert all(torch.equal(expected[k], ended[k]) for k in expected), f"{mode}: {survived} kills, then not bit for bit"
    print(f"{mode}: survived {survived} kills; the final run matches the uninterrupted one bit for bit")
