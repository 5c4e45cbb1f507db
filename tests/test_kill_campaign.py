"""The SIGKILL campaign: runs that save every batch are killed again and again at random moments, each new run
resuming from what the last one left; after every kill ``latest`` must name a checkpoint that verifies, and the run
that finally reaches the end must hold the same weights, bit for bit, as a run never killed.

Every run prunes under all the retention rules at once (the 2 newest, the 2 best by a scripted metric that depends
only on the batch number, every 6th batch), so kills land inside pruning too: after each kill the ``latest`` and
``best`` links must name checkpoints that verify, and so must every checkpoint left, save one sharded folder whose
deletion was cut short, which no rule and no link may keep. At the end the folder holds exactly what the rules keep.
The sharded modes first run once into the worst moment a random kill rarely hits: rank 0 dies inside its first
deletion of a folder, its ``cairn.pt`` gone and its shards not (train.py's ``--kill-inside-delete``).

Modes: sync and async single files (one process), sync and async sharded folders (torchrun, 2 ranks, FSDP), sync
and async incremental checkpoints (one process; train.py's ``--wide`` model, whose tensors are chunked and one of them
frozen, so manifests share chunks). In the incremental modes retention deletes manifests at almost every save and
garbage collection removes their chunks, so kills land between the two and inside either; after each kill every
visible manifest must name only chunks the chunk folder holds, and load (every chunk checked against its key), and
at the end the chunk folder holds exactly the chunks the kept manifests name.
The default run (``make test``) kills a few times per mode; ``make campaign`` runs the full campaign, 50 kills per
mode (``CAIRN_KILLS=N`` for another count). Every process of a run is killed at once, torchrun and each rank.
Each kill's seed, batch and delay are printed (shown with ``-s`` or on failure).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.incremental.files import chunk_folder_of
from cairn.checkpoint.incremental.garbage import referenced_chunks
from cairn.names import CHUNK_FOLDER, TEMP_MARKER

SCRIPT = Path(__file__).parent / "dist_scripts" / "train.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"
LINE_TIMEOUT_S = 120
KEEP, KEEP_BEST, KEEP_EVERY = 2, 2, 6  # the retention rules every killed run saves under (EVERY in batches)
RETENTION = ("--keep", str(KEEP), "--keep-best", str(KEEP_BEST), "--keep-every", f"{KEEP_EVERY}ba")
CHECKPOINT_NAME = re.compile(r"ep\d+-ba(\d+)-rank0\.pt")  # train.py's save_filename, rank 0
LINKS = ("latest-rank0.pt", "best-rank0.pt")

MODES = {
    "sync": ((), 1, 6),
    "async": (("--async-save",), 1, 6),
    "sharded": (("--fsdp", "--sharded"), 2, 3),
    "sharded-async": (("--fsdp", "--sharded", "--async-save"), 2, 3),
    "incremental": (("--wide", "--incremental"), 1, 3),
    "incremental-async": (("--wide", "--incremental", "--async-save"), 1, 2),
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


def _scripted_value():  # noqa: ANN202 - train.py's function: the one source of the metric's values
    spec = importlib.util.spec_from_file_location("campaign_train", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.scripted_value


scripted_value = _scripted_value()


def _kept_by_rules(batches: set[int]) -> set[int]:
    """The batches whose checkpoints the rules keep among ``batches`` (written here, apart from the product's rules:
    the newest KEEP, the KEEP_BEST of highest scripted value, every KEEP_EVERY-th batch)."""
    recent = sorted(batches)[-KEEP:]
    best = sorted(batches, key=scripted_value)[-KEEP_BEST:]
    return {*recent, *best, *(b for b in batches if b % KEEP_EVERY == 0)}


def _verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` does not verify, or None when it does."""
    try:
        read_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 - the caller's assertion says what went wrong
        return repr(err)
    return None


def _check_after_kill(folder: Path, note: str) -> int:
    """What a kill at any moment, inside a prune included, must leave: each link names a checkpoint that verifies;
    every checkpoint verifies, except a sharded folder whose deletion was cut short (the rules were deleting it: no
    rule and no link may keep it, and the next prune finishes the job); nothing else in the folder but temporaries.
    Returns how many chunks no manifest names (left by the kill)."""
    if not folder.exists():
        return 0
    named: dict[str, int] = {}
    for link in LINKS:
        path = folder / link
        if os.path.lexists(path):
            target = os.readlink(path)
            match = CHECKPOINT_NAME.fullmatch(os.path.basename(target))
            assert match, f"{note}: {link} -> {target}, not a checkpoint of the run"
            problem = _verify(path)
            assert problem is None, f"{note}: {link} -> {target} does not verify: {problem}"
            named[link] = int(match.group(1))
    unneeded = _check_chunks(folder, note)
    present, damaged = set(), {}
    for entry in folder.iterdir():
        if entry.name in LINKS or entry.name == CHUNK_FOLDER or TEMP_MARKER in entry.name:
            continue
        match = CHECKPOINT_NAME.fullmatch(entry.name)
        assert match, f"{note}: unexpected {entry.name} in the checkpoint folder"
        present.add(int(match.group(1)))
        if (problem := _verify(entry)) is not None:
            assert entry.is_dir(), f"{note}: the checkpoint file {entry.name} does not verify: {problem}"
            damaged[int(match.group(1))] = f"{entry.name}: {problem}"
    assert len(damaged) <= 1, f"{note}: more than one damaged checkpoint: {damaged}"
    kept = _kept_by_rules(present) | set(named.values())
    assert not set(damaged) & kept, f"{note}: a checkpoint the rules or a link keep does not verify: {damaged}"
    return unneeded


def _stored_and_named_chunks(folder: Path) -> tuple[set[str], dict[str, set[str]]]:
    """The chunks in ``folder``'s chunk folder, and the chunks each manifest under ``folder`` names."""
    stored = set(chunk_folder_of(str(folder)).keys())
    named = {path: set(chunks) for path, chunks in referenced_chunks(str(folder)).items()}
    return stored, named


def _check_chunks(folder: Path, note: str) -> int:
    """No visible manifest names a chunk the chunk folder lacks (read apart from the loads that follow, so that a
    failure says which chunk went). Garbage left by a kill, chunks no manifest names, is allowed: returns how many."""
    if not (folder / CHUNK_FOLDER).exists():
        return 0
    stored, named = _stored_and_named_chunks(folder)
    missing = {os.path.basename(path): sorted(keys - stored) for path, keys in named.items() if keys - stored}
    assert not missing, f"{note}: manifests name chunks the chunk folder lacks: {missing}"
    return len(stored - set().union(*named.values()))


def _batch_of(name: str) -> int:
    match = CHECKPOINT_NAME.fullmatch(os.path.basename(name))
    assert match, f"{name} is not a checkpoint of the run"
    return int(match.group(1))


def _check_final_folder(folder: Path, batches: int) -> None:
    """The folder holds exactly what the rules keep of the whole run's checkpoints (one per batch), each recording
    its batch's scripted value; ``latest`` names the last, ``best`` the best."""
    checkpoints = sorted(p.name for p in folder.iterdir() if p.name not in LINKS and p.name != CHUNK_FOLDER)
    expected = _kept_by_rules(set(range(1, batches + 1)))
    assert sorted(_batch_of(name) for name in checkpoints) == sorted(expected), (checkpoints, sorted(expected))
    links = {link: _batch_of(os.readlink(folder / link)) for link in LINKS}
    assert links == {"latest-rank0.pt": batches, "best-rank0.pt": max(range(1, batches + 1), key=scripted_value)}
    for name in checkpoints:
        recorded = read_checkpoint(str(folder / name))["state"]["metadata"]["metrics"]
        assert recorded == {"metrics/eval/Scripted": scripted_value(_batch_of(name))}, name
    if not (folder / CHUNK_FOLDER).exists():
        return
    stored, named = _stored_and_named_chunks(folder)
    assert stored == set().union(*named.values()), "the chunk folder holds exactly the chunks the kept manifests name"


def _kill_inside_a_folder_delete(tmp_path: Path, nproc: int, saving: tuple[str, ...], folder: Path) -> None:
    """A run whose rank 0 dies inside its first deletion of a sharded folder, after that folder's ``cairn.pt`` and
    before its shards (train.py's ``--kill-inside-delete``): the moment a random kill rarely hits. What it leaves
    must pass the after-kill checks, and the runs after it must resume and finish."""
    out = tmp_path / "cut-short"
    out.mkdir()
    run = Run(
        _command(
            out, nproc, *[flag for flag in saving if flag != "--announce"], "--autoresume", "--kill-inside-delete"
        ),
        tmp_path / "cut-short.log",
    )
    assert run.finish() != 0 and (out / "killed-inside-delete").exists(), (tmp_path / "cut-short.log").read_text()
    _check_after_kill(folder, "killed inside a folder delete: " + (out / "killed-inside-delete").read_text().strip())


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TEMP_MARKER in p.name) if folder.exists() else []


@pytest.mark.parametrize("mode", list(MODES))
def test_runs_killed_at_random_moments_lose_nothing_and_end_bit_for_bit(tmp_path: Path, mode: str) -> None:
    flags, nproc, default_kills = MODES[mode]
    kills = int(os.environ.get("CAIRN_KILLS", default_kills))
    folder = tmp_path / "ckpt"
    batches = (kills + 2) * 6  # room for every kill, then a stretch to finish
    flags = (*flags, "--max-duration", f"{batches}ba")
    saving = (*flags, "--save-folder", str(folder), "--save-interval", "1ba", *RETENTION, "--announce")
    (tmp_path / "whole").mkdir()
    whole = Run(_command(tmp_path / "whole", nproc, *flags), tmp_path / "whole.log")
    assert whole.finish() == 0, (tmp_path / "whole.log").read_text()[-3000:]

    if nproc > 1:  # sharded folders: a prune cut short inside one, at the worst moment, first
        _kill_inside_a_folder_delete(tmp_path, nproc, saving, folder)
    survived = left_garbage = 0
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
        if unneeded := _check_after_kill(folder, note):  # the kill came between chunks and manifest, or in a collection
            print(f"  it left {unneeded} chunks that no manifest names")
            left_garbage += 1
        survived += 1

    (tmp_path / "final").mkdir()
    final = Run(_command(tmp_path / "final", nproc, *saving, "--autoresume"), tmp_path / "final.log")
    assert final.finish() == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert _temporaries(folder) == [], "the resumed run cleared what the killed saves left"
    _check_final_folder(folder, batches)
    expected = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    ended = torch.load(tmp_path / "final" / "final.pt", weights_only=True)
    assert all(torch.equal(expected[k], ended[k]) for k in expected), f"{mode}: {survived} kills, then not bit for bit"
    garbage = f" ({left_garbage} left chunks no manifest named)" if left_garbage else ""
    print(f"{mode}: survived {survived} kills{garbage}; the final run matches the uninterrupted one bit for bit")
