"""Fuzzing the loader with damaged checkpoints: every mutation is refused with a CairnError (or, when it hit bytes
that carry no meaning, loads exactly the original content); nothing runs, nothing is written, nothing hangs."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.content import content_hash
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
