"""Saving and loading arguments that could never work are refused when the Trainer (or CheckpointSaver) is built,
with one sentence naming the argument, its value and the fix, instead of failing at the first save an hour later,
writing outside ``save_folder``, or silently doing nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Event, Time, Timestamp, Trainer
from cairn.callbacks import CheckpointSaver
from cairn.models import Classifier
from cairn.utils.checkpoint import load_checkpoint, save_checkpoint
from conftest import TinyNet, make_loader, params_of
from conftest import build_trainer as build
from conftest import refused_at_construction as refused


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of TinyNet with AdamW after two batches (read-only)."""
    folder = tmp_path_factory.mktemp("real")
    trainer = build(folder, seed=1)
    trainer.fit()
    trainer.close()
    return Path(trainer.saved_checkpoints[-1])


# -- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{batch:s}", "{batch:06d}"),  # a str spec on an int: failed at the first save
        ("ep{epoch}-{rank:s}", "cannot be filled"),
        ("ep{epoch}-{rank:c}", "cannot be filled"),  # chr(10**12) does not exist
        ("{batch!x}", "drop the !x"),
        ("{batch[0]}", "plain variable {batch}"),
        ("ep{epoch.real}.pt", "plain variable {epoch}"),
        ("a\0b{batch}.pt", "control character"),
        ("a\nb{batch}.pt", "control character"),
        ("{batch:>300}.pt", "{batch:06d}"),  # the real error was hidden by the cleanup's own OSError
        ("{batch:0300}.pt", "smaller width"),
        ("{run_name:>300}.pt", "smaller width"),
        ("{run_name:>240}.pt", "shorten it"),  # fits NAME_MAX, but not with the temporary suffix while writing
        ("x" * 250 + "{batch}.pt", "shorten it"),
        ("{batch:{epoch}}", "nests a field"),
        ("ba{batch:>4}.pt", "{batch:06d}"),  # "ba   1.pt": retention and autoresume never found it again
        ("ba{batch:,}.pt", "{batch:06d}"),
        ("../x-ba{batch}.pt", "outside the save folder"),  # was written beside save_folder, unseen by retention
        ("/tmp/abs-ba{batch}.pt", "outside the save folder"),
        ("./ep{epoch}.pt", "'ep{epoch}.pt'"),  # written, but never found again by retention or autoresume
        ("a//ep{epoch}.pt", "'a/ep{epoch}.pt'"),
        ("ep{epoch}/", "'ep{epoch}'"),
        ("ep{epoch}.cairn-tmp-x", "unfinished files"),  # the next run's cleanup would delete it
    ],
)
def test_save_filenames_that_would_fail_or_escape_are_refused(tmp_path: Path, template: str, why: str) -> None:
    message = refused(tmp_path, ValueError, "save_filename", template)
    assert why in message


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("latest_filename", "../latest.pt"),
        ("latest_filename", "{epoch:d}\0.pt"),
        ("remote_file_name", "/run/ep{epoch}.pt"),
        ("remote_file_name", "run/../../ep{epoch}.pt"),
        ("remote_file_name", "r" * 1100 + "{epoch}.pt"),
        ("latest_remote_file_name", "../latest.symlink"),
        ("folder", "ck\0pts"),
        ("folder", "x" * 256 + "/ckpts"),
    ],
)
def test_every_saver_name_is_checked_when_the_saver_is_built(tmp_path: Path, argument: str, value: str) -> None:
    with pytest.raises(ValueError) as info:
        CheckpointSaver(**{"folder": str(tmp_path), argument: value})
    assert f"{argument}={value!r}" in str(info.value)


def test_the_run_name_is_checked_in_the_names_inside_the_constructor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run_name='\.\./\.\./escape'.*save folder"):
        Trainer(
            model=Classifier(TinyNet()),
            train_dataloader=make_loader(),
            max_duration="2ba",
            progress_bar=False,
            run_name="../../escape",
            save_folder=str(tmp_path / "ckpt"),
            save_filename="{run_name}-ep{epoch}.pt",
        )
    assert list(tmp_path.iterdir()) == []


def test_names_that_only_look_unusual_still_work(tmp_path: Path) -> None:
    """Folders inside a name, padded numbers, braces doubled, and ``..`` or an absolute path in the folder."""
    folder = tmp_path / "a" / ".." / "ckpt"
    trainer = build(
        tmp_path,
        save_folder=str(folder),
        save_filename="{run_name}/ep{epoch:03d}-ba{batch:04d}-r{rank:>2}-{{x}}.pt",
        save_interval="1ba",
        save_num_checkpoints_to_keep=1,
    )
    trainer.fit()
    names = sorted(str(p.relative_to(tmp_path / "ckpt")) for p in (tmp_path / "ckpt").rglob("*.pt"))
    assert names == ["latest-rank0.pt", "run/ep000-ba0002-r 0-{x}.pt"], "retention read the padded numbers back"


@pytest.mark.parametrize("blocked", ["folder", "parent", "prefix"])
def test_a_save_folder_that_is_a_file_is_refused(tmp_path: Path, blocked: str) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("a file where the checkpoints' folder must go")
    folder = {"folder": str(file), "parent": str(file / "ckpt"), "prefix": str(file / "{run_name}")}[blocked]
    message = refused(tmp_path, ValueError, "save_folder", folder)
    assert repr(str(file)) in message and "is a file" in message


def test_path_objects_are_accepted_for_every_name(tmp_path: Path) -> None:
    trainer = build(
        tmp_path,
        save_folder=tmp_path / "ckpt",
        save_filename=Path("sub") / "ep{epoch}-ba{batch}.pt",
        save_latest_filename=Path("latest.pt"),
    )
    trainer.fit()
    link = tmp_path / "ckpt" / "latest.pt"
    assert link.is_symlink() and link.resolve() == (tmp_path / "ckpt" / "sub" / "ep0-ba2.pt").resolve()
    saver = CheckpointSaver(folder=tmp_path, filename=Path("w{epoch}.pt"), remote_file_name=Path("r/w{epoch}.pt"))
    assert (saver.folder, saver.filename, saver.remote_file_name) == (str(tmp_path), "w{epoch}.pt", "r/w{epoch}.pt")


def test_names_of_other_types_are_a_type_error(tmp_path: Path) -> None:
    message = refused(tmp_path, TypeError, "save_filename", b"ep{epoch}.pt")
    assert "give a str" in message


# -- intervals and time strings ----------------------------------------------------------------------------------


def test_an_interval_too_small_to_compute_is_refused_in_the_constructor(tmp_path: Path) -> None:
    message = refused(tmp_path, ValueError, "save_interval", "1e-320dur")  # was an OverflowError at the first save
    assert "'1ba'" in message


def test_a_tiny_interval_that_can_be_computed_saves_every_step(tmp_path: Path) -> None:
    """``now / every`` overflows to infinity late in a run; every step forward then crosses a multiple."""
    trainer = build(tmp_path, save_interval="3e-308sec")
    state = trainer.state
    state.advance(Timestamp(batch=1, sample=8, batch_in_epoch=1, sample_in_epoch=8, total_wct=1000.0))
    saver = next(c for c in state.callbacks if isinstance(c, CheckpointSaver))
    assert saver.policy(state, Event.BATCH_CHECKPOINT) is True
    state.advance(state.timestamp)  # no time passed: nothing is due
    assert saver.policy(state, Event.BATCH_CHECKPOINT) is False


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("1e400ep", "too large"),  # was "epochs are whole numbers"
        ("1e400dur", "too large"),
        ("9" * 5000 + "ba", "digits"),  # was Python's int-size message about sys.set_int_max_str_digits
        ("9" * 5000 + "s", "digits"),
        ("1e-400dur", "too small"),  # was read as 0.0
        ("\u0661ep", ""),  # an Arabic-Indic digit one: only ASCII digits are numbers here
        ("\uff11ba", ""),  # a full-width one
    ],
)
def test_unusable_time_strings_are_value_errors_naming_the_accepted_forms(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        Time.from_timestring(text)
    message = str(info.value)
    assert why in message and "'1h20m40s'" in message and "sys.set_int_max_str_digits" not in message


def test_a_time_beyond_a_floats_range_is_refused() -> None:
    with pytest.raises(ValueError, match="at most about 1.8e308"):
        Time(10**400, "ba")


def test_whole_number_errors_spell_the_unit() -> None:
    with pytest.raises(ValueError, match="batches are counted in whole numbers"):
        Time(1.5, "ba")


# -- ignore keys -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argument", ["save_ignore_keys", "load_ignore_keys"])
@pytest.mark.parametrize(
    ("value", "error", "why"),
    [
        ("state/optimizers", TypeError, "wrap it in a list: {argument}=['state/optimizers']"),
        (b"rng", TypeError, "wrap it in a list"),
        ([1], TypeError, "non-empty str path"),
        (["rng", None], TypeError, "non-empty str path"),
        ([""], TypeError, "non-empty str path"),
        ({"state/optimizers": True}, TypeError, "list of paths"),
        (3, TypeError, "list of paths"),
        (["*"], ValueError, "would take 'state'"),
        (["state"], ValueError, "would take 'state'"),
        (["state/*"], ValueError, "would take 'state/metadata'"),
        (["state/metadata"], ValueError, "would take 'state/metadata'"),
        (["*/sharded"], ValueError, "would take 'state/metadata/sharded'"),
        (["state/metadata/metrics"], ValueError, "would take 'state/metadata/metrics'"),  # retention ranks by it
        (["optimizers"], ValueError, "write 'state/optimizers'"),
    ],
)
def test_ignore_keys_that_could_not_work_are_refused(
    tmp_path: Path, checkpoint: Path, argument: str, value: Any, error: type[Exception], why: str
) -> None:
    message = refused(tmp_path, error, argument, value, load_path=str(checkpoint))
    assert why.format(argument=argument) in message, message


def test_leaving_the_model_out_of_a_saved_file_is_refused(tmp_path: Path) -> None:
    """Every reader refuses a file without ``state/model``; leaving it out when loading is fine."""
    message = refused(tmp_path, ValueError, "save_ignore_keys", ["state/model"])
    assert "the checkpoint's model" in message
    build(tmp_path, load_ignore_keys=["state/model"], save_folder=None)


def test_a_save_ignore_keys_callable_is_refused(tmp_path: Path) -> None:
    def keep_everything(checkpoint: dict[str, Any]) -> None:
        pass

    message = refused(tmp_path, TypeError, "save_ignore_keys", keep_everything)
    assert "only load_ignore_keys" in message


def test_load_ignore_keys_may_be_a_callable_that_edits_the_checkpoint(tmp_path: Path, checkpoint: Path) -> None:
    seen: list[list[str]] = []

    def forget_the_optimizer(loaded: dict[str, Any]) -> None:
        seen.append(sorted(loaded))
        del loaded["state"]["optimizers"]

    net = TinyNet()
    trainer = Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(),
        max_duration="2ba",
        progress_bar=False,
        optimizers=torch.optim.SGD(net.parameters(), lr=0.1),  # the file holds AdamW: it would not fit
        load_path=str(checkpoint),
        load_ignore_keys=forget_the_optimizer,
    )
    assert seen == [["rng", "state"]]
    saved = torch.load(checkpoint, weights_only=True)["state"]
    assert all(torch.equal(params_of(net)[k], saved["model"][k]) for k in saved["model"])
    assert trainer.state.timestamp.batch == 2
    assert trainer.state.optimizers[0].state_dict()["state"] == {}


def test_a_load_ignore_keys_callable_that_removes_the_state_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    def remove_everything(loaded: dict[str, Any]) -> None:
        loaded.clear()

    with pytest.raises(ValueError, match=r"removed the checkpoint's 'state'"):
        build(tmp_path, save_folder=None, load_path=str(checkpoint), load_ignore_keys=remove_everything)


def test_the_manual_doors_check_ignore_keys_too(tmp_path: Path, checkpoint: Path) -> None:
    trainer = build(tmp_path, save_folder=None)
    with pytest.raises(TypeError, match="wrap it in a list"):
        save_checkpoint(trainer.state, str(tmp_path / "manual.pt"), ignore_keys="rng")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the checkpoint's model"):
        save_checkpoint(trainer.state, str(tmp_path / "manual.pt"), ignore_keys=["state/model"])
    with pytest.raises(ValueError, match="would take 'state'"):
        load_checkpoint(str(checkpoint), trainer.state, ignore_keys=["state"])
    assert not os.path.exists(tmp_path / "manual.pt")
