"""save_overwrite=False holds in object stores as on disk, and the store's latest pointer never moves back.

Runs against real servers: moto's S3 server (and gcp-storage-emulator, the OCI stand-in and the libcloud stores
for the store-level checks); see tests/store_servers/.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
import pytest

from cairn import Callback
from cairn.checkpoint import read_checkpoint
from cairn.errors import ObjectExistsError
from cairn.loggers import RemoteUploaderDownloader
from cairn.storage.base import ObjectStore
from conftest import s3_run_trainer
from store_servers.moto import bucket_objects

STORE_KINDS = ["s3", "gcs", "gcs_hmac", "oci", "libcloud_s3", "libcloud_azure"]


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


_trainer = s3_run_trainer


def _put(endpoint: str, bucket: str, key: str, body: bytes) -> None:
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").put_object(Bucket=bucket, Key=key, Body=body)


def _on_new_machine(tmp_path: Path, name: str) -> None:
    """Another machine: an empty working directory, nothing local."""
    folder = tmp_path / name
    folder.mkdir()
    os.chdir(folder)


def _first_run(tmp_path: Path, bucket: str) -> None:
    _on_new_machine(tmp_path, "machine-a")
    _trainer(save_folder=f"s3://{bucket}/run", save_filename="ep{epoch}.pt", save_num_checkpoints_to_keep=0).fit()


# -- through the Trainer --------------------------------------------------------------------------------------------


def test_a_second_run_with_the_same_names_refuses_to_start_and_leaves_the_store_alone(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _first_run(tmp_path, s3_bucket)
    before = bucket_objects(s3_env, s3_bucket)
    assert before["run/latest-rank0.pt.symlink"] == b"run/ep3.pt"
    _on_new_machine(tmp_path, "machine-b")
    second = _trainer(
        init_seed=1, save_folder=f"s3://{s3_bucket}/run", save_filename="ep{epoch}.pt", save_num_checkpoints_to_keep=0
    )
    with pytest.raises(FileExistsError, match=r"run/ep3\.pt.*save_overwrite=True"):
        second.fit()
    assert second.state.timestamp.batch == 0, "refused before any training"
    assert bucket_objects(s3_env, s3_bucket) == before, "no object replaced, the pointer unchanged"


def test_an_object_that_appears_during_the_run_is_not_replaced_and_the_run_fails_loudly(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    theirs = b"another machine's ep1.pt"

    class AnotherMachineWrites(Callback):
        def batch_end(self, state, logger) -> None:
            if state.timestamp.batch == 2:  # after fit start checked the store, before the epoch's upload
                _put(s3_env, s3_bucket, "run/ep1.pt", theirs)

    trainer = _trainer(
        "1ep",
        save_folder=f"s3://{s3_bucket}/run",
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,
        callbacks=AnotherMachineWrites(),
    )
    with pytest.raises(ObjectExistsError, match=r"run/ep1\.pt already exists.*save_overwrite=True") as excinfo:
        trainer.fit()
    assert isinstance(excinfo.value, FileExistsError)
    assert bucket_objects(s3_env, s3_bucket) == {"run/ep1.pt": theirs}, "not replaced, and no pointer to it"
    assert read_checkpoint(str(tmp_path / "run" / "ep1.pt"))["state"]["timestamp"]["epoch"] == 1, "local copy kept"


def test_the_pointer_never_moves_back_to_an_older_checkpoint_of_an_earlier_run(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _first_run(tmp_path, s3_bucket)
    first = bucket_objects(s3_env, s3_bucket)
    _on_new_machine(tmp_path, "machine-b")
    _trainer(
        "1ep", init_seed=1, save_folder=f"s3://{s3_bucket}/run", save_filename="ep{epoch}.pt", save_overwrite=True
    ).fit()
    second = bucket_objects(s3_env, s3_bucket)
    assert second["run/ep1.pt"] != first["run/ep1.pt"], "save_overwrite=True replaced ep1"
    assert second["run/latest-rank0.pt.symlink"] == b"run/ep3.pt", "the pointer stays at the run's furthest checkpoint"

    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").delete_object(Bucket=s3_bucket, Key="run/ep3.pt")
    _on_new_machine(tmp_path, "machine-c")
    _trainer(
        "1ep", init_seed=2, save_folder=f"s3://{s3_bucket}/run", save_filename="ep{epoch}.pt", save_overwrite=True
    ).fit()
    assert bucket_objects(s3_env, s3_bucket)["run/latest-rank0.pt.symlink"] == b"run/ep1.pt", (
        "a pointer to a deleted object holds nothing back"
    )


def test_a_resumed_run_continues_in_the_store_it_came_from(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    _on_new_machine(tmp_path, "machine-a")
    _trainer("1ep", save_folder=f"s3://{s3_bucket}/run", save_filename="ep{epoch}.pt", run_name="r").fit()
    _on_new_machine(tmp_path, "machine-b")
    resumed = _trainer(
        "2ep", save_folder=f"s3://{s3_bucket}/run", save_filename="ep{epoch}.pt", run_name="r", autoresume=True
    )
    assert resumed.state.timestamp.epoch == 1
    resumed.fit()
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == ["run/ep1.pt", "run/ep2.pt", "run/latest-rank0.pt.symlink"]
    assert objects["run/latest-rank0.pt.symlink"] == b"run/ep2.pt"


def test_a_second_run_is_refused_in_a_gcs_bucket_too(
    gcs_emulator: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from store_servers.gcs import new_gcs_bucket

    monkeypatch.delenv("GCS_KEY", raising=False)
    monkeypatch.delenv("GCS_SECRET", raising=False)
    bucket = new_gcs_bucket()
    monkeypatch.chdir(tmp_path)
    _on_new_machine(tmp_path, "machine-a")
    _trainer("1ep", save_folder=f"gs://{bucket}/run", save_filename="ep{epoch}.pt").fit()
    _on_new_machine(tmp_path, "machine-b")
    second = _trainer("1ep", init_seed=1, save_folder=f"gs://{bucket}/run", save_filename="ep{epoch}.pt")
    with pytest.raises(FileExistsError, match=r"gs://.*run/ep1\.pt"):
        second.fit()
    assert second.state.timestamp.batch == 0


# -- the stores -----------------------------------------------------------------------------------------------------


def test_overwrite_false_never_replaces_an_object(store: ObjectStore, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
    ours.write_bytes(os.urandom(1000))
    theirs.write_bytes(os.urandom(1000))
    store.upload_object("run/ep1.pt", str(theirs), overwrite=False)  # a new name: written
    with pytest.raises(ObjectExistsError, match="already exists") as excinfo:
        store.upload_object("run/ep1.pt", str(ours), overwrite=False)
    assert isinstance(excinfo.value, FileExistsError)
    store.verify_upload("run/ep1.pt", str(theirs))
    store.upload_object("run/ep1.pt", str(theirs), overwrite=False)  # the same bytes again: a retry, not a conflict
    store.upload_object("run/ep1.pt", str(ours))  # overwrite=True (the default) replaces
    store.verify_upload("run/ep1.pt", str(ours))


@pytest.mark.parametrize("size", [1000, 11 << 20], ids=["single-part", "multipart"])
def test_s3_refuses_an_object_that_appears_during_the_upload(
    s3_store: ObjectStore, moto_endpoint: str, tmp_path: Path, size: int
) -> None:
    ours = tmp_path / "ours.bin"
    ours.write_bytes(os.urandom(size))
    theirs = b"written by another machine while ours was on its way"
    key = s3_store.key("run/ep1.pt")

    def another_writer_lands(**kwargs: Any) -> None:  # after the existence check, just before the write completes
        _put(moto_endpoint, s3_store.bucket, key, theirs)

    events = s3_store._client.meta.events
    for operation in ("PutObject", "CompleteMultipartUpload"):
        events.register(f"before-send.s3.{operation}", another_writer_lands, unique_id=f"test-{operation}")
    with pytest.raises(ObjectExistsError, match="already exists"):
        s3_store.upload_object("run/ep1.pt", str(ours), overwrite=False)
    assert bucket_objects(moto_endpoint, s3_store.bucket) == {key: theirs}


@pytest.mark.parametrize("use_procs", [False, pytest.param(True, marks=pytest.mark.slow)])  # processes: ~6 s
def test_the_uploader_refuses_to_replace_an_object_from_its_workers(
    s3_env: str, s3_bucket: str, tmp_path: Path, use_procs: bool
) -> None:
    _put(s3_env, s3_bucket, "run/ep1.pt", b"theirs")
    ours = tmp_path / "ep1.pt"
    ours.write_bytes(b"ours")
    uploader = RemoteUploaderDownloader(f"s3://{s3_bucket}", use_procs=use_procs)
    try:
        uploader.upload_file("run/ep1.pt", str(ours), overwrite=False, pointer_name="run/latest.symlink")
        with pytest.raises(ObjectExistsError, match=r"s3://.*run/ep1\.pt already exists.*ep1\.pt' was not uploaded"):
            uploader.wait()
    finally:
        uploader.close(None, None)  # type: ignore[arg-type]
    assert bucket_objects(s3_env, s3_bucket) == {"run/ep1.pt": b"theirs"}, "not replaced, and no pointer to it"
