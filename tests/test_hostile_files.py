"""A hostile or broken file costs bounded time and memory, and never leaks anything.

Each file here is small and built to make a reader spend: a memo-reference bomb that unfolds to 2^40 leaves, a
``bytearray(n)`` that allocates gigabytes from a few bytes, a stride-0 tensor that poses 4 bytes as a GiB, a chain
of ``_codecs.encode`` that doubles at every step, a zip carrying records the checkpoint never uses. Each is read in
a subprocess under an address-space limit and a timeout, so a regression fails the test instead of the machine;
each must be refused with a CairnError in seconds, with little memory. And a checkpoint verifies in every process,
whatever its ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.format import content_hash
from cairn.checkpoint.save.content import seal
from cairn.core import Callback
from cairn.errors import CheckpointCorruptError
from cairn.models import Classifier
from conftest import TinyNet, make_loader

GIB = 1 << 30

_READER = textwrap.dedent(
    """
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
    from cairn.checkpoint import read_checkpoint
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        read_checkpoint(sys.argv[1])
        outcome = ["loaded", ""]
    except BaseException as err:
        outcome = [type(err).__name__, str(err)]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps(outcome + [time.perf_counter() - start, grown]))
    """
)


def read_elsewhere(path: Path, *, address_space: int = 4 * GIB, seed: str = "0") -> tuple[str, str, float, int]:
    """``read_checkpoint(path)`` in a fresh process: (error class or "loaded", message, seconds, RSS growth)."""
    env = {**os.environ, "PYTHONHASHSEED": seed}
    done = subprocess.run(
        [sys.executable, "-c", _READER, str(path), str(address_space)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    kind, message, seconds, grown = json.loads(done.stdout.strip().splitlines()[-1])
    return kind, message, seconds, grown


def refused_cheaply(path: Path, *, expected: str = "CheckpointCorruptError") -> str:
    kind, message, seconds, grown = read_elsewhere(path)
    assert kind == expected, f"{kind}: {message}"
    assert seconds < 5, f"refusing took {seconds:.1f} s"
    assert grown < 256 << 20, f"refusing grew the reader by {grown >> 20} MiB"
    assert str(path) in message and "\n" not in message
    if expected == "CheckpointCorruptError":
        assert "refused before reading it" in message, message  # by cairn's checks, not by torch running out
    return message


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A genuine checkpoint of a short run, as a dict a test can plant things in."""
    folder = tmp_path_factory.mktemp("genuine")
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="2ba",
        progress_bar=False,
        seed=1,
        save_folder=str(folder),
        save_filename="c.pt",
    )
    trainer.fit()
    trainer.close()
    return torch.load(folder / "c.pt", weights_only=True)


def planted(original: dict[str, Any], value: object, target: Path, *, sealed: bool = False) -> Path:
    """The genuine checkpoint with ``value`` as a callback's state, saved by plain ``torch.save``."""
    checkpoint = {**original, "state": {**original["state"], "callbacks": {"Planted": {"value": value}}}}
    checkpoint["state"]["metadata"] = {**original["state"]["metadata"], "content_hash": "xxh3-128:0"}
    if sealed:
        seal(checkpoint)
    torch.save(checkpoint, target)
    return target


class Reduces:
    """Pickles as ``func(*args)``: how a hostile file asks torch's safe unpickler to call an allowed function."""

    def __init__(self, func: Callable[..., object], *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return self.func, self.args


# -- item 4: the hash is a function of the data alone -------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from cairn.checkpoint.save.content import seal
    checkpoint = torch.load(sys.argv[1], weights_only=True)
    checkpoint["state"]["callbacks"] = {"Sets": {
        "five": {"alpha", "beta", "gamma", "delta", "epsilon"},
        "eight": {f"name-{i}" for i in range(8)},
        "tuples": {("a", 1), ("b", 2), ("c", 3)},
        "mixed": {1, "one", 2.5, None, (1, "x")},
        "keys": {1: "int", (1, "t"): "tuple", 2.5: "float", None: "none", True: "bool"},
        "leaves": [float("nan"), -0.0, 1 + 2j, b"bytes", bytearray(b"array"), torch.float16, torch.device("cpu")],
    }}
    torch.save(seal(checkpoint), sys.argv[2])
    """
)


@pytest.mark.slow
def test_a_checkpoint_holding_sets_verifies_whatever_the_hash_seed(original: dict[str, Any], tmp_path: Path) -> None:
    """Sets iterate in an order that changes with PYTHONHASHSEED; the hash must not."""
    source = tmp_path / "source.pt"
    torch.save(original, source)
    written = tmp_path / "sets.pt"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run([sys.executable, "-c", _WRITER, str(source), str(written)], check=True, env=env, timeout=60)
    for seed in ("1", "2"):
        kind, message, _, _ = read_elsewhere(written, seed=seed)
        assert kind == "loaded", f"PYTHONHASHSEED={seed}: {message}"


def test_the_hash_of_an_ordinary_checkpoint_is_unchanged() -> None:
    """Files written before the hash learned sets still verify: for plain data the bytes hashed are the same."""
    checkpoint = {
        "state": {
            "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(0)},
            "optimizers": {"SGD": {"state": {0: {"m": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "p": [0, 1]}]}},
            "run_name": "run",
            "timestamp": {"batch": 3, "nested": (1, 2.5, None, True, [], {}, ())},
            "metadata": {"content_hash": "ignored"},
        },
        "rng": [{"torch": torch.arange(4, dtype=torch.uint8)}],
    }
    assert content_hash(checkpoint) == "xxh3-128:734a04aef69b591e27d4f4502fa01f7b"


# -- item 7: memo references cannot make a small file a huge tree -------------------------------------------------


def test_a_memo_reference_bomb_is_refused_in_linear_time(original: dict[str, Any], tmp_path: Path) -> None:
    bomb: list[Any] = []
    for _ in range(40):
        bomb = [bomb, bomb]  # pickled once per level: 2^40 leaves as a tree
    path = planted(original, bomb, tmp_path / "bomb.pt")
    assert path.stat().st_size < 100_000
    assert "several places" in refused_cheaply(path)


def test_nesting_deeper_than_any_state_is_refused_not_a_recursion_error(
    original: dict[str, Any], tmp_path: Path
) -> None:
    deep: list[Any] = []
    for _ in range(3000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickle recurses while writing; torch's safe unpickler reads it without
    try:
        path = planted(original, deep, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    kind, message, seconds, _ = read_elsewhere(path)
    assert kind == "CheckpointCorruptError" and seconds < 5
    assert "more than 200 deep" in message and "recursion" not in message.lower()


# -- item 8: a tensor view is a plain view of bytes that are in the file ------------------------------------------


@pytest.mark.parametrize(
    "view",
    [lambda: torch.zeros(1).expand(2**28), lambda: torch.zeros(1, 1).expand(2**14, 2**14)],
    ids=["1-D", "2-D"],
)
def test_a_stride_zero_tensor_is_refused_before_it_is_expanded(
    original: dict[str, Any], tmp_path: Path, view: Callable[[], torch.Tensor]
) -> None:
    path = planted(original, view(), tmp_path / "stride0.pt")
    assert path.stat().st_size < 100_000  # 4 bytes of storage, posing as 1 GiB
    assert "overlapping strides" in refused_cheaply(path)


class HoldsAnExpandedTensor(Callback):
    def state_dict(self) -> dict[str, Any]:
        return {"expanded": torch.arange(3.0).expand(4, 3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loaded = state


def test_an_expanded_tensor_in_state_is_saved_dense_and_loads(tmp_path: Path) -> None:
    """What a loader refuses, the writer never writes: an expanded tensor in a run's state is saved as a copy."""
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="1ba",
        progress_bar=False,
        callbacks=[HoldsAnExpandedTensor()],
        save_folder=str(tmp_path),
        save_filename="c.pt",
    )
    trainer.fit()
    trainer.close()
    saved = read_checkpoint(str(tmp_path / "c.pt"))["state"]["callbacks"]["HoldsAnExpandedTensor"]["expanded"]
    assert torch.equal(saved, torch.arange(3.0).expand(4, 3))


# -- item 9: allowed functions cannot be made to allocate ----------------------------------------------------------


@pytest.mark.parametrize("size", [int(2.3 * GIB), 64 * GIB], ids=["2.3GiB", "64GiB"])
def test_a_bytearray_of_a_declared_size_is_refused_before_allocation(
    original: dict[str, Any], tmp_path: Path, size: int
) -> None:
    path = planted(original, Reduces(bytearray, size), tmp_path / "bytearray.pt")
    assert path.stat().st_size < 100_000
    assert "bytearray" in refused_cheaply(path)


def test_a_chain_of_encodes_that_doubles_each_step_is_refused(original: dict[str, Any], tmp_path: Path) -> None:
    grown: object = Reduces(codecs.encode, "x" * 64, "latin1")
    for _ in range(30):
        grown = Reduces(codecs.encode, grown, "hex")  # 64 bytes * 2^30
    path = planted(original, grown, tmp_path / "hex.pt")
    assert "_codecs.encode" in refused_cheaply(path)


def test_a_torch_constructor_asked_for_a_huge_size_is_refused(original: dict[str, Any], tmp_path: Path) -> None:
    path = planted(original, Reduces(torch.FloatTensor, 2**34), tmp_path / "legacy_ctor.pt")
    refused_cheaply(path, expected="UnsafeCheckpointError")


def test_an_old_style_file_declaring_a_storage_larger_than_itself_is_refused(
    original: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "old.pt"
    torch.save({"state": {"model": {"w": torch.zeros(1234)}}}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    declared = b"M" + (1234).to_bytes(2, "little")  # BININT2 1234: the storage's element count, then the size
    assert data.count(declared) == 2
    path.write_bytes(data.replace(declared, b"J" + (2**31 - 1).to_bytes(4, "little"), 1))
    assert "more than the whole file" in refused_cheaply(path)


# -- item 12: an archive holds exactly what the checkpoint refers to ----------------------------------------------


def _rewrite(source: Path, target: Path, change: Callable[[str, bytes], list[tuple[str, bytes]]]) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for record in old.infolist():
            for name, data in change(record.filename, old.read(record)):
                new.writestr(zipfile.ZipInfo(name), data)
    return target


@pytest.fixture
def genuine_file(original: dict[str, Any], tmp_path: Path) -> Path:
    path = planted(original, 1, tmp_path / "genuine.pt", sealed=True)
    assert read_checkpoint(str(path))["state"]["callbacks"]["Planted"] == {"value": 1}
    return path


def _first_storage(name: str) -> bool:
    return name.endswith("/data/0")


CHANGES: dict[str, Callable[[str, bytes], list[tuple[str, bytes]]]] = {
    "a shell script": lambda n, d: [(n, d)] + ([(n.replace("data.pkl", "run.sh"), b"#!/bin/sh\n")] if n.endswith(
        "data.pkl") else []),
    "a spare tensor": lambda n, d: [(n, d)] + ([(n.replace("data/0", "data/999"), d)] if _first_storage(n) else []),
    "a record in another folder": lambda n, d: [(n, d)] + ([("elsewhere/x", b"x")] if _first_storage(n) else []),
    "a short storage": lambda n, d: [(n, d[:-4] if _first_storage(n) else d)],
    "a long storage": lambda n, d: [(n, d + bytes(4) if _first_storage(n) else d)],
    "a missing storage": lambda n, d: [] if _first_storage(n) else [(n, d)],
    "one name twice": lambda n, d: [(n, d)] * (2 if _first_storage(n) else 1),
}


def test_a_rewritten_archive_with_nothing_changed_still_loads(genuine_file: Path, tmp_path: Path) -> None:
    """The control for the cases below: rewriting the records by themselves is not what they catch."""
    read_checkpoint(str(_rewrite(genuine_file, tmp_path / "same.pt", lambda n, d: [(n, d)])))


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the "one name twice" archive is made on purpose
@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_an_archive_with_records_the_checkpoint_does_not_describe_is_refused(
    genuine_file: Path, tmp_path: Path, change: str
) -> None:
    path = _rewrite(genuine_file, tmp_path / "changed.pt", CHANGES[change])
    with pytest.raises(Exception) as info:
        read_checkpoint(str(path))
    assert type(info.value).__name__ == "CheckpointCorruptError", info.value
    assert "archive" in str(info.value) and "content hash" not in str(info.value)


@pytest.mark.parametrize("declared", [2**40, 2**62])
def test_an_operand_that_declares_more_bytes_than_the_file_holds_is_refused(tmp_path: Path, declared: int) -> None:
    """A 14-byte old-style pickle whose BINBYTES8 claims ``declared`` bytes: reading the operand as declared
    allocated that much first (a raw MemoryError, or worse where memory is overcommitted)."""
    import struct

    path = tmp_path / "c.pt"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", declared) + b"abc")
    with pytest.raises(CheckpointCorruptError, match="bytes8"):
        read_checkpoint(str(path))
