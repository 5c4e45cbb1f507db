"""Bad checkpoints and bad saving arguments: each gets one clear error from cairn.errors, before any training step.

Loading goes through the three public doors (``Trainer(load_path=...)``, ``cairn.utils.checkpoint.load_checkpoint``
and ``cairn.checkpoint.read_checkpoint``); after a refused load the model holds exactly the weights it had before.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from torch import nn

import cairn.errors
from cairn import Event, Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.format import content_hash
from cairn.core import Callback, State
from cairn.errors import (
    CairnError,
    CheckpointCorruptError,
    CheckpointIncompatibleError,
    CheckpointNotFoundError,
    UnsafeCheckpointError,
)
from cairn.loggers import Logger
from cairn.models import Classifier
from cairn.utils.checkpoint import load_checkpoint
from conftest import EventRecorder, TinyNet, make_loader, params_of

Door = Literal["trainer", "load_checkpoint", "read_checkpoint"]
DOORS: list[Door] = ["trainer", "load_checkpoint", "read_checkpoint"]


# -- helpers ------------------------------------------------------------------------------------------------------


def make_trainer(net: nn.Module, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_duration", "2ba")
    return Trainer(model=Classifier(net), train_dataloader=make_loader(), progress_bar=False, seed=1, **kwargs)


def save_real_checkpoint(folder: Path, net: nn.Module | None = None, **kwargs: Any) -> Path:
    """Train two batches and return the checkpoint cairn saved at the end."""
    trainer = make_trainer(net or TinyNet(), save_folder=str(folder), **kwargs)
    trainer.fit()
    trainer.close()
    return Path(trainer.saved_checkpoints[-1])


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete, verified cairn checkpoint of TinyNet with AdamW (treat as read-only)."""
    return save_real_checkpoint(tmp_path_factory.mktemp("real"))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def refuse(door: Door, path: Path, error: type[CairnError], net: nn.Module | None = None, **kwargs: Any) -> CairnError:
    """Load ``path`` through ``door``; assert ``error`` is raised and nothing at all was applied."""
    net = net or TinyNet()
    before = params_of(net)
    if door == "read_checkpoint":
        with pytest.raises(error) as info:
            read_checkpoint(str(path))
    elif door == "trainer":
        with pytest.raises(error) as info:
            make_trainer(net, load_path=str(path), **kwargs)
    else:
        trainer = make_trainer(net, **kwargs)
        timestamp = trainer.state.timestamp.state_dict()
        optimizer = trainer.state.optimizers[0].state_dict()
        with pytest.raises(error) as info:
            load_checkpoint(str(path), trainer.state)
        assert same_weights(params_of(net), before), f"a refused load of {path.name} changed the model's weights"
        assert trainer.state.timestamp.state_dict() == timestamp, "the timestamp was restored from a refused file"
        assert trainer.state.optimizers[0].state_dict()["state"] == {}, "the optimizer was restored from a refused file"
        assert trainer.state.optimizers[0].state_dict()["param_groups"] == optimizer["param_groups"]
        assert trainer.state.resumed_from is None
    assert same_weights(params_of(net), before), f"a refused load of {path.name} changed the model's weights"
    assert isinstance(info.value, CairnError)
    assert_names_the_file(info.value, path)
    return info.value


def assert_names_the_file(err: BaseException, path: Path) -> None:
    message = str(err)
    first_line = message.splitlines()[0] if message else ""
    assert str(path) in first_line, f"the message does not start by naming {path}: {message!r}"
    if not isinstance(err, CheckpointIncompatibleError):  # that one lists its mismatches, one a line
        assert "\n" not in message, f"expected one line: {message!r}"
    assert "Traceback" not in message


def rewrite(source: Path, target: Path, change: Callable[[dict[str, Any]], None], *, rehash: bool) -> Path:
    """Load a cairn checkpoint, ``change`` it and save it with plain torch.save (re-hashing it when asked)."""
    checkpoint = torch.load(source, weights_only=True)
    change(checkpoint)
    if rehash:
        checkpoint["state"]["metadata"]["content_hash"] = content_hash(checkpoint)
    torch.save(checkpoint, target)
    return target


def zip_member_span(path: Path, member_suffix: str) -> tuple[int, int]:
    """Byte range of a stored (uncompressed) zip member's data, found through its local header."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    assert info.compress_type == zipfile.ZIP_STORED
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    return start, start + info.file_size


def flip_bit(source: Path, target: Path, position: int, bit: int = 0) -> Path:
    data = bytearray(source.read_bytes())
    data[position] ^= 1 << bit
    target.write_bytes(bytes(data))
    return target


# -- the hierarchy ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        CheckpointNotFoundError,
        CheckpointCorruptError,
        CheckpointIncompatibleError,
        UnsafeCheckpointError,
        cairn.errors.ObjectStoreError,
    ],
)
def test_every_cairn_error_is_a_cairn_error(error: type[Exception]) -> None:
    assert issubclass(error, CairnError)
    assert error.__name__ in cairn.errors.__all__


def test_a_missing_checkpoint_is_also_a_file_not_found_error() -> None:
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


@pytest.mark.parametrize("door", DOORS)
def test_a_missing_path_raises_checkpoint_not_found(tmp_path: Path, door: Door) -> None:
    err = refuse(door, tmp_path / "nowhere" / "ep1.pt", CheckpointNotFoundError)
    assert isinstance(err, FileNotFoundError)


# -- code execution ---------------------------------------------------------------------------------------------


class RunsShell:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class RunsPython:
    """Unpickling this would exec Python that creates ``<marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def save_booby_trapped(real: Path, target: Path, payload: object, *, legacy: bool) -> Path:
    """A genuine cairn checkpoint with one object inside that needs code execution to load."""
    checkpoint = torch.load(real, weights_only=True)
    checkpoint["state"]["callbacks"]["Payload"] = {"value": payload}
    torch.save(checkpoint, target, _use_new_zipfile_serialization=not legacy)
    return target


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [RunsShell, RunsPython])
def test_the_payload_really_runs_code_when_loaded_unsafely(
    tmp_path: Path, real_checkpoint: Path, payload: type, legacy: bool
) -> None:
    """The control for the tests below: the files they use do run code under weights_only=False."""
    marker = tmp_path / "ran"
    path = save_booby_trapped(real_checkpoint, tmp_path / "trap.pt", payload(marker), legacy=legacy)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [RunsShell, RunsPython])
def test_a_pickle_that_needs_code_execution_is_refused_and_nothing_runs(
    tmp_path: Path, real_checkpoint: Path, payload: type, legacy: bool, door: Door
) -> None:
    marker = tmp_path / "ran"
    path = save_booby_trapped(real_checkpoint, tmp_path / "trap.pt", payload(marker), legacy=legacy)
    refuse(door, path, UnsafeCheckpointError)
    assert not marker.exists(), "loading the file ran the code inside it"


def test_a_bare_malicious_object_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "bare.pt"
    torch.save(RunsShell(marker), path)
    refuse("trainer", path, UnsafeCheckpointError)
    assert not marker.exists()


# -- damaged files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("cut", ["1 byte", "half", "all but 10 bytes"])
def test_a_truncated_checkpoint_is_corrupt(tmp_path: Path, real_checkpoint: Path, cut: str, door: Door) -> None:
    data = real_checkpoint.read_bytes()
    keep = {"1 byte": 1, "half": len(data) // 2, "all but 10 bytes": len(data) - 10}[cut]
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[:keep])
    refuse(door, path, CheckpointCorruptError)


@pytest.mark.parametrize("door", DOORS)
def test_an_empty_file_is_corrupt(tmp_path: Path, door: Door) -> None:
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    refuse(door, path, CheckpointCorruptError)


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_corrupt(tmp_path: Path, seed: int) -> None:
    generator = random.Random(seed)
    path = tmp_path / f"random-{seed}.pt"
    path.write_bytes(generator.randbytes(generator.randrange(1, 4000)))
    refuse("read_checkpoint", path, CheckpointCorruptError)


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("text", ["hello world\n", "a", "lr: 0.1\nepochs: 3\n", "# notes\n"])
def test_a_text_file_is_corrupt(tmp_path: Path, text: str, door: Door) -> None:
    path = tmp_path / "notes.pt"
    path.write_text(text)
    refuse(door, path, CheckpointCorruptError)


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    refuse("trainer", tmp_path, CheckpointCorruptError)


@pytest.mark.parametrize("door", DOORS)
def test_an_edited_tensor_fails_the_content_hash(tmp_path: Path, real_checkpoint: Path, door: Door) -> None:
    def nudge(checkpoint: dict[str, Any]) -> None:
        checkpoint["state"]["model"]["layers.0.weight"][0, 0] += 1.0

    path = rewrite(real_checkpoint, tmp_path / "edited.pt", nudge, rehash=False)
    err = refuse(door, path, CheckpointCorruptError)
    assert "hash" in str(err)


@pytest.mark.parametrize("member", ["data/0", "data/3"])
@pytest.mark.parametrize("bit", [0, 7])
def test_a_flipped_bit_in_a_tensor_is_corrupt(tmp_path: Path, real_checkpoint: Path, member: str, bit: int) -> None:
    start, end = zip_member_span(real_checkpoint, member)
    path = flip_bit(real_checkpoint, tmp_path / "flipped.pt", (start + end) // 2, bit)
    refuse("trainer", path, CheckpointCorruptError)


def test_a_flipped_bit_in_the_pickle_gives_a_cairn_error_never_a_raw_one(tmp_path: Path, real_checkpoint: Path) -> None:
    """Damage to the structure may read as corrupt or as unsafe, but it is always diagnosed (seeded positions)."""
    start, end = zip_member_span(real_checkpoint, "data.pkl")
    generator = random.Random(0)
    undiagnosed = []
    for position in generator.sample(range(start, end), 200):
        bit = generator.randrange(8)
        path = flip_bit(real_checkpoint, tmp_path / "flipped.pt", position, bit)
        try:
            read_checkpoint(str(path))
        except CairnError:
            continue
        except Exception as err:  # noqa: BLE001 - collected for the assertion message
            undiagnosed.append(f"byte {position} bit {bit}: {err!r}"[:160])
    assert undiagnosed == [], f"{len(undiagnosed)} flips escaped as non-cairn errors:\n" + "\n".join(undiagnosed[:10])


@pytest.mark.parametrize("door", DOORS)
def test_a_plain_state_dict_is_not_a_cairn_checkpoint(tmp_path: Path, door: Door) -> None:
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    err = refuse(door, path, CheckpointCorruptError)
    assert "not a cairn checkpoint" in str(err)


def _bad_rng(checkpoint: dict[str, Any]) -> None:
    checkpoint["rng"] = [{}]


def _bad_timestamp(checkpoint: dict[str, Any]) -> None:
    checkpoint["state"]["timestamp"]["batch"] = "two"


def _bad_metric(checkpoint: dict[str, Any]) -> None:
    for metric in checkpoint["state"]["train_metrics"].values():
        for name in metric:
            if name != "_update_count":
                metric[name] = "nonsense"


@pytest.mark.parametrize("door", ["trainer", "load_checkpoint"])
@pytest.mark.parametrize("change", [_bad_rng, _bad_timestamp, _bad_metric], ids=["rng", "timestamp", "metric"])
def test_a_well_hashed_checkpoint_with_malformed_state_is_refused_before_anything_changes(
    tmp_path: Path, real_checkpoint: Path, change: Callable[[dict[str, Any]], None], door: Door
) -> None:
    path = rewrite(real_checkpoint, tmp_path / "malformed.pt", change, rehash=True)
    refuse(door, path, CheckpointCorruptError)


# -- checkpoints that do not fit ----------------------------------------------------------------------------------


class Net(nn.Module):
    """TinyNet's layout with a chosen hidden size and one optional extra layer."""

    def __init__(self, hidden: int = 8, extra: str | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        if extra is not None:
            self.add_module(extra, nn.Linear(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize("door", ["trainer", "load_checkpoint"])
def test_a_model_that_does_not_fit_names_every_mismatch(tmp_path: Path, door: Door) -> None:
    path = save_real_checkpoint(tmp_path / "saved", Net(hidden=8, extra="aux"))
    err = refuse(door, path, CheckpointIncompatibleError, net=Net(hidden=16, extra="head"))
    message = str(err)
    for name in ["layers.0.weight", "layers.0.bias", "layers.2.weight"]:  # other shapes
        assert f"'{name}'" in message, f"shape mismatch {name} not named: {message}"
    for name in ["head.weight", "head.bias"]:  # missing from the checkpoint
        assert f"'{name}'" in message, f"missing {name} not named: {message}"
    for name in ["aux.weight", "aux.bias"]:  # in the checkpoint, not in the model
        assert f"'{name}'" in message, f"unexpected {name} not named: {message}"
    assert "'layers.2.bias'" not in message, "a weight that fits is not a mismatch"
    assert "(8, 4)" in message and "(16, 4)" in message, "both shapes are given"


def test_non_strict_loading_skips_missing_and_unexpected_names(tmp_path: Path) -> None:
    path = save_real_checkpoint(tmp_path / "saved", Net(extra="aux"))
    net = Net(extra="head")
    head_before = params_of(net.head)
    make_trainer(net, load_path=str(path), load_strict_model_weights=False, load_weights_only=True)
    saved = torch.load(path, weights_only=True)["state"]["model"]
    for name, value in params_of(net.layers).items():
        assert torch.equal(value, saved[f"layers.{name}"]), f"layers.{name} was not loaded"
    assert same_weights(params_of(net.head), head_before), "a name the checkpoint lacks keeps its weights"


def test_non_strict_loading_still_refuses_other_shapes(tmp_path: Path) -> None:
    path = save_real_checkpoint(tmp_path / "saved", Net(hidden=8, extra="aux"))
    err = refuse(
        "trainer",
        path,
        CheckpointIncompatibleError,
        net=Net(hidden=16, extra="head"),
        load_strict_model_weights=False,
        load_weights_only=True,
    )
    message = str(err)
    for name in ["layers.0.weight", "layers.0.bias", "layers.2.weight"]:
        assert f"'{name}'" in message
    for name in ["head.weight", "aux.weight"]:
        assert f"'{name}'" not in message, "non-strict loading does not complain about names on one side only"


def sgd_for(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1)


@pytest.mark.parametrize("door", ["trainer", "load_checkpoint"])
def test_another_optimizer_class_is_incompatible_and_names_both(real_checkpoint: Path, door: Door) -> None:
    net = TinyNet()
    err = refuse(door, real_checkpoint, CheckpointIncompatibleError, net=net, optimizers=sgd_for(net))
    assert "AdamW" in str(err) and "SGD" in str(err)


def test_ignoring_the_optimizers_lets_another_optimizer_load(real_checkpoint: Path) -> None:
    net = TinyNet()
    trainer = make_trainer(
        net, load_path=str(real_checkpoint), optimizers=sgd_for(net), load_ignore_keys=["state/optimizers"]
    )
    saved = torch.load(real_checkpoint, weights_only=True)["state"]
    assert same_weights(params_of(net), dict(saved["model"]))
    assert trainer.state.timestamp.batch == saved["timestamp"]["batch"] == 2
    assert trainer.state.optimizers[0].state_dict()["state"] == {}, "the SGD optimizer starts fresh"


# -- saving arguments ---------------------------------------------------------------------------------------------


def test_saving_into_a_folder_with_this_runs_checkpoints_refuses_to_start(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_real_checkpoint(folder)
    net = TinyNet()
    before = params_of(net)
    recorder = EventRecorder()
    second = make_trainer(net, save_folder=str(folder), callbacks=recorder)  # constructing is fine
    with pytest.raises(FileExistsError) as info:
        second.fit()
    assert str(folder) in str(info.value) and "save_overwrite=True" in str(info.value)
    assert "autoresume" in str(info.value)
    assert recorder.count(Event.FIT_START) == 1 and recorder.count(Event.BATCH_START) == 0
    assert same_weights(params_of(net), before), "no step ran"
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba2-rank0.pt", "latest-rank0.pt"]


def test_autoresume_may_continue_in_a_folder_with_this_runs_checkpoints(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    save_real_checkpoint(folder)
    trainer = make_trainer(TinyNet(), save_folder=str(folder), autoresume=True, run_name="again", max_duration="3ba")
    trainer.fit()
    assert trainer.state.timestamp.batch == 3
    assert trainer.saved_checkpoints == [str(folder / "ep0-ba3-rank0.pt")]


def test_save_overwrite_true_may_reuse_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    first = save_real_checkpoint(folder)
    trainer = make_trainer(TinyNet(), save_folder=str(folder), save_overwrite=True)
    trainer.fit()
    assert trainer.saved_checkpoints == [str(first)]
    read_checkpoint(str(first))


@pytest.mark.parametrize(
    ("argument", "name", "unknown"),
    [
        ("save_filename", "ep{epoch}-{step}.pt", "{step}"),
        ("save_latest_filename", "latest-{bogus}.pt", "{bogus}"),
        ("save_folder", "{x}", "{x}"),
    ],
)
def test_an_unknown_format_variable_is_refused_at_construction(
    tmp_path: Path, argument: str, name: str, unknown: str
) -> None:
    kwargs: dict[str, Any] = {"save_folder": str(tmp_path / "ckpt")}
    kwargs[argument] = str(tmp_path / name) if argument == "save_folder" else name
    with pytest.raises(ValueError, match=re.escape(f"unknown variable {unknown}")):
        make_trainer(TinyNet(), **kwargs)
    assert not (tmp_path / "ckpt").exists(), "nothing was written"


@pytest.mark.parametrize("interval", ["10 batches", "-1ba", "ep", "", "every epoch", "5"])
def test_a_bad_save_interval_string_names_the_accepted_forms(tmp_path: Path, interval: str) -> None:
    with pytest.raises(ValueError) as info:
        make_trainer(TinyNet(), save_folder=str(tmp_path), save_interval=interval)
    message = str(info.value)
    assert f"save_interval={interval!r}" in message
    for form in ["ep", "ba", "'500ba'", "'30m'"]:
        assert form in message, f"{form} missing from: {message}"


def test_a_zero_save_interval_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        make_trainer(TinyNet(), save_folder=str(tmp_path), save_interval="0ba")


# -- what cairn writes is plain data ------------------------------------------------------------------------------


class LossHistory(Callback):
    """A callback whose state is a mix of plain types and tensors."""

    def __init__(self) -> None:
        self.batches = 0
        self.losses: list[float] = []
        self.last = torch.zeros(3)

    def batch_end(self, state: State, logger: Logger) -> None:
        self.batches += 1
        self.losses.append(float(state.loss.detach()) if state.loss is not None else 0.0)
        self.last = torch.full((3,), float(self.batches))

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "losses": list(self.losses), "last": self.last, "nested": {"ok": (1, "a")}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches, self.losses, self.last = state["batches"], list(state["losses"]), state["last"]


def _full(net: nn.Module) -> dict[str, Any]:
    return {}


def _weights_only(net: nn.Module) -> dict[str, Any]:
    return {"save_weights_only": True}


def _amp_fp16(net: nn.Module) -> dict[str, Any]:
    return {"precision": "amp_fp16", "device": "cpu"}


def _scheduler(net: nn.Module) -> dict[str, Any]:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    return {"optimizers": optimizer, "schedulers": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)}


def _callback_state(net: nn.Module) -> dict[str, Any]:
    return {"callbacks": LossHistory()}


class StridedState(Callback):
    """State holding tensor views: a one-element slice with stride 3 (contiguous by torch's rule) and a transpose."""

    def state_dict(self) -> dict[str, Any]:
        return {"every_third": torch.arange(10.0)[::3][:1], "transposed": torch.arange(6.0).reshape(2, 3).t()}


def _strided_views(net: nn.Module) -> dict[str, Any]:
    return {"callbacks": StridedState()}


@pytest.mark.parametrize(
    "setup",
    [_full, _weights_only, _amp_fp16, _scheduler, _callback_state, _strided_views],
    ids=["full", "weights-only", "amp_fp16-scaler", "lr-scheduler", "callback-state", "strided-tensor-views"],
)
def test_every_checkpoint_cairn_writes_loads_with_weights_only_torch_load(
    tmp_path: Path, setup: Callable[[nn.Module], dict[str, Any]]
) -> None:
    net = TinyNet()
    trainer = make_trainer(net, save_folder=str(tmp_path), save_interval="1ba", **setup(net))
    trainer.fit()
    assert len(trainer.saved_checkpoints) == 2
    for path in trainer.saved_checkpoints:
        state = torch.load(path, weights_only=True)["state"]  # no safe-globals list, no weights_only=False
        assert isinstance(state["metadata"]["content_hash"], str)
        if setup is _weights_only:
            assert set(state) == {"model", "metadata"}
        else:
            assert list(state)[:6] == ["model", "optimizers", "schedulers", "algorithms", "callbacks", "scaler"]
        read_checkpoint(path)
    last = torch.load(trainer.saved_checkpoints[-1], weights_only=True)["state"]
    assert same_weights(last["model"], params_of(net))
    if setup is _amp_fp16:
        assert last["scaler"]["scale"] > 0
    if setup is _scheduler:
        assert last["schedulers"]["StepLR"]["last_epoch"] == 2
    if setup is _callback_state:
        assert last["callbacks"]["LossHistory"]["batches"] == 2
        assert torch.equal(last["callbacks"]["LossHistory"]["last"], torch.full((3,), 2.0))
    if setup is _strided_views:
        assert torch.equal(last["callbacks"]["StridedState"]["every_third"], torch.tensor([0.0]))
