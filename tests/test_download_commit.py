"""Downloads land through the one commit path (cairn.atomic.atomic_write): complete or not at all, never replacing
a file with overwrite=False, and any object name a store allows can be read (issue 15, H15)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from cairn.checkpoint import read_checkpoint
from cairn.names import TEMP_MARKER
from conftest import build_trainer


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    trainer = build_trainer(folder, save_folder=str(folder), save_filename="c.pt")
    trainer.fit()
    trainer.close()
    return folder / "c.pt"


def _store_holding(moto_endpoint: str, bucket: str, key: str, body: bytes) -> object:
    from cairn.utils import S3ObjectStore

    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").put_object(
        Bucket=bucket, Key=key, Body=body
    )
    return S3ObjectStore(bucket=bucket, endpoint_url=moto_endpoint)


@pytest.mark.parametrize("length", [230, 300])
def test_a_store_object_with_a_long_name_is_read(
    moto_endpoint: str, s3_bucket: str, checkpoint_file: Path, length: int
) -> None:
    """A 230-byte base name is a valid local file name, but a temporary named after it in full is not; a 300-byte
    one is not a local file name at all (a store allows 1024): either must be read, not fail with 'File name too
    long'."""
    from cairn.checkpoint.load.remote import read_remote_checkpoint

    name = "run/" + "e" * (length - 3) + ".pt"
    store = _store_holding(moto_endpoint, s3_bucket, name, checkpoint_file.read_bytes())
    checkpoint = read_remote_checkpoint(store, name, progress=False)  # type: ignore[arg-type]
    expected = read_checkpoint(str(checkpoint_file))["state"]["metadata"]["content_hash"]
    assert checkpoint["state"]["metadata"]["content_hash"] == expected


def test_a_download_refuses_to_replace_a_file_and_leaves_no_temporary(
    moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = _store_holding(moto_endpoint, s3_bucket, "x.bin", b"new bytes")
    target = tmp_path / "x.bin"
    target.write_bytes(b"old bytes")
    with pytest.raises(FileExistsError):
        store.download_object("x.bin", str(target), overwrite=False)  # type: ignore[attr-defined]
    assert target.read_bytes() == b"old bytes"
    store.download_object("x.bin", str(target), overwrite=True)  # type: ignore[attr-defined]
    assert target.read_bytes() == b"new bytes"
    assert [name for name in os.listdir(tmp_path) if TEMP_MARKER in name] == []


def test_a_download_onto_a_long_file_name_lands_complete(moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    """Any file name that fits on disk can be downloaded into, though the SDK adds to the temporary's name."""
    store = _store_holding(moto_endpoint, s3_bucket, "y.bin", b"payload")
    target = tmp_path / ("y" * 250)
    store.download_object("y.bin", str(target))  # type: ignore[attr-defined]
    assert os.listdir(tmp_path) == [target.name] and target.read_bytes() == b"payload"
