"""Poison that is not a damaged byte: zip bombs, absurd declared sizes, sharded folders whose index runs code or
reaches outside the folder, symlinks out of the folder, and ``..`` in names a store hands back.

Each is refused with a CairnError subclass in well under a second, runs nothing, and writes nothing outside the
folder it was asked about."""

from __future__ import annotations

import io
import logging
import os
import pickle
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import load_checkpoint, read_checkpoint
from cairn.checkpoint.format import file_digest
from cairn.checkpoint.save.content import seal
from cairn.checkpoint.tools.convert import convert
from cairn.errors import CairnError, CheckpointCorruptError, UnsafeCheckpointError
from cairn.models import Classifier
from conftest import TinyNet, make_loader, params_of


class CreatesAFile:
    """Unpickled by plain pickle, this opens (creates) ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return open, (str(self.marker), "w")


def _trainer(**kwargs: object) -> Trainer:
    torch.manual_seed(0)
    kwargs.setdefault("max_duration", "2ba")
    return Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(),
        progress_bar=False,
        seed=1,
        **kwargs,
    )


@pytest.fixture(scope="module")
def real_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A verified cairn checkpoint, re-saved by plain torch.save so that zipfile can read its records (cairn skips
    the zip CRC)."""
    folder = tmp_path_factory.mktemp("real")
    trainer = _trainer(save_folder=str(folder), save_filename="c.pt")
    trainer.fit()
    trainer.close()
    torch.save(torch.load(folder / "c.pt", weights_only=True), folder / "plain.pt")
    read_checkpoint(str(folder / "plain.pt"))
    return folder / "plain.pt"


@pytest.fixture
def sharded(real_file: Path, tmp_path: Path) -> Path:
    """A genuine sharded folder (DCP shards, ``.metadata`` and ``cairn.pt``) of the same checkpoint."""
    folder = tmp_path / "sharded"
    convert(str(real_file), "sharded", str(folder))
    read_checkpoint(str(folder))  # it is good before the test spoils it
    return folder


@pytest.fixture
def nothing_written_outside(tmp_path: Path) -> Iterator[Path]:
    """A sibling folder the poison points at; the test fails if anything in it changes."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("do not read me")
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    yield outside
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before, "something was written outside"


def refused_quickly(action: Callable[[], object], error: type[CairnError]) -> CairnError:
    start = time.perf_counter()
    with pytest.raises(error) as info:
        action()
    assert time.perf_counter() - start < 1.0, "a poison case must be refused in under a second"
    assert "\n" not in str(info.value) and str(info.value)
    return info.value


def load_into_fresh_trainer(path: Path) -> Callable[[], object]:
    trainer = _trainer()
    before = params_of(trainer.state.model)

    def load() -> object:
        try:
            return load_checkpoint(str(path), trainer.state)
        finally:
            after = params_of(trainer.state.model)
            assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed the weights"
            assert trainer.state.resumed_from is None

    return load


def rewrite_archive(source: Path, target: Path, records: Callable[[zipfile.ZipFile, zipfile.ZipFile], None]) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        records(old, new)
    return target


# -- archives -----------------------------------------------------------------------------------------------------


def test_a_zip_bomb_is_refused_before_anything_is_inflated(real_file: Path, tmp_path: Path) -> None:
    inflated = 256 << 20  # 256 MiB of zeros deflate to a quarter of a MiB

    def add_bomb(old: zipfile.ZipFile, new: zipfile.ZipFile) -> None:
        for record in old.infolist():
            if record.filename.endswith("data.pkl"):
                deflated = zipfile.ZipInfo(record.filename)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with new.open(deflated, "w", force_zip64=True) as bomb:
                    chunk = bytes(1 << 22)
                    for _ in range(inflated // len(chunk)):
                        bomb.write(chunk)
            else:
                new.writestr(record, old.read(record))

    bomb = rewrite_archive(real_file, tmp_path / "bomb.pt", add_bomb)
    assert bomb.stat().st_size < inflated // 100
    err = refused_quickly(load_into_fresh_trainer(bomb), CheckpointCorruptError)
    assert "zip bomb" in str(err) and str(bomb) in str(err)


def test_an_archive_with_compressed_records_is_refused(real_file: Path, tmp_path: Path) -> None:
    def compress_all(old: zipfile.ZipFile, new: zipfile.ZipFile) -> None:
        for record in old.infolist():
            new.writestr(record.filename, old.read(record), compress_type=zipfile.ZIP_DEFLATED)

    refused_quickly(
        lambda: read_checkpoint(str(rewrite_archive(real_file, tmp_path / "deflated.pt", compress_all))),
        CheckpointCorruptError,
    )


@pytest.mark.parametrize("declared", [2**31 - 1, 2**40])
def test_a_tensor_that_declares_a_huge_size_is_refused(real_file: Path, tmp_path: Path, declared: int) -> None:
    """The pickle says a storage holds ``declared`` elements; the record holds a few hundred bytes."""
    checkpoint = torch.load(real_file, weights_only=True)
    name, tensor = next(iter(checkpoint["state"]["model"].items()))
    original = pickle.dumps(tensor.numel())[2:-1]  # the opcode encoding the element count, as torch pickles it

    def inflate_sizes(old: zipfile.ZipFile, new: zipfile.ZipFile) -> None:
        for record in old.infolist():
            data = old.read(record)
            if record.filename.endswith("data.pkl"):
                assert original in data
                data = data.replace(original, pickle.dumps(declared)[2:-1])
            new.writestr(record, data)

    path = rewrite_archive(real_file, tmp_path / "huge.pt", inflate_sizes)
    refused_quickly(load_into_fresh_trainer(path), CairnError)


# -- sharded folders ----------------------------------------------------------------------------------------------


def _index(folder: Path) -> object:
    with open(folder / ".metadata", "rb") as file:
        return pickle.load(file)  # the test's own, genuine file


def _write_index(folder: Path, index: object) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(index))


def test_a_shard_index_that_would_run_code_is_refused_and_nothing_runs(sharded: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps(CreatesAFile(marker))
    pickle.loads(payload)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    (sharded / ".metadata").write_bytes(payload)
    err = refused_quickly(load_into_fresh_trainer(sharded), UnsafeCheckpointError)
    assert "io.open" in str(err) and "nothing was executed" in str(err)
    assert not marker.exists(), "code from the shard index ran"


def _forge_digests(folder: Path) -> None:
    """Record the shards' current bytes in ``cairn.pt``, re-sealed: digests catch damage, not an attacker, so the
    safety checks must hold without them."""
    checkpoint = torch.load(folder / "cairn.pt", weights_only=True)
    checkpoint["state"]["metadata"]["shards"] = {
        p.name: file_digest(str(p)) for p in folder.iterdir() if p.name != "cairn.pt"
    }
    torch.save(seal(checkpoint), folder / "cairn.pt")


def _plant_byte_entry(sharded: Path, value: object) -> str:
    """Replace one of the folder's byte entries (an optimizer's lr, betas) with ``torch.save(value)``; its name."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    blob = io.BytesIO()
    torch.save(value, blob)
    index = _index(sharded)
    key = next(k for k, v in index.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    entry = next(i for i, info in index.storage_data.items() if i.fqn == key)
    shard = sharded / index.storage_data[entry].relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as file:
        file.write(blob.getvalue())
    index.storage_data[entry].offset, index.storage_data[entry].length = offset, len(blob.getvalue())
    _write_index(sharded, index)
    _forge_digests(sharded)
    return key


class AsksForBytes:
    """Pickles as ``bytearray(16 GiB)``: a call torch's safe loader admits, which allocates from one number."""

    def __reduce__(self) -> tuple[type, tuple[int]]:
        return bytearray, (16 << 30,)


def test_a_shard_entry_that_asks_for_gigabytes_is_refused_before_anything_is_allocated(sharded: Path) -> None:
    key = _plant_byte_entry(sharded, AsksForBytes())
    err = refused_quickly(lambda: read_checkpoint(str(sharded)), CheckpointCorruptError)
    assert key in str(err) and "bytearray" in str(err)


def test_a_shard_entry_that_would_run_code_is_refused_and_nothing_runs(sharded: Path, tmp_path: Path) -> None:
    """DCP unpickles non-tensor entries (an optimizer's lr, betas) with weights_only=False; cairn does not."""
    marker = tmp_path / "ran"
    key = _plant_byte_entry(sharded, CreatesAFile(marker))
    err = refused_quickly(lambda: read_checkpoint(str(sharded)), UnsafeCheckpointError)
    assert key in str(err) and "GLOBAL" in str(err)
    refused_quickly(load_into_fresh_trainer(sharded), UnsafeCheckpointError)
    assert not marker.exists(), "code from a shard entry ran"


def test_a_flipped_bit_in_a_shard_fails_its_digest_before_any_weight_changes(sharded: Path) -> None:
    shard = next(sharded.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x10  # inside the last tensor's bytes
    shard.write_bytes(bytes(data))
    err = refused_quickly(load_into_fresh_trainer(sharded), CheckpointCorruptError)
    assert "fails its digest" in str(err) and shard.name in str(err)


@pytest.mark.parametrize("name", ["../outside/secret.txt", "/etc/hostname", "..", "sub/../../outside/secret.txt"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(
    sharded: Path, nothing_written_outside: Path, name: str
) -> None:
    index = _index(sharded)
    entry = next(iter(index.storage_data))
    index.storage_data[entry].relative_path = name
    _write_index(sharded, index)
    err = refused_quickly(lambda: read_checkpoint(str(sharded)), UnsafeCheckpointError)
    assert "outside the folder" in str(err)
    refused_quickly(load_into_fresh_trainer(sharded), UnsafeCheckpointError)


def test_a_shard_that_is_a_symlink_out_of_the_folder_is_refused(sharded: Path, tmp_path: Path) -> None:
    shard = next(sharded.glob("*.distcp"))
    (tmp_path / "elsewhere").mkdir()
    stolen = tmp_path / "elsewhere" / "stolen.distcp"
    stolen.write_bytes(shard.read_bytes())  # even a link to the very same bytes, elsewhere, is refused
    shard.unlink()
    shard.symlink_to(stolen)
    err = refused_quickly(load_into_fresh_trainer(sharded), UnsafeCheckpointError)
    assert "symlink" in str(err)


def test_a_truncated_shard_is_corrupt(sharded: Path) -> None:
    shard = next(sharded.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = refused_quickly(lambda: read_checkpoint(str(sharded)), CheckpointCorruptError)
    assert "shorter than its index says" in str(err)


def test_damaged_shard_bytes_are_a_cairn_error(sharded: Path) -> None:
    shard = next(sharded.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))  # right size, all zeros
    refused_quickly(load_into_fresh_trainer(sharded), CheckpointCorruptError)


# -- links and names that lead elsewhere --------------------------------------------------------------------------


def test_autoresume_never_follows_latest_out_of_the_save_folder(
    real_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``latest`` link planted to point at a good checkpoint elsewhere is ignored: the run starts fresh."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "latest-rank0.pt").symlink_to(real_file)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        trainer = _trainer(save_folder=str(folder), autoresume=True)
    assert trainer.state.resumed_from is None and trainer.state.timestamp.batch == 0
    assert "points outside" in caplog.text


@pytest.mark.parametrize("pointer", ["../../elsewhere/ep9.pt", "/abs/ep9.pt", "run/../../x.pt"])
def test_a_store_pointer_with_dot_dot_or_an_absolute_name_is_refused(
    moto_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pointer: str
) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.chdir(tmp_path)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="run/latest-rank0.pt.symlink", Body=pointer.encode())
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CheckpointCorruptError, match="does not hold an object name"):
        _trainer(save_folder=f"s3://{s3_bucket}/run", autoresume=True, run_name="r")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "nothing may be downloaded or written"
    assert not (tmp_path.parent / "elsewhere").exists()


def test_poison_cases_write_nothing_beside_them(real_file: Path, tmp_path: Path) -> None:
    """Refusing a file leaves its folder exactly as it was: no temporary, no partial download, no marker."""
    folder = tmp_path / "only"
    folder.mkdir()
    bad = folder / "bad.pt"
    bad.write_bytes(real_file.read_bytes()[:-100])
    before = sorted(os.listdir(folder))
    refused_quickly(load_into_fresh_trainer(bad), CheckpointCorruptError)
    assert sorted(os.listdir(folder)) == before


@pytest.mark.parametrize("name", ["run/..", "run/.", "run/ep1\x1b[2J.pt"])
def test_a_store_object_named_with_dot_dot_or_control_characters_downloads_inside_a_private_folder(
    moto_endpoint: str, s3_bucket: str, real_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The object's name never chooses where its download lands: ``run/..`` must not write beside the temporary
    folder, whatever the store answers."""
    from cairn.checkpoint.load.remote import read_remote_checkpoint
    from cairn.utils import S3ObjectStore

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile reads TMPDIR again
    store = S3ObjectStore(bucket=s3_bucket, endpoint_url=moto_endpoint)
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").put_object(
        Bucket=s3_bucket, Key=name, Body=real_file.read_bytes()
    )
    checkpoint = read_remote_checkpoint(store, name, progress=False)
    assert (
        checkpoint["state"]["metadata"]["content_hash"]
        == read_checkpoint(str(real_file))["state"]["metadata"]["content_hash"]
    )
    assert list(scratch.iterdir()) == [], "the download stayed inside its private folder, which is gone"
