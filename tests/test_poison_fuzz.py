"""Fuzzing the loader with damaged checkpoints: every mutation is refused with a CairnError (or, when it hit bytes
that carry no meaning, loads exactly the original content); nothing runs, nothing is written, nothing hangs."""

from __future__ import annotations

import copy
import functools
import io
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn import Trainer
from cairn.checkpoint import load_checkpoint, read_checkpoint
from cairn.checkpoint.format import content_hash
from cairn.errors import CairnError
from cairn.models import Classifier
from conftest import TinyNet, make_loader

# Values that make a size or offset field absurd: the largest signed and unsigned 32-bit numbers, and 1 GiB.
HUGE = [b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff", b"\x00\x00\x00\x40"]


@functools.cache
def _original() -> tuple[bytes, str]:
    folder = tempfile.mkdtemp(prefix="cairn-fuzz-")
    torch.manual_seed(0)
    Trainer(
        model=Classifier(TinyNet(hidden=64), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="1ep",
        save_folder=folder,
        save_filename="c.pt",
        progress_bar=False,
    ).fit()
    path = os.path.join(folder, "c.pt")
    return Path(path).read_bytes(), read_checkpoint(path)["state"]["metadata"]["content_hash"]


@pytest.fixture(scope="module", autouse=True)
def _original_built_before_any_draw() -> None:
    """Train the original outside hypothesis's draws: training seeds Python's ``random``, which hypothesis warns
    about when a strategy does it."""
    _original()


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    data = bytearray(_original()[0])
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "huge-number", "tail"]))
    if kind == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
            data[position] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "overwrite":
        position = draw(st.integers(0, len(data) - 1))
        data[position : position + 64] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "huge-number":  # anywhere: sizes and offsets in zip headers, tensor storage sizes
        position = draw(st.integers(0, len(data) - 4))
        data[position : position + 4] = draw(st.sampled_from(HUGE))
    else:  # the zip's end records live in the last bytes: damage them precisely
        position = draw(st.integers(max(0, len(data) - 200), len(data) - 4))
        data[position : position + 4] = draw(st.sampled_from(HUGE))
    return bytes(data)


@pytest.mark.slow
@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged=mutations())
def test_a_damaged_checkpoint_is_refused_or_loads_unchanged(tmp_path: Path, damaged: bytes) -> None:
    folder = tmp_path / "fuzz"
    folder.mkdir(exist_ok=True)
    path = folder / "damaged.pt"
    path.write_bytes(damaged)
    try:
        checkpoint = read_checkpoint(str(path))
    except CairnError:
        pass
    else:  # the mutation hit padding or alignment bytes: what loads must be exactly what was saved
        assert content_hash(checkpoint) == _original()[1]
    assert os.listdir(folder) == ["damaged.pt"], "loading wrote nothing"
    path.unlink()


# -- well-hashed checkpoints with a wrong type in one field ------------------------------------------------------
# The hash vouches for the bytes, not for their sense: someone who rewrites a file can re-hash it. Every field is
# replaced in turn by a value of another type; the loader must refuse it before anything changes, or accept it
# only when training then carries on.

WRONG = [None, True, -3, 2.5, "x", [], {}, [1, "a"], torch.zeros(3), torch.zeros(()), torch.zeros(2, 2)]


def _fields(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every path into the checkpoint, containers included (a whole optimizer can be replaced too)."""
    paths = [path] if path else []
    if isinstance(node, dict):
        children = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    else:
        return paths
    for key, child in children:
        paths += _fields(child, (*path, key))
    return paths


@functools.cache
def _original_content() -> dict:
    return torch.load(io.BytesIO(_original()[0]), weights_only=True)


def _fresh_trainer(**kwargs: object) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet(hidden=64), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="2ep",
        progress_bar=False,
        **kwargs,
    )


@st.composite
def retyped(draw: st.DrawFn) -> tuple[tuple[object, ...], object]:
    paths = [p for p in _fields(_original_content()) if p[-1] != "content_hash"]
    path = draw(st.sampled_from(paths))
    return path, draw(st.sampled_from(WRONG))


@pytest.mark.slow
@settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=retyped())
def test_a_rehashed_checkpoint_with_a_wrong_type_anywhere_is_refused_before_anything_changes(
    tmp_path: Path, change: tuple[tuple[object, ...], object]
) -> None:
    path, value = change
    checkpoint = copy.deepcopy(_original_content())
    parent = functools.reduce(lambda node, key: node[key], path[:-1], checkpoint)
    if type(parent[path[-1]]) is type(value):
        return  # not a change of type
    parent[path[-1]] = value
    if path not in {("state",), ("state", "metadata")}:  # otherwise there is nowhere left to keep a hash
        checkpoint["state"]["metadata"]["content_hash"] = content_hash(checkpoint)
    file = tmp_path / "retyped.pt"
    torch.save(checkpoint, file)
    trainer = _fresh_trainer()
    before = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    try:
        load_checkpoint(str(file), trainer.state)
    except CairnError:
        after = trainer.state.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"refusing {path} changed the weights"
        assert trainer.state.resumed_from is None and trainer.state.timestamp.batch == 0
    else:  # accepted: then it must be harmless, and training goes on
        trainer.fit()
        assert trainer.state.timestamp.epoch == 2
