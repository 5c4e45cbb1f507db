"""A checkpoint's identity: nothing saved is destroyed by another name, and a run resumes only its own work.

- A ``latest`` link (or the store's pointer) that can take a checkpoint's name is refused when the saver is built.
- Autoresume follows the ``latest`` link, or the store's pointer, only to a name this run's templates produce.
- A damaged newest checkpoint is set aside (kept, renamed), so the run can save under its name again.
- A starting run removes only temporaries whose writer is gone: a live writer's in-flight save survives.
- Resuming a run's own checkpoint restores all of it, whatever the ``load_*`` options (they shape a first load).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from cairn import Callback, Trainer
from cairn.callbacks import CheckpointSaver
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.save.commit import atomic_symlink, remove_stale_temporaries
from cairn.core import State
from cairn.errors import CheckpointCorruptError
from cairn.loggers import Logger
from cairn.models import Classifier
from conftest import TinyNet, make_loader, params_of


def _trainer(max_duration: str = "1ep", init_seed: int = 0, **kwargs: Any) -> Trainer:
    torch.manual_seed(init_seed)
    return Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8),  # 4 batches an epoch
        max_duration=max_duration,
        device="cpu",
        seed=7,
        progress_bar=False,
        **kwargs,
    )


# -- 1. a latest name never takes a checkpoint's name ------------------------------------------------------------


def test_one_rolling_checkpoint_under_the_latest_name_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"save_filename=.*save_latest_filename=.*'latest-rank0\.pt'"):
        _trainer(save_folder=str(tmp_path), save_filename="latest-rank{rank}.pt", save_overwrite=True)
    assert list(tmp_path.iterdir()) == [], "refused before anything ran"


@pytest.mark.parametrize(
    ("filename", "latest"),
    [
        ("ep{epoch}.pt", "ep{epoch}.pt"),  # the same template
        ("ep{epoch}.pt", "ep3.pt"),  # the link would replace the third epoch's checkpoint
        ("ep1.pt", "ep{epoch}.pt"),  # ... and the other way round
        ("ep{epoch}-ba{batch}.pt", "ep0-ba{batch}.pt"),
        ("ep{epoch}", "ep2/latest.pt"),  # a link inside a (sharded) checkpoint folder
        ("Latest-Rank{rank}.pt", "latest-rank{rank}.pt"),  # case-insensitive folders (macOS) see one file
        ("{run_name}-ep{epoch}.pt", "{run_name}-ep7.pt"),
    ],
)
def test_a_latest_name_a_checkpoint_name_can_take_is_refused(filename: str, latest: str) -> None:
    with pytest.raises(ValueError, match="save_latest_filename=None"):
        CheckpointSaver(filename=filename, latest_filename=latest)


def test_a_remote_pointer_that_can_take_a_checkpoints_name_is_refused() -> None:
    with pytest.raises(ValueError, match="latest_remote_file_name"):
        CheckpointSaver(remote_file_name="run/ckpt-{epoch}.pt", latest_remote_file_name="run/ckpt-1.pt")
    with pytest.raises(ValueError, match="latest_remote_file_name"):  # the default pointer is <latest>.symlink
        CheckpointSaver(filename="ep{epoch}.pt.symlink", latest_filename="ep{epoch}.pt")


@pytest.mark.parametrize(
    ("filename", "latest"),
    [
        ("ep{epoch}-ba{batch}-rank{rank}.pt", "latest-rank{rank}.pt"),
        ("{run_name}.pt", "latest-rank{rank}.pt"),  # only a run named latest-rank0 would clash: checked at the swap
        ("ep{epoch:03d}.pt", "latest.pt"),
        ("{run_name}/ep{epoch}.pt", "{run_name}/latest.pt"),
    ],
)
def test_names_that_never_meet_are_accepted(filename: str, latest: str) -> None:
    CheckpointSaver(filename=filename, latest_filename=latest)


def test_the_latest_link_never_replaces_a_file(tmp_path: Path) -> None:
    """A run whose name makes the checkpoint name the link's: the swap is refused and the checkpoint stays."""
    trainer = _trainer(
        "1ba", run_name="latest-rank0", save_folder=str(tmp_path), save_filename="{run_name}.pt", save_overwrite=True
    )
    with pytest.raises(FileExistsError, match="the link would replace it .* save_latest_filename"):
        trainer.fit()
    saved = tmp_path / "latest-rank0.pt"
    assert not saved.is_symlink()
    assert read_checkpoint(str(saved))["state"]["timestamp"]["batch"] == 1


def test_atomic_symlink_keeps_a_regular_file_in_its_way(tmp_path: Path) -> None:
    (tmp_path / "latest.pt").write_bytes(b"a copy of a checkpoint")
    (tmp_path / "ep1.pt").write_bytes(b"new")
    with pytest.raises(FileExistsError):
        atomic_symlink(str(tmp_path / "latest.pt"), str(tmp_path / "ep1.pt"))
    assert (tmp_path / "latest.pt").read_bytes() == b"a copy of a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep1.pt", "latest.pt"], "no temporary left behind"


# -- 3. a run resumes only its own work ---------------------------------------------------------------------------


def test_autoresume_does_not_follow_the_link_to_another_runs_checkpoint(tmp_path: Path) -> None:
    shared = {"save_folder": str(tmp_path), "save_filename": "{run_name}-ep{epoch}.pt"}
    _trainer(run_name="a", **shared).fit()
    _trainer(run_name="b", init_seed=1, **shared).fit()
    assert os.readlink(tmp_path / "latest-rank0.pt") == "b-ep1.pt"

    fresh = _trainer(run_name="c", init_seed=2, autoresume=True, **shared)
    assert fresh.state.resumed_from is None and fresh.state.timestamp.batch == 0
    assert fresh.state.run_name == "c"
    torch.manual_seed(2)
    untrained = list(params_of(TinyNet()).values())
    assert all(torch.equal(a, b) for a, b in zip(params_of(fresh.state.model).values(), untrained, strict=True))

    again = _trainer(run_name="a", init_seed=3, autoresume=True, **shared)
    assert again.state.resumed_from == str(tmp_path / "a-ep1.pt"), "its own checkpoint, not b's behind the link"


def test_autoresume_follows_the_link_to_its_own_name(tmp_path: Path) -> None:
    """A name without progress numbers is found through the link, which now must point to this run's own file."""
    names = {
        "run_name": "r",
        "save_folder": str(tmp_path),
        "save_filename": "ckpt/{run_name}.pt",
        "save_overwrite": True,
    }
    _trainer(**names).fit()
    (tmp_path / "ckpt" / "r.pt").rename(tmp_path / "ckpt" / "moved.pt")
    os.unlink(tmp_path / "latest-rank0.pt")
    os.symlink("ckpt/moved.pt", tmp_path / "latest-rank0.pt")  # points to a name this run's pattern does not take
    assert _trainer(autoresume=True, **names).state.resumed_from is None
    (tmp_path / "ckpt" / "moved.pt").rename(tmp_path / "ckpt" / "r.pt")
    os.unlink(tmp_path / "latest-rank0.pt")
    os.symlink("ckpt/r.pt", tmp_path / "latest-rank0.pt")
    resumed = _trainer(autoresume=True, **names)
    assert resumed.state.resumed_from is not None and resumed.state.timestamp.batch == 4


def test_autoresume_does_not_follow_the_store_pointer_to_another_runs_checkpoint(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_endpoint)
    shared = {"save_folder": f"s3://{s3_bucket}/run", "save_filename": "{run_name}-ep{epoch}.pt"}
    for run, seed in (("a", 0), ("b", 1)):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        _trainer(run_name=run, init_seed=seed, **shared).fit()
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(tmp_path / "c")  # nothing local: only the store's pointer, which names b's file
    fresh = _trainer(run_name="c", init_seed=2, autoresume=True, **shared)
    assert fresh.state.resumed_from is None and fresh.state.run_name == "c"
    (tmp_path / "b2").mkdir()
    monkeypatch.chdir(tmp_path / "b2")
    resumed = _trainer(run_name="b", init_seed=2, autoresume=True, **shared)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/b-ep1.pt", "its own pointer target is followed"


# -- 5. a damaged newest checkpoint is set aside ------------------------------------------------------------------


def _flip_a_weight_byte(path: Path) -> None:
    weight = read_checkpoint(str(path))["state"]["model"]["layers.0.weight"]
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes())
    assert at >= 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_saves_past_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _trainer("2ep", save_folder=str(tmp_path)).fit()
    newest = tmp_path / "ep2-ba8-rank0.pt"
    _flip_a_weight_byte(newest)
    damaged = newest.read_bytes()
    with pytest.raises(CheckpointCorruptError):
        read_checkpoint(str(newest))

    with caplog.at_level(logging.WARNING, logger="cairn"):
        resumed = _trainer("3ep", save_folder=str(tmp_path), autoresume=True)
    assert resumed.state.resumed_from == str(tmp_path / "ep1-ba4-rank0.pt")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("ep2-ba8-rank0.pt.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == damaged, "kept, byte for byte, under a name that says so"
    assert any("set the damaged checkpoint" in r.getMessage() for r in caplog.records)

    resumed.fit()  # saves ep2-ba8 again: no FileExistsError
    assert read_checkpoint(str(newest))["state"]["timestamp"]["batch"] == 8
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep3-ba12-rank0.pt"
    again = _trainer("3ep", save_folder=str(tmp_path), autoresume=True, save_num_checkpoints_to_keep=1)
    assert again.state.resumed_from == str(tmp_path / "ep3-ba12-rank0.pt")
    assert aside[0].exists(), "retention and autoresume never touch it"


def test_only_a_checkpoint_of_this_runs_pattern_is_set_aside(tmp_path: Path) -> None:
    """A damaged file the link leads to, under a name this saver does not write, stays where it is."""
    _trainer("1ep", save_folder=str(tmp_path), save_filename="ckpt.pt", save_overwrite=True, run_name="r").fit()
    (tmp_path / "ckpt.pt").rename(tmp_path / "other.pt")
    _flip_a_weight_byte(tmp_path / "other.pt")
    os.unlink(tmp_path / "latest-rank0.pt")
    os.symlink("other.pt", tmp_path / "latest-rank0.pt")
    fresh = _trainer("1ep", save_folder=str(tmp_path), save_filename="ckpt.pt", save_overwrite=True, autoresume=True)
    assert fresh.state.resumed_from is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest-rank0.pt", "other.pt"]


# -- 6. only a gone writer's temporaries are removed --------------------------------------------------------------

WRITER = """
import os, sys
from cairn.atomic import atomic_write
from cairn.checkpoint.save.sharded import temporary_shard_folder as _temporary_folder

folder, then = sys.argv[1], sys.argv[2]
shards = _temporary_folder(os.path.join(folder, "sharded-ep1"))
os.makedirs(shards)
with open(os.path.join(shards, "__0_0.distcp"), "wb") as file:
    file.write(b"one shard")

def write(temporary):
    with open(temporary, "wb") as file:
        file.write(b"a" * 1000)
        file.flush()
        print("WRITING", temporary, shards, flush=True)
        if then == "die":
            os._exit(0)
        sys.stdin.readline()  # the parent says when to go on
        file.write(b"b" * 1000)

atomic_write(os.path.join(folder, "other.pt"), write)
print("DONE", flush=True)
"""


def _start_writer(tmp_path: Path, folder: Path, then: str) -> tuple[subprocess.Popen[str], str, str]:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    child = subprocess.Popen(
        [sys.executable, str(script), str(folder), then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = _read_line(child.stdout)
    if not line.startswith("WRITING"):
        child.kill()
        pytest.fail(f"the writer did not start writing: {line!r}; stderr:\n{child.communicate()[1]}")
    _, temporary, shards = line.split()
    return child, temporary, shards


def _read_line(stream: IO[str] | None) -> str:
    assert stream is not None
    return stream.readline().strip()


def test_a_starting_run_keeps_a_live_writers_temporaries(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    writer, temporary, shards = _start_writer(tmp_path, folder, then="wait")
    try:
        _trainer("1ba", save_folder=str(folder)).fit()  # its fit start cleans the folder
        assert os.path.isfile(temporary) and os.path.isdir(shards), "the live writer's files are still there"
        out, err = writer.communicate("go\n", timeout=120)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0 and "DONE" in out, f"the writer failed:\n{err}"
    assert (folder / "other.pt").read_bytes() == b"a" * 1000 + b"b" * 1000


def test_a_starting_run_removes_a_dead_writers_temporaries(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    writer, temporary, shards = _start_writer(tmp_path, folder, then="die")
    writer.communicate(timeout=120)  # gone, and reaped
    assert os.path.isfile(temporary) and os.path.isdir(shards)
    _trainer("1ba", save_folder=str(folder)).fit()
    assert not os.path.exists(temporary) and not os.path.exists(shards)


def test_temporaries_of_other_machines_and_old_names_wait_until_silent_for_long(tmp_path: Path) -> None:
    from cairn.checkpoint.save.commit import STALE_AFTER_S

    other_host = tmp_path / ".ep1.pt.cairn-tmp-0badbeef-1234-abcd1234"
    old_form = tmp_path / ".ep2.pt.cairn-tmp-1234-abcd1234"
    unreadable = tmp_path / ".ep3.pt.cairn-tmp-garbage"
    other_shards = tmp_path / ".ep4.cairn-tmp-0badbeef-99-0123abcd"
    for path in (other_host, old_form, unreadable):
        path.write_bytes(b"partial")
    other_shards.mkdir()
    (other_shards / "__1_0.distcp").write_bytes(b"shard")
    assert remove_stale_temporaries(str(tmp_path)) == [], "their writers may be alive elsewhere"

    silent = os.path.getmtime(other_host) - STALE_AFTER_S - 60
    for path in (other_host, old_form, unreadable, other_shards):
        os.utime(path, (silent, silent))
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(map(str, (other_host, old_form, unreadable))), "a shard was written lately"
    os.utime(other_shards / "__1_0.distcp", (silent, silent))
    assert remove_stale_temporaries(str(tmp_path)) == [str(other_shards)]
    assert list(tmp_path.iterdir()) == []


# -- 15. resuming restores everything -----------------------------------------------------------------------------


class BatchCounter(Callback):
    """A callback with state of its own: the batches it has seen, across restarts."""

    def __init__(self) -> None:
        self.count = 0

    def batch_end(self, state: State, logger: Logger) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


def test_autoresume_restores_everything_whatever_the_load_options(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = _trainer("1ep", save_folder=str(tmp_path), callbacks=[BatchCounter()], autoresume=True, run_name="r")
    first.fit()
    with caplog.at_level(logging.INFO, logger="cairn"):
        resumed = _trainer(
            "2ep",
            init_seed=1,
            save_folder=str(tmp_path),
            callbacks=[counter := BatchCounter()],
            autoresume=True,
            run_name="r",
            load_ignore_keys=["state/callbacks/*", "state/optimizers"],
            load_weights_only=True,
            load_strict_model_weights=False,
        )
    assert counter.count == 4, "the callbacks' state came back"
    assert resumed.state.timestamp.batch == 4, "not weights only"
    saved, loaded = first.state.optimizers[0].state_dict(), resumed.state.optimizers[0].state_dict()
    assert saved["param_groups"] == loaded["param_groups"] and len(loaded["state"]) == len(saved["state"])
    notes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("load_weights_only" in n and "load_ignore_keys" in n and "ignored" in n for n in notes), notes
    resumed.fit()
    assert counter.count == 8


def test_names_with_non_ascii_digits_are_never_taken_for_checkpoints(tmp_path: Path) -> None:
    """``\\d`` matches any Unicode digit: ``ep٩.pt`` (Arabic-Indic nine) would have been ordered as epoch 9."""
    from cairn.checkpoint.naming.templates import name_pattern
    from cairn.core import Time

    state = State(
        model=torch.nn.Linear(1, 1),
        run_name="r",
        rank_zero_seed=0,
        max_duration=Time.from_timestring("1ep"),
        device=torch.device("cpu"),
    )
    pattern = name_pattern("ep{epoch}.pt", state, rank=0)
    assert pattern.match("ep9.pt") and not pattern.match("ep\u0669.pt")
