"""Arguments that used to be accepted when the Trainer (or CheckpointSaver) was built and then failed, or silently
did the wrong thing, once training had begun: flags given as strings, loaders and schedulers that are not,
an optimizer over another model, interval functions answering "no", and names with bidirectional controls. Each is
now refused in the constructor (or, for an interval function's answer, at the first answer that is not a bool)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cairn import Event
from cairn.callbacks import CheckpointSaver
from cairn.core.state import State
from cairn.models import Classifier
from conftest import TinyNet, make_loader, params_of
from conftest import build_trainer as build
from conftest import refused_at_construction as refused


def saved_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "ckpt").glob("ep*.pt")) if (tmp_path / "ckpt").exists() else []


# -- yes/no arguments --------------------------------------------------------------------------------------------

_TRAINER_FLAGS = [
    "save_overwrite",
    "save_weights_only",
    "save_async",
    "autoresume",
    "load_weights_only",
    "load_strict_model_weights",
    "load_progress_bar",
    "save_on_preemption",
    "progress_bar",
]
_NOT_BOOLS = ["False", "yes", 1, 0, None, 1.0]


@pytest.mark.parametrize("value", _NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("argument", _TRAINER_FLAGS)
def test_a_trainer_flag_that_is_not_a_bool_is_refused(tmp_path: Path, argument: str, value: object) -> None:
    """``save_overwrite="False"`` from a config file used to overwrite: any non-empty string counted as yes."""
    message = refused(tmp_path, TypeError, argument, value)
    assert "True or False" in message


@pytest.mark.parametrize("value", _NOT_BOOLS, ids=repr)
@pytest.mark.parametrize("argument", ["weights_only", "overwrite", "async_save"])
def test_a_saver_flag_that_is_not_a_bool_is_refused(tmp_path: Path, argument: str, value: object) -> None:
    with pytest.raises(TypeError) as info:
        CheckpointSaver(folder=str(tmp_path), **{argument: value})
    assert f"{argument}={value!r}" in str(info.value)


def test_numpy_booleans_are_taken_as_bools(tmp_path: Path) -> None:
    trainer = build(tmp_path, save_overwrite=np.bool_(True), save_weights_only=np.bool_(False))
    saver = next(c for c in trainer.state.callbacks if isinstance(c, CheckpointSaver))
    assert saver.overwrite is True and saver.weights_only is False
    saver = CheckpointSaver(folder=str(tmp_path), async_save=np.bool_(True))
    assert saver.async_save is True


# -- loaders and schedulers --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [5, None, "train.csv", object()], ids=["int", "None", "path", "object"])
def test_a_train_dataloader_that_cannot_be_iterated_is_refused(tmp_path: Path, value: object) -> None:
    message = refused(tmp_path, TypeError, "train_dataloader", value)
    assert "DataLoader" in message


def test_an_eval_dataloader_that_cannot_be_iterated_is_refused_before_training(tmp_path: Path) -> None:
    """It used to fail at the first evaluation, an epoch of training later."""
    refused(tmp_path, TypeError, "eval_dataloader", 5)


def test_loaders_that_only_index_or_only_iterate_are_accepted(tmp_path: Path) -> None:
    batches = list(make_loader())
    trainer = build(tmp_path, train_dataloader=batches, eval_dataloader=iter(batches), save_folder=None)
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2


class _StepOnly:
    def step(self) -> None:
        pass


class _NeedsMetrics(_StepOnly):
    def step(self, metrics: float) -> None:  # type: ignore[override]
        del metrics

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


@pytest.mark.parametrize(
    ("scheduler", "error", "says"),
    [
        (5, TypeError, "no step, state_dict, load_state_dict method"),
        (_StepOnly(), TypeError, "no state_dict, load_state_dict method"),
        (_NeedsMetrics(), ValueError, "needs metrics"),
    ],
    ids=["int", "no-state-dict", "step-needs-an-argument"],
)
def test_a_scheduler_the_loop_cannot_step_or_checkpoint_is_refused(
    tmp_path: Path, scheduler: object, error: type[Exception], says: str
) -> None:
    """``schedulers=[5]`` failed at the first batch, one without ``state_dict`` at the first checkpoint."""
    with pytest.raises(error) as info:
        build(tmp_path, schedulers=[scheduler])
    message = str(info.value)
    assert message.startswith("schedulers: ") and says in message, message
    assert not (tmp_path / "ckpt").exists()


def test_a_scheduler_with_step_and_state_is_accepted(tmp_path: Path) -> None:
    model = Classifier(TinyNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    trainer = build(tmp_path, model=model, optimizers=optimizer, schedulers=scheduler)
    trainer.fit()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


# -- optimizers ---------------------------------------------------------------------------------------------------


def test_an_optimizer_over_another_models_parameters_is_refused(tmp_path: Path) -> None:
    """fit() used to "train" for hours and leave the model as it was."""
    other = TinyNet()
    with pytest.raises(ValueError, match=r"optimizers\[0\]=SGD holds none of the model's parameters"):
        build(tmp_path, optimizers=torch.optim.SGD(other.parameters(), lr=0.1))
    assert not (tmp_path / "ckpt").exists()


def test_an_optimizer_with_a_parameter_kept_outside_the_model_trains_the_model(tmp_path: Path) -> None:
    model = Classifier(TinyNet())
    temperature = torch.nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([*model.parameters(), temperature], lr=0.1)
    before = params_of(model)
    trainer = build(tmp_path, model=model, optimizers=optimizer, save_folder=None)
    trainer.fit()
    after = params_of(model)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the model did not change"


# -- interval functions -------------------------------------------------------------------------------------------


def test_a_save_interval_answering_a_string_fails_at_its_first_answer_without_saving(tmp_path: Path) -> None:
    """``"no"`` used to count as yes: a checkpoint after every batch."""

    def never(state: State, event: Event) -> Any:
        return "no"

    trainer = build(tmp_path, save_interval=never, max_duration="3ba")
    with pytest.raises(TypeError, match=r"save_interval=.*never.* returned 'no' \(a str\) at BATCH_CHECKPOINT"):
        trainer.fit()
    assert saved_names(tmp_path) == []
    assert int(trainer.state.timestamp.batch) == 1, "stopped at the first answer"


def test_an_eval_interval_answering_a_tensor_of_several_values_names_the_argument(tmp_path: Path) -> None:
    """It used to fail inside torch: "Boolean value of Tensor with more than one value is ambiguous"."""

    def per_sample(state: State, event: Event) -> Any:
        return torch.tensor([True, False])

    trainer = build(tmp_path, eval_dataloader=make_loader(n=8), eval_interval=per_sample, save_folder=None)
    with pytest.raises(TypeError, match=r"eval_interval=.* returned a tensor of shape \(2,\) and dtype torch.bool"):
        trainer.fit()


def test_interval_functions_may_answer_with_numpy_or_zero_dim_tensor_bools(tmp_path: Path) -> None:
    def after_the_first_batch(state: State, event: Event) -> Any:
        return torch.tensor(event is Event.BATCH_CHECKPOINT and int(state.timestamp.batch) == 1)

    def never(state: State, event: Event) -> Any:
        return np.bool_(False)

    trainer = build(
        tmp_path,
        save_interval=after_the_first_batch,
        eval_interval=never,
        eval_dataloader=make_loader(n=8),
        max_duration="3ba",
    )
    trainer.fit()
    assert saved_names(tmp_path) == ["ep0-ba1-rank0.pt", "ep0-ba3-rank0.pt"]  # the end is always saved


# -- bidirectional controls in names -------------------------------------------------------------------------------

_BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e", "\u200f"]
_BIDI += ["\u061c"]


@pytest.mark.parametrize("char", _BIDI, ids=lambda c: f"U+{ord(c):04X}")
def test_a_file_name_with_a_bidi_control_is_refused(tmp_path: Path, char: str) -> None:
    """``"ep{epoch}\u202egp.pt"`` listed as ``ep0tp.pg``: a checkpoint that reads as another file."""
    message = refused(tmp_path, ValueError, "save_filename", f"ep{{epoch}}{char}gp.pt")
    assert "bidirectional" in message


@pytest.mark.parametrize("argument", ["folder", "filename", "latest_filename", "remote_file_name"])
def test_every_saver_name_refuses_bidi_controls(tmp_path: Path, argument: str) -> None:
    value = str(tmp_path / "x\u202e") if argument == "folder" else "a\u2067b.pt"
    with pytest.raises(ValueError, match="bidirectional") as info:
        CheckpointSaver(**{"folder": str(tmp_path), argument: value})
    assert f"{argument}={value!r}" in str(info.value)


@pytest.mark.parametrize("run_name", ["run\u202egp.pt", "\u2066run", "run\x1b[2J"], ids=["RLO", "LRI", "escape"])
def test_a_run_name_with_bidi_or_control_characters_is_refused(tmp_path: Path, run_name: str) -> None:
    """Even when no file name uses it: the run name is shown in logs and progress bars and stored in checkpoints."""
    message = refused(tmp_path, ValueError, "run_name", run_name, save_folder=None)
    assert "remove them" in message


def test_a_run_name_with_a_bidi_control_is_refused_in_the_names_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_name="):
        build(tmp_path, run_name="r\u202eun", save_filename="{run_name}-ep{epoch}.pt")
    assert not (tmp_path / "ckpt").exists()
