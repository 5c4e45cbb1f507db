"""``cairn ckpt`` on incremental checkpoints (a manifest, and its tensors' chunks in the saver's ``.cairn-chunks``):
``ls`` and ``show`` tell each one's own and shared bytes, ``verify`` checks every chunk and names a missing or
damaged one, ``convert --to single-file`` makes a copy that needs no chunk folder, and ``diff`` finds nothing
between a manifest and a full checkpoint of the same state.

The checkpoints come from a real run (``save_incremental=True``) of a model whose ``table`` buffer never changes
(so both saves name its chunk: shared bytes) while ``wide`` and its AdamW moments change every epoch (own bytes).
The commands run in this process through :func:`cairn.cli.main.main`, as ``tests/test_remote_sharded_cli.py``
runs them; one test runs the installed console script to check the exit status a shell sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.format import content_hash
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.cli.main import main as cairn_main
from cairn.models import Classifier
from cairn.names import CHUNK_FOLDER
from cairn.storage.s3 import S3ObjectStore
from conftest import make_loader

EP1, EP2 = "ep1-ba2-rank0.pt", "ep2-ba4-rank0.pt"


class _FrozenTable(nn.Module):
    """``wide`` (64 KiB, chunked) trains; ``table`` (128 KiB, chunked) never changes; ``out`` stays inline."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(4, 4096)
        self.out = nn.Linear(4096, 3)
        self.register_buffer("table", torch.randn(128, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.wide(x)))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two incremental checkpoints (ep1, ep2) sharing the ``table`` chunk. Tests that damage it work
    on a copy (:func:`run_copy`)."""
    folder = tmp_path_factory.mktemp("incremental") / "run"
    torch.manual_seed(0)
    Trainer(
        model=Classifier(_FrozenTable(), num_classes=3),
        train_dataloader=make_loader(n=16),
        max_duration="2ep",
        seed=3,
        run_name="inc",
        save_folder=str(folder),
        save_incremental=True,
        progress_bar=False,
    ).fit()
    assert sorted(os.listdir(folder / CHUNK_FOLDER)) != []
    return folder


@pytest.fixture
def run_copy(saved_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy, symlinks=True)
    return copy


def _ckpt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cairn_main(["ckpt", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _chunks_named(manifest: Path) -> dict[str, int]:
    """The chunks a manifest names, read straight from the file (not through cairn's reader)."""
    loaded = torch.load(manifest, map_location="cpu", weights_only=True)
    return {key: size for tensor in loaded["chunks"]["tensors"] for key, size in tensor["chunks"]}


def _expected_sizes(folder: Path, name: str, other: str) -> tuple[int, int]:
    """Own and shared bytes of ``name``, whose only fellow manifest in ``folder`` is ``other``."""
    mine, theirs = _chunks_named(folder / name), _chunks_named(folder / other)
    shared = sum(size for key, size in mine.items() if key in theirs)
    own = os.path.getsize(folder / name) + sum(size for key, size in mine.items() if key not in theirs)
    return own, shared


def _same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# -- ls -------------------------------------------------------------------------------------------------------


def test_ls_reports_each_manifests_own_and_shared_bytes(run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full = run_copy / "whole.pt"
    assert _ckpt(capsys, "convert", str(run_copy / EP1), "--to", "single-file", str(full))[0] == 0

    code, out, err = _ckpt(capsys, "ls", "--json", str(run_copy))

    assert code == 0, err
    listed = {entry["name"]: entry for entry in json.loads(out)["checkpoints"]}
    assert sorted(listed) == sorted([EP1, EP2, "whole.pt"])  # no chunk is listed as a checkpoint
    for name, other in ((EP1, EP2), (EP2, EP1)):
        own, shared = _expected_sizes(run_copy, name, other)
        entry = listed[name]
        assert entry["incremental"] is True
        assert entry["kind"] == "full"
        assert entry["size_bytes"] == os.path.getsize(run_copy / name)  # the manifest on disk
        assert (entry["own_bytes"], entry["shared_bytes"]) == (own, shared)
        assert shared == 128 * 256 * 4  # the unchanged table, named by both
        assert own > entry["size_bytes"]  # the changed tensors' chunks are this one's own
    assert listed["whole.pt"]["incremental"] is False
    assert listed["whole.pt"]["own_bytes"] == listed["whole.pt"]["size_bytes"] == os.path.getsize(full)
    assert listed["whole.pt"]["shared_bytes"] == 0

    code, out, _ = _ckpt(capsys, "ls", str(run_copy))
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split()[:5] == ["CREATED", "SIZE", "OWN", "SHARED", "EPOCH"]
    assert any(EP2 in row and "full, inc" in row for row in rows)


def test_a_chunk_only_one_manifest_names_becomes_shared_when_another_names_it(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A copy of a manifest (under another name, as a second saver in the folder would write) names every chunk
    the original names: nothing of either is its own but the manifest file itself."""
    shutil.copyfile(run_copy / EP2, run_copy / "copy-of-ep2.pt")

    code, out, err = _ckpt(capsys, "ls", "--json", str(run_copy / EP2))

    assert code == 0, err
    (entry,) = json.loads(out)["checkpoints"]
    assert entry["shared_bytes"] == sum(_chunks_named(run_copy / EP2).values())
    assert entry["own_bytes"] == os.path.getsize(run_copy / EP2)


def test_ls_of_a_store_lists_manifests_and_says_what_their_chunks_hold(
    saved_run: Path, s3_env: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store's listing reads no manifest: own and shared bytes are unknown (null), the chunk folder is told in a
    note, and its chunks are never listed as checkpoints nor counted as stray objects."""
    _upload_run(saved_run, S3ObjectStore(s3_bucket, endpoint_url=s3_env))
    uri = f"s3://{s3_bucket}/run/"

    for recursive in ((), ("-r",)):
        code, out, err = _ckpt(capsys, "ls", "--json", *recursive, uri)
        assert code == 0, err
        listing = json.loads(out)
        assert sorted(entry["name"] for entry in listing["checkpoints"]) == [EP1, EP2]
        for entry in listing["checkpoints"]:
            assert (entry["incremental"], entry["own_bytes"], entry["shared_bytes"]) == (None, None, None)
        chunks = [name for name in os.listdir(saved_run / CHUNK_FOLDER) if len(name) == 32]
        (note,) = [note for note in listing["notes"] if CHUNK_FOLDER in note]
        assert f"s3://{s3_bucket}/run/{CHUNK_FOLDER}/ holds {len(chunks)} chunk(s)" in note
        assert not any("other object" in note for note in listing["notes"])

    code, out, err = _ckpt(capsys, "ls", uri)
    assert code == 0
    assert "OWN" not in out  # nothing known to show in those columns
    assert f"holds {len(chunks)} chunk(s)" in err


# -- show -----------------------------------------------------------------------------------------------------


def test_show_says_incremental_its_chunks_and_own_and_shared_bytes(
    saved_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = saved_run / EP2
    chunks = _chunks_named(manifest)
    own, shared = _expected_sizes(saved_run, EP2, EP1)

    code, out, err = _ckpt(capsys, "show", "--json", str(manifest))

    assert code == 0, err
    shown = json.loads(out)
    assert shown["kind"] == "full"
    assert shown["incremental"] == {
        "chunk_folder": str(saved_run / CHUNK_FOLDER),
        "chunks": len(chunks),
        "chunk_bytes": sum(chunks.values()),
        "manifest_bytes": os.path.getsize(manifest),
        "own_bytes": own,
        "shared_bytes": shared,
        "shared_chunks": 1,
    }
    loaded = torch.load(manifest, map_location="cpu", weights_only=True)
    assert shown["hash"]["value"] == loaded["state"]["metadata"]["content_hash"]  # the manifest's own hash
    assert shown["hash"]["chunks"] == len(chunks)  # every chunk read and checked

    code, out, _ = _ckpt(capsys, "show", str(manifest))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "incremental" in lines["kind"]
    assert f"{len(chunks)} chunks" in lines["chunks"] and str(saved_run / CHUNK_FOLDER) in lines["chunks"]
    assert "own" in lines["size"] and "shared 128 KiB" in lines["size"]
    assert f"each of its {len(chunks)} chunks checked against its key" in lines["hash"]


def test_show_of_a_full_checkpoint_says_nothing_of_chunks(
    saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "whole.pt"
    assert _ckpt(capsys, "convert", str(saved_run / EP2), "--to", "single-file", str(full))[0] == 0

    code, out, _ = _ckpt(capsys, "show", "--json", str(full))

    assert code == 0
    shown = json.loads(out)
    assert shown["incremental"] is None
    assert shown["hash"]["chunks"] == 0


# -- verify ---------------------------------------------------------------------------------------------------


def test_verify_checks_every_chunk_and_says_how_many(saved_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _ckpt(capsys, "verify", str(saved_run))

    assert code == 0, out + err
    for name in (EP1, EP2):
        (line,) = [line for line in out.splitlines() if name in line]
        assert line.startswith("OK")
        assert f"incremental: {len(_chunks_named(saved_run / name))} chunks checked" in line
    total = sum(len(_chunks_named(saved_run / name)) for name in (EP1, EP2))
    assert f"2 of 2 intact ({total} chunks checked)" in err


def test_verify_fails_a_manifest_whose_chunk_is_missing_naming_the_chunk(run_copy: Path) -> None:
    """Run as a shell runs it: the installed script, its exit status."""
    table = next(key for key in _chunks_named(run_copy / EP1) if key in _chunks_named(run_copy / EP2))
    (run_copy / CHUNK_FOLDER / table).unlink()
    script = str(Path(sys.executable).parent / "cairn")

    result = subprocess.run(
        [script, "ckpt", "verify", str(run_copy / EP2)], capture_output=True, text=True, timeout=120, check=False
    )

    assert result.returncode == 1
    assert result.stdout.startswith("FAILED")
    assert f"chunk {table}" in result.stdout and "is missing" in result.stdout


def test_verify_fails_a_manifest_whose_chunk_is_damaged_naming_the_chunk(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = next(key for key in _chunks_named(run_copy / EP2) if key not in _chunks_named(run_copy / EP1))
    with open(run_copy / CHUNK_FOLDER / own, "r+b") as file:
        file.seek(100)
        byte = file.read(1)
        file.seek(100)
        file.write(bytes([byte[0] ^ 0x01]))

    code, out, _ = _ckpt(capsys, "verify", str(run_copy))

    assert code == 1
    (failed,) = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert EP2 in failed and f"chunk {own}" in failed and "does not match its key" in failed
    assert any(line.startswith("OK") and EP1 in line for line in out.splitlines())  # the other one is intact


# -- convert --------------------------------------------------------------------------------------------------


def test_convert_to_single_file_makes_a_self_contained_ordinary_checkpoint(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = run_copy / EP2
    original = read_checkpoint(str(manifest))
    out = tmp_path / "out" / "whole.pt"

    code, said, err = _ckpt(capsys, "convert", str(manifest), "--to", "single-file", str(out))

    assert code == 0, err
    assert said.strip() == str(out)
    shutil.rmtree(run_copy / CHUNK_FOLDER)  # no chunk folder anywhere now
    plain = torch.load(out, map_location="cpu", weights_only=True)  # an ordinary archive, tensors inside
    assert "chunks" not in plain
    metadata = plain["state"]["metadata"]
    assert "incremental" not in metadata
    manifest_hash = torch.load(manifest, map_location="cpu", weights_only=True)["state"]["metadata"]["content_hash"]
    assert metadata["content_hash"] != manifest_hash
    assert metadata["content_hash"] == content_hash(plain)  # a fresh hash, over the whole data
    assert _same_tensors(plain["state"]["model"], original["state"]["model"])
    whole = read_checkpoint(str(out))
    assert _same_tensors(whole["state"]["model"], original["state"]["model"])
    assert torch.equal(whole["state"]["model"]["table"], original["state"]["model"]["table"])
    moments = whole["state"]["optimizers"]["AdamW"]["state"]
    assert all(_same_tensors(moments[p], original["state"]["optimizers"]["AdamW"]["state"][p]) for p in moments)

    code, _, err = _ckpt(capsys, "verify", str(out))
    assert code == 0, err
    code, listed, _ = _ckpt(capsys, "ls", "--json", str(manifest))
    (entry,) = json.loads(listed)["checkpoints"]
    assert (entry["incremental"], entry["own_bytes"], entry["shared_bytes"]) == (True, None, None)  # unknowable now


def test_convert_a_manifest_to_a_sharded_folder_and_to_safetensors(
    saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from cairn.checkpoint.load.sharded import read_whole_shards

    manifest = saved_run / EP2
    model = read_checkpoint(str(manifest))["state"]["model"]

    code, _, err = _ckpt(capsys, "convert", str(manifest), "--to", "sharded", str(tmp_path / "sharded"))
    assert code == 0, err
    assert _same_tensors(read_whole_shards(str(tmp_path / "sharded"))["model"], model)

    code, _, err = _ckpt(capsys, "convert", str(manifest), "--to", "safetensors", str(tmp_path / "m.safetensors"))
    assert code == 0, err
    assert _same_tensors(load_file(str(tmp_path / "m.safetensors")), model)


def test_convert_of_a_manifest_missing_a_chunk_writes_nothing(
    run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for chunk in (run_copy / CHUNK_FOLDER).iterdir():
        if len(chunk.name) == 32:
            chunk.unlink()
    out = tmp_path / "whole.pt"

    code, _, err = _ckpt(capsys, "convert", str(run_copy / EP2), "--to", "single-file", str(out))

    assert code == 1
    assert "is missing" in err
    assert not out.exists()


# -- diff -----------------------------------------------------------------------------------------------------


def test_diff_finds_nothing_between_a_manifest_and_a_full_checkpoint_of_the_same_state(
    saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The full one is written by the ordinary writer from the state the manifest stands for: no metadata key of
    the incremental form (its ``incremental`` flag, its hash over the manifest) shows as a difference."""
    manifest = saved_run / EP2
    state = read_checkpoint(str(manifest))
    state["state"]["metadata"].pop("content_hash")
    full = tmp_path / "full.pt"
    write_checkpoint(seal(state), str(full))

    code, out, err = _ckpt(capsys, "diff", str(manifest), str(full))

    assert (code, out, err) == (0, "", "")
    code, out, _ = _ckpt(capsys, "diff", str(saved_run / EP1), str(full))
    assert code == 1 and "wide.weight" in out  # a real difference is still found


# -- in a store -----------------------------------------------------------------------------------------------


def _upload_run(folder: Path, store: S3ObjectStore) -> None:
    """The run as an incremental save leaves it in a store: chunks first, then the manifests, under ``run/``."""
    for chunk in sorted((folder / CHUNK_FOLDER).iterdir()):
        if len(chunk.name) == 32:
            store.upload_object(f"run/{CHUNK_FOLDER}/{chunk.name}", str(chunk))
    for name in (EP1, EP2):
        store.upload_object(f"run/{name}", str(folder / name))


def test_show_verify_and_convert_a_manifest_in_a_store(
    saved_run: Path, s3_env: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    _upload_run(saved_run, store)
    uri = f"s3://{s3_bucket}/run/{EP2}"
    chunks = _chunks_named(saved_run / EP2)

    code, out, err = _ckpt(capsys, "verify", uri)
    assert code == 0, out + err
    assert out.startswith("OK") and f"incremental: {len(chunks)} chunks checked" in out

    code, out, err = _ckpt(capsys, "show", "--json", uri)
    assert code == 0, err
    shown = json.loads(out)["incremental"]
    assert shown["chunk_folder"] == f"s3://{s3_bucket}/run/{CHUNK_FOLDER}"
    assert (shown["chunks"], shown["chunk_bytes"]) == (len(chunks), sum(chunks.values()))
    assert (shown["own_bytes"], shown["shared_bytes"]) == (None, None)  # a store's other manifests are not read

    out_file = tmp_path / "whole.pt"
    code, _, err = _ckpt(capsys, "convert", uri, "--to", "single-file", str(out_file))
    assert code == 0, err
    expected = read_checkpoint(str(saved_run / EP2))["state"]["model"]
    assert _same_tensors(read_checkpoint(str(out_file))["state"]["model"], expected)

    missing = next(iter(chunks))
    store.delete_object(f"run/{CHUNK_FOLDER}/{missing}")
    code, out, _ = _ckpt(capsys, "verify", uri)
    assert code == 1
    assert out.startswith("FAILED") and missing in out
