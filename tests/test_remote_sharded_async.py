"""The bookkeeping of a sharded folder's upload, in one process against the real moto server (the two-rank runs are
in tests/test_remote_sharded.py): a folder is registered when its save is taken, is pending until its uploads are
attached (an async save's background does it once the folder is published), and a refusal found at registration is
raised only when the uploads would start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cairn.checkpoint.save.remote_shards import ShardedUploads, own_shard_files
from cairn.core.logger import Logger
from cairn.errors import ObjectExistsError
from cairn.loggers import RemoteUploaderDownloader
from store_servers.moto import bucket_objects

_REMOTE = "run/ep0-ba3-rank0.pt"


@pytest.fixture
def uploads_to_the_store(s3_env: str, s3_bucket: str) -> Iterator[Logger]:
    uploader = RemoteUploaderDownloader(f"s3://{s3_bucket}", use_procs=False)
    yield Logger(None, [uploader])  # type: ignore[arg-type] - uploading reads no state
    uploader.transfers.close()


def _folder(tmp_path: Path) -> Path:
    """A published sharded folder of one rank (the bytes do not matter to the uploads)."""
    folder = tmp_path / "ep0-ba3-rank0.pt"
    folder.mkdir()
    for name in (".metadata", "__0_0.distcp", "cairn.pt"):
        (folder / name).write_bytes(name.encode())
    return folder


def test_a_registered_folder_waits_for_its_uploads_then_goes_up_with_cairn_pt_last(
    tmp_path: Path, uploads_to_the_store: Logger, s3_env: str, s3_bucket: str
) -> None:
    folder, uploads = _folder(tmp_path), ShardedUploads()
    record = uploads.register(
        uploads_to_the_store, str(folder), _REMOTE, pointer="run/latest-rank0.pt.symlink", overwrite=False
    )
    assert record.status() == "pending", "registered at the save, before the folder is published"
    uploads.settle(uploads_to_the_store, wait=False)
    assert uploads.in_flight and not record.settled.done(), "a folder whose uploads have not started stays"

    uploads.start(uploads_to_the_store, record)  # what an async save's background does once the folder is published
    uploads.settle(uploads_to_the_store, wait=True)

    assert record.settled.result(timeout=60) == _REMOTE and not uploads.in_flight
    uploads_to_the_store.destinations[0].wait()  # the pointer moves once cairn.pt is verified
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [f"{_REMOTE}/.metadata", f"{_REMOTE}/__0_0.distcp", f"{_REMOTE}/cairn.pt"] + [
        "run/latest-rank0.pt.symlink"
    ]
    assert objects["run/latest-rank0.pt.symlink"] == _REMOTE.encode()


def test_a_complete_folder_in_the_store_is_refused_when_the_uploads_would_start_and_forgotten(
    tmp_path: Path, uploads_to_the_store: Logger, s3_env: str, s3_bucket: str
) -> None:
    uploads_to_the_store.upload_file(f"{_REMOTE}/cairn.pt", str(_folder(tmp_path) / "cairn.pt"))[0].result(60)
    folder, uploads = tmp_path / "second" / "ep0-ba3-rank0.pt", ShardedUploads()
    folder.parent.mkdir()
    record = uploads.register(uploads_to_the_store, str(folder), _REMOTE, pointer=None, overwrite=False)
    _folder(folder.parent)  # written after the question was asked, as an async save's folder is

    with pytest.raises(ObjectExistsError, match="this folder was not uploaded \\(it is kept\\)"):
        uploads.start(uploads_to_the_store, record)

    assert isinstance(record.settled.exception(timeout=0), ObjectExistsError), "the saver keeps the local folder"
    uploads.settle(uploads_to_the_store, wait=True)
    assert not uploads.in_flight
    assert sorted(bucket_objects(s3_env, s3_bucket)) == [f"{_REMOTE}/cairn.pt"], "nothing of it went up"


def test_every_file_of_a_folder_has_exactly_one_uploader(tmp_path: Path) -> None:
    """DCP names rank r's shards ``__<r>_<n>.distcp``; any other name (another DCP version's, a rank this run does
    not have, digits Python reads as numbers but are not ASCII) goes to rank 0, so no file is left out."""
    names = [".metadata", "__0_0.distcp", "__1_0.distcp", "__1_1.distcp", "__5_0.distcp", "__²_0.distcp", "extra"]
    for name in [*names, "cairn.pt"]:
        (tmp_path / name).write_bytes(b"")
    owned = {rank: own_shard_files(str(tmp_path), rank, world_size=2) for rank in (0, 1)}
    assert owned[1] == ["__1_0.distcp", "__1_1.distcp"]
    assert sorted(owned[0] + owned[1]) == sorted(names), "cairn.pt goes up last, on its own"
