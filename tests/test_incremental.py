"""Incremental checkpoints on disk: a save writes only the chunks the folder lacks, every checkpoint loads whole and
verified, retention's deletions take their chunks along, and a hostile manifest is refused before anything is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.incremental.files import chunk_folder_of, write_incremental
from cairn.checkpoint.incremental.garbage import collect_garbage, referenced_chunks
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.errors import CheckpointCorruptError
from conftest import frozen_body_trainer, params_of

CHUNKS = ".cairn-chunks"


pytestmark = pytest.mark.usefixtures("small_chunks")


def _trainer(folder: Path | None, max_duration: str = "3ba", *, init_seed: int = 0, **kwargs: Any) -> Trainer:
    if folder is not None:
        kwargs.setdefault("save_folder", str(folder))
        kwargs.setdefault("save_interval", "1ba")
        kwargs.setdefault("save_incremental", True)
    return frozen_body_trainer(max_duration, init_seed=init_seed, **kwargs)


def _entry_of(manifest: dict[str, Any], path: str) -> tuple[str, ...]:
    (entry,) = [entry for entry in manifest["chunks"]["tensors"] if entry["path"] == path]
    return tuple(key for key, _ in entry["chunks"])


def _chunk_files(folder: Path) -> dict[str, int]:
    return chunk_folder_of(str(folder)).keys()


def _manifests(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("ep*.pt") if not p.is_symlink())


def test_a_frozen_body_is_stored_once_and_each_save_adds_only_what_changed(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "3ba")
    trainer.fit()
    manifests = _manifests(tmp_path)
    assert len(manifests) == 3
    body_bytes = 8192 * 4 * 4 + 8192 * 4  # weight and bias of the frozen body
    head_bytes = 3 * 8192 * 4  # the head's weight; its moments are as large, its bias stays in the manifest
    stored = sum(_chunk_files(tmp_path).values())
    assert body_bytes < stored <= body_bytes + 3 * 3 * head_bytes, "the body once; the head and its moments per save"
    named = [referenced_chunks(str(tmp_path))[str(path)] for path in manifests]
    body_chunks = {_entry_of(torch.load(path, weights_only=True), "state/model/body.weight") for path in manifests}
    assert len(body_chunks) == 1, "every save names the very same chunks for the frozen body"
    assert all(set(next(iter(body_chunks))) <= set(chunks) for chunks in named)
    for path in manifests:
        assert path.stat().st_size < 80 << 10, "a manifest holds only the small tensors (the body's 32 KiB bias)"
    assert torch.load(manifests[-1], weights_only=True)["chunks"]["tensors"], "a manifest is plain data"
    loaded = read_checkpoint(str(manifests[-1]))
    assert "chunks" not in loaded and "incremental" not in loaded["state"]["metadata"]
    live = params_of(trainer.state.model.module)
    assert all(torch.equal(loaded["state"]["model"][k], v) for k, v in live.items())


def test_an_incremental_checkpoint_holds_what_a_full_one_holds(tmp_path: Path) -> None:
    from cairn.callbacks import CheckpointSaver

    full = CheckpointSaver(str(tmp_path / "full"), filename="ba{batch}.pt", save_interval="1ba")
    chunked = CheckpointSaver(str(tmp_path / "inc"), filename="ba{batch}.pt", save_interval="1ba", incremental=True)
    background = CheckpointSaver(
        str(tmp_path / "async"), filename="ba{batch}.pt", save_interval="1ba", incremental=True, async_save=True
    )
    _trainer(None, "2ba", callbacks=[full, chunked, background]).fit()
    for batch in (1, 2):
        expected = read_checkpoint(str(tmp_path / "full" / f"ba{batch}.pt"))
        for kind in ("inc", "async"):
            got = read_checkpoint(str(tmp_path / kind / f"ba{batch}.pt"))
            _assert_same_state(got, expected)


def _assert_same_state(got: Any, expected: Any, path: str = "") -> None:
    if path.endswith(("metadata/created_at", "metadata/content_hash")):
        return
    if isinstance(expected, dict):
        assert set(got) == set(expected), path
        for key in expected:
            _assert_same_state(got[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for index, (a, b) in enumerate(zip(got, expected, strict=True)):
            _assert_same_state(a, b, f"{path}/{index}")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected), path
    else:
        assert got == expected, path


@pytest.mark.parametrize("stop_batch", [2, 5])
def test_a_run_resumed_from_an_incremental_checkpoint_ends_bit_for_bit(tmp_path: Path, stop_batch: int) -> None:
    uninterrupted = _trainer(None, "8ba")
    uninterrupted.fit()
    _trainer(tmp_path, f"{stop_batch}ba").fit()  # 4 batches an epoch: 5 stops mid-epoch
    resumed = _trainer(tmp_path, "8ba", init_seed=1, autoresume=True)
    assert resumed.state.timestamp.batch == stop_batch
    resumed.fit()
    expected, got = params_of(uninterrupted.state.model), params_of(resumed.state.model)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_a_manifest_in_a_subfolder_loads_through_the_latest_link_beside_the_chunks(tmp_path: Path) -> None:
    _trainer(tmp_path, "2ba", save_filename="{run_name}/ba{batch}.pt", run_name="r").fit()
    assert (tmp_path / "r" / "ba2.pt").exists() and (tmp_path / CHUNKS).is_dir()
    assert torch.load(tmp_path / "r" / "ba2.pt", weights_only=True)["chunks"]["folder"] == "../.cairn-chunks"
    assert read_checkpoint(str(tmp_path / "latest-rank0.pt"))["state"]["timestamp"]["batch"] == 2
    resumed = _trainer(tmp_path, "3ba", save_filename="{run_name}/ba{batch}.pt", run_name="r", autoresume=True)
    assert resumed.state.timestamp.batch == 2


def test_a_weights_only_incremental_checkpoint_loads_as_weights(tmp_path: Path) -> None:
    _trainer(tmp_path, "1ba", save_weights_only=True).fit()
    (manifest,) = _manifests(tmp_path)
    loaded = read_checkpoint(str(manifest))
    assert set(loaded["state"]) == {"model", "metadata"} and loaded["state"]["metadata"]["weights_only"]
    fresh = _trainer(None, "1ba", init_seed=3, load_path=str(manifest))
    assert torch.equal(fresh.state.model.module.body.weight, loaded["state"]["model"]["body.weight"])


def test_retention_takes_the_chunks_only_the_pruned_checkpoints_named(tmp_path: Path) -> None:
    _trainer(tmp_path, "4ba", save_num_checkpoints_to_keep=2).fit()
    manifests = _manifests(tmp_path)
    assert [p.name for p in manifests] == ["ep0-ba3-rank0.pt", "ep0-ba4-rank0.pt"]
    named = referenced_chunks(str(tmp_path))
    assert set(_chunk_files(tmp_path)) == {key for chunks in named.values() for key in chunks}
    for path in manifests:
        read_checkpoint(str(path))  # every chunk still there, and verified


def test_two_savers_in_one_folder_never_collect_each_others_chunks(tmp_path: Path) -> None:
    from cairn.callbacks import CheckpointSaver

    keeps_all = CheckpointSaver(str(tmp_path), filename="all-ba{batch}.pt", latest_filename=None, incremental=True,
                                save_interval="1ba")  # fmt: skip
    keeps_one = CheckpointSaver(str(tmp_path), filename="one-ba{batch}.pt", latest_filename=None, incremental=True,
                                save_interval="2ba", num_checkpoints_to_keep=1)  # fmt: skip
    _trainer(None, "4ba", callbacks=[keeps_all, keeps_one]).fit()
    assert sorted(p.name for p in tmp_path.glob("one-*.pt")) == ["one-ba4.pt"]
    for path in sorted(tmp_path.glob("*.pt")):
        read_checkpoint(str(path))  # the pruning saver's collections left every chunk of the other's


def test_a_damaged_chunk_of_the_latest_checkpoint_sends_autoresume_to_the_one_before(tmp_path: Path) -> None:
    _trainer(tmp_path, "2ba").fit()
    latest = tmp_path / "ep0-ba2-rank0.pt"
    before = set(referenced_chunks(str(tmp_path))[str(tmp_path / "ep0-ba1-rank0.pt")])
    own = sorted(set(referenced_chunks(str(tmp_path))[str(latest)]) - before)
    chunk = tmp_path / CHUNKS / own[0]
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=f"chunk {own[0]}.*does not match its key"):
        read_checkpoint(str(latest))
    resumed = _trainer(tmp_path, "3ba", autoresume=True)
    assert resumed.state.timestamp.batch == 1


# -- collection ------------------------------------------------------------------------------------------------------


def test_collection_removes_chunks_of_a_save_that_never_published_its_manifest(tmp_path: Path) -> None:
    _trainer(tmp_path, "1ba").fit()
    kept = _chunk_files(tmp_path)
    orphan = tmp_path / CHUNKS / ("ab" * 16)
    orphan.write_bytes(b"left by a save killed before its manifest")
    assert collect_garbage(str(tmp_path)) == 1
    assert _chunk_files(tmp_path) == kept


def test_collection_waits_while_a_save_holds_the_chunk_folder(tmp_path: Path) -> None:
    _trainer(tmp_path, "1ba").fit()
    orphan = tmp_path / CHUNKS / ("cd" * 16)
    orphan.write_bytes(b"a chunk another save wrote and is about to name")
    with chunk_folder_of(str(tmp_path)).saving():
        assert collect_garbage(str(tmp_path)) is None
    assert orphan.exists()


def test_collection_keeps_every_chunk_while_a_possible_manifest_cannot_be_read(tmp_path: Path, caplog) -> None:
    _trainer(tmp_path, "1ba").fit()
    (tmp_path / "copy.pt").write_bytes(b"PK\x03\x04 then nothing a zip reader understands")
    orphan = tmp_path / CHUNKS / ("ef" * 16)
    orphan.write_bytes(b"x")
    assert collect_garbage(str(tmp_path)) is None
    assert orphan.exists() and "copy.pt" in caplog.text and "could not be read" in caplog.text


def test_a_zip_of_something_else_in_the_folder_does_not_hold_collection_back(tmp_path: Path) -> None:
    import zipfile

    _trainer(tmp_path, "1ba").fit()
    with zipfile.ZipFile(tmp_path / "dataset.zip", "w") as archive:
        archive.writestr("train.csv", "x,y\n1,2\n")
    orphan = tmp_path / CHUNKS / ("12" * 16)
    orphan.write_bytes(b"x")
    assert collect_garbage(str(tmp_path)) == 1 and not orphan.exists()


# -- hostile manifests -----------------------------------------------------------------------------------------------


def _one_manifest(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    checkpoint = {
        "state": {
            "model": {"w": torch.arange(40_000, dtype=torch.float32), "b": torch.ones(3)},
            "metadata": {"format_version": 1, "world_size": 1},
        }
    }
    path = tmp_path / "m.pt"
    write_incremental(checkpoint, str(path), root=str(tmp_path))
    return path, torch.load(path, weights_only=True)


def _edited(path: Path, manifest: dict[str, Any]) -> None:
    """Rewrite the manifest with a matching hash: what an attacker who can write the file can do."""
    manifest["state"]["metadata"].pop("content_hash", None)
    write_checkpoint(seal(manifest), str(path))


def _entry(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["chunks"]["tensors"][0]


HOSTILE = {
    "a key that is a path": (lambda m: _entry(m)["chunks"][0].__setitem__(0, "../../../etc/passwd"), "32 hex"),
    "a chunk folder outside": (lambda m: m["chunks"].__setitem__("folder", "/etc"), "chunk folder"),
    "a chunk folder above": (lambda m: m["chunks"].__setitem__("folder", "../../x/.cairn-chunks"), "chunk folder"),
    "an object dtype": (lambda m: _entry(m).__setitem__("dtype", "object"), "not a plain number type"),
    "a shape its chunks do not fill": (lambda m: _entry(m).__setitem__("shape", [40_001]), "does not match"),
    "a negative size": (lambda m: _entry(m)["chunks"][0].__setitem__(1, -5), "32 hex digits, size"),
    "no place in the state": (lambda m: m["state"]["model"].__setitem__("w", "not a marker"), "no place"),
    "another hash": (lambda m: m["chunks"].__setitem__("hash", "md5"), "not xxh3-128"),
    "tensors not a list": (lambda m: m["chunks"].__setitem__("tensors", {"a": 1}), "list of tensors"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_manifest_is_refused_before_anything_is_read(tmp_path: Path, case: str) -> None:
    path, manifest = _one_manifest(tmp_path)
    edit, expected = HOSTILE[case]
    edit(manifest)
    _edited(path, manifest)
    with pytest.raises(CheckpointCorruptError, match=expected) as info:
        read_checkpoint(str(path))
    assert "\n" not in str(info.value)


def test_a_manifest_claiming_more_than_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    path, manifest = _one_manifest(tmp_path)
    key = _entry(manifest)["chunks"][0][0]
    # one chunk named over and over is a legitimate form (a tensor of zeros), so a small file can claim any size
    big = {"path": "state/model/w", "dtype": "uint8", "shape": [2**42], "chunks": [[key, 2**30] for _ in range(2**12)]}
    manifest["chunks"]["tensors"][0] = big
    _edited(path, manifest)
    with pytest.raises(CheckpointCorruptError, match="more than this machine's memory"):
        read_checkpoint(str(path))


@pytest.mark.parametrize("replacement", ["missing", "fifo", "link", "folder", "shorter"])
def test_a_chunk_that_is_not_its_plain_self_is_refused(tmp_path: Path, replacement: str) -> None:
    path, manifest = _one_manifest(tmp_path)
    chunk = tmp_path / CHUNKS / _entry(manifest)["chunks"][0][0]
    data = chunk.read_bytes()
    chunk.unlink()
    if replacement == "fifo":
        os.mkfifo(chunk)
    elif replacement == "link":
        (tmp_path / "elsewhere").write_bytes(data)
        chunk.symlink_to(tmp_path / "elsewhere")
    elif replacement == "folder":
        chunk.mkdir()
    elif replacement == "shorter":
        chunk.write_bytes(data[:-1])
    with pytest.raises(CheckpointCorruptError, match="chunk") as info:
        read_checkpoint(str(path))
    assert "convert --to single-file" in str(info.value)


def test_a_link_in_a_chunks_place_is_written_over_not_relied_on(tmp_path: Path) -> None:
    path, manifest = _one_manifest(tmp_path)
    chunk = tmp_path / CHUNKS / _entry(manifest)["chunks"][0][0]
    (tmp_path / "elsewhere").write_bytes(chunk.read_bytes())
    chunk.unlink()
    chunk.symlink_to(tmp_path / "elsewhere")  # the same bytes, but a load refuses to follow a link
    _one_manifest(tmp_path)  # the same checkpoint saved again
    assert not chunk.is_symlink()
    assert torch.equal(read_checkpoint(str(path))["state"]["model"]["w"], torch.arange(40_000, dtype=torch.float32))


def test_a_user_string_that_looks_like_a_marker_is_kept(tmp_path: Path) -> None:
    checkpoint = {
        "state": {
            "model": {"w": torch.zeros(32_768)},
            "integrations": {"note": "cairn-chunked-tensor:0"},
            "metadata": {"format_version": 1},
        }
    }
    write_incremental(checkpoint, str(tmp_path / "m.pt"), root=str(tmp_path))
    loaded = read_checkpoint(str(tmp_path / "m.pt"))
    assert loaded["state"]["integrations"]["note"] == "cairn-chunked-tensor:0"
    assert torch.equal(loaded["state"]["model"]["w"], torch.zeros(32_768))
    assert len(_chunk_files(tmp_path)) == 1, "a tensor of zeros: one chunk, named twice"


def test_save_incremental_must_be_true_or_false(tmp_path: Path) -> None:
    from conftest import refused_at_construction

    refused_at_construction(tmp_path, TypeError, "save_incremental", "yes")


@pytest.mark.parametrize(
    ("argument", "value"),
    [("save_filename", ".cairn-chunks/ep{epoch}.pt"), ("save_remote_file_name", "run/.cairn-chunks/ep{epoch}.pt")],
)
def test_a_name_inside_a_chunk_folder_is_refused(tmp_path: Path, argument: str, value: str) -> None:
    from conftest import refused_at_construction

    message = refused_at_construction(tmp_path, ValueError, argument, value, save_incremental=True)
    assert ".cairn-chunks" in message


def test_an_uploader_that_takes_whole_files_only_is_refused_before_training(tmp_path: Path) -> None:
    from cairn.loggers import LoggerDestination

    class Mailer(LoggerDestination):
        def upload_file(self, remote_file_name, file_path, overwrite=False, pointer_name=None, **kwargs):
            raise AssertionError("no upload should start")

    with pytest.raises(ValueError, match="logger Mailer uploads whole files only") as info:
        _trainer(tmp_path, "1ba", loggers=[Mailer()])
    assert "\n" not in str(info.value) and not list(tmp_path.iterdir())
