"""Incremental checkpoints killed at their worst moments, by SIGKILL, in real processes (no mocks).

An incremental save writes chunks, then publishes its manifest; retention deletes manifests, then garbage collection
removes the chunks no manifest names any more. A kill between or inside those steps must never leave a visible
manifest naming a missing chunk, nor take a chunk that a visible manifest, or a save about to publish one, needs:

- a save killed after its chunks and before its manifest (train.py's ``--kill-before-manifest``): the previous
  checkpoint loads, and the next run's collection at fit start removes the chunks the killed save left;
- a collection killed after the manifests went and while their chunks are removed (``--kill-inside-collect``):
  every manifest left loads, and the next run's collection at fit start removes the rest;
- a collection that starts while another process stands between its chunks and its manifest (paused_save.py, held
  on a stdin handshake with the chunk folder's lock held shared) removes nothing, even though the chunks that
  process relies on were left by a killed save and no manifest names them yet.

Random kills over many saves are in ``tests/test_kill_campaign.py`` (modes ``incremental`` and
``incremental-async``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.incremental.files import chunk_folder_of, write_incremental
from cairn.checkpoint.incremental.garbage import collect_garbage, referenced_chunks

SCRIPTS = Path(__file__).parent / "dist_scripts"
TRAIN, PAUSED_SAVE = SCRIPTS / "train.py", SCRIPTS / "paused_save.py"
LINE_TIMEOUT_S = 120

pytestmark = pytest.mark.slow


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(out: Path, folder: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """A run of train.py saving an incremental checkpoint of the wide model at every batch into ``folder``."""
    out.mkdir(exist_ok=True)
    command = [sys.executable, str(TRAIN), "--out", str(out), "--wide", "--incremental"]
    command += ["--save-folder", str(folder), "--save-interval", "1ba", *flags]
    return subprocess.run(command, capture_output=True, text=True, env=_environment(), timeout=LINE_TIMEOUT_S)


def _stored(folder: Path) -> set[str]:
    return set(chunk_folder_of(str(folder)).keys())


def _named(folder: Path) -> dict[str, set[str]]:
    """Each manifest under ``folder``, by file name, with the chunks it names."""
    return {os.path.basename(path): set(keys) for path, keys in referenced_chunks(str(folder)).items()}


def _assert_every_manifest_whole(folder: Path) -> None:
    """No manifest names a chunk the folder lacks, and each loads (every chunk read and checked against its key)."""
    stored = _stored(folder)
    named = _named(folder)
    assert named, "no manifest left at all"
    missing = {name: sorted(keys - stored) for name, keys in named.items() if keys - stored}
    assert not missing, f"manifests name chunks the chunk folder lacks: {missing}"
    for name in named:
        read_checkpoint(str(folder / name))


def _latest_batch(folder: Path) -> int:
    return read_checkpoint(str(folder / "latest-rank0.pt"))["state"]["timestamp"]["batch"]


def _killed(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == -signal.SIGKILL


def test_a_save_killed_between_its_chunks_and_its_manifest_leaves_the_checkpoint_before(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    killed = _train(tmp_path / "killed", folder, "--max-duration", "3ba", "--kill-before-manifest")
    assert _killed(killed) and (tmp_path / "killed" / "killed-before-manifest").exists(), killed.stderr[-3000:]
    assert sorted(_named(folder)) == ["ep0-ba1-rank0.pt"], "the second save's manifest was never published"
    assert _latest_batch(folder) == 1
    _assert_every_manifest_whole(folder)
    orphans = _stored(folder) - set().union(*_named(folder).values())
    assert orphans, "the killed save wrote its chunks before the kill"

    resumed = _train(tmp_path / "resumed", folder, "--max-duration", "1ba", "--autoresume")  # trains nothing
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not orphans & _stored(folder), "the next run's collection at fit start removed the killed save's chunks"
    assert _stored(folder) == set().union(*_named(folder).values())
    _assert_every_manifest_whole(folder)
    assert _latest_batch(folder) == 1


def test_a_collection_killed_while_it_removes_chunks_leaves_every_manifest_whole(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    killed = _train(tmp_path / "killed", folder, "--max-duration", "3ba", "--keep", "1", "--kill-inside-collect")
    marker = tmp_path / "killed" / "killed-inside-collect"
    assert _killed(killed) and marker.exists(), killed.stderr[-3000:]
    assert sorted(_named(folder)) == ["ep0-ba2-rank0.pt"], "retention deleted ba1's manifest before its chunks"
    assert _latest_batch(folder) == 2
    _assert_every_manifest_whole(folder)
    left = _stored(folder) - set().union(*_named(folder).values())
    assert left, f"the kill came with some of ba1's chunks still there ({marker.read_text().strip()})"

    resumed = _train(tmp_path / "resumed", folder, "--max-duration", "2ba", "--keep", "1", "--autoresume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _stored(folder) == set().union(*_named(folder).values()), "fit start's collection finished the job"
    _assert_every_manifest_whole(folder)


class PausedSave:
    """paused_save.py in a process of its own, stopped between its chunks and its manifest until told to go on."""

    def __init__(self, root: Path, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PAUSED_SAVE), str(root), str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_environment(),
        )
        self._expect("CHUNKS WRITTEN")

    def _expect(self, start: str) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()  # blocks until the line comes, or the process ends
        if not line.startswith(start):
            self.process.kill()
            _, errors = self.process.communicate(timeout=LINE_TIMEOUT_S)
            raise AssertionError(f"paused_save.py said {line!r}, not {start!r}:\n{errors[-3000:]}")
        return line

    def publish(self) -> tuple[int, int]:
        """Let it write its manifest; the chunks it wrote and those it found already there."""
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        written, reused = (int(word) for word in self._expect("PUBLISHED").split()[1:])
        assert self.process.wait(timeout=LINE_TIMEOUT_S) == 0
        return written, reused

    def kill(self) -> None:
        self.process.kill()
        assert self.process.wait(timeout=LINE_TIMEOUT_S) == -signal.SIGKILL


def _paused_save_checkpoint() -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("paused_save", PAUSED_SAVE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.checkpoint()


def test_a_collection_never_takes_the_chunks_of_a_save_between_its_chunks_and_its_manifest(tmp_path: Path) -> None:
    """The worst case for the chunk folder's lock: the chunks a save found already there (left by a killed save, named
    by no manifest) are garbage to any collection until that save's manifest is published."""
    root, path = tmp_path, tmp_path / "new.pt"
    older = {"state": {"model": {"w": torch.ones(1 << 15)}, "metadata": {"format_version": 1, "world_size": 1}}}
    write_incremental(older, str(tmp_path / "older.pt"), root=str(root))

    PausedSave(root, path).kill()  # a save killed between its chunks and its manifest
    assert not path.exists()
    orphans = _stored(root) - _named(root)["older.pt"]
    assert len(orphans) == 2, "the killed save left its body and head chunks, which no manifest names"

    second = PausedSave(root, path)  # the same checkpoint again: it relies on those chunks, writing none
    assert collect_garbage(str(root)) is None, "the collection waits: a save holds the chunk folder"
    assert orphans <= _stored(root)
    assert second.publish() == (0, 2)

    expected = _paused_save_checkpoint()["state"]["model"]
    loaded = read_checkpoint(str(path))["state"]["model"]
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    _assert_every_manifest_whole(root)
    assert collect_garbage(str(root)) == 0

    path.unlink()  # the control: once no manifest names them and no save holds the folder, they are garbage
    assert collect_garbage(str(root)) == 2 and not orphans & _stored(root)
    _assert_every_manifest_whole(root)
