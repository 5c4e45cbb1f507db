"""A saver's upload notes on its sharded folders in flight, which the Trainer's agreement reduces in its one
``all_reduce`` (tests/test_agreement.py counts the collectives on two ranks): here, in one process against the real
moto server, what each state of a folder contributes and that settling from the reduced notes acts as settling from
gathered statuses does, a failure raising the same error, naming the rank and its reason."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cairn.checkpoint.save.remote_shards import ShardedUploads
from cairn.core.logger import Logger
from cairn.errors import ObjectStoreError
from cairn.loggers import RemoteUploaderDownloader
from store_servers.moto import bucket_objects

_REMOTE = "run/ep0-ba3-rank0.pt"


def _logger(bucket: str) -> Iterator[Logger]:
    uploader = RemoteUploaderDownloader(f"s3://{bucket}", use_procs=False)
    yield Logger(None, [uploader])  # type: ignore[arg-type] - uploading reads no state
    with contextlib.suppress(ObjectStoreError):  # the uploads the test made fail are raised again at close
        uploader.transfers.close()


@pytest.fixture
def uploads_to_the_store(s3_env: str, s3_bucket: str) -> Iterator[Logger]:
    yield from _logger(s3_bucket)


@pytest.fixture
def uploads_to_a_missing_bucket(s3_env: str, s3_bucket: str) -> Iterator[Logger]:
    yield from _logger(f"{s3_bucket}-missing")


def _folder(tmp_path: Path) -> Path:
    """A published sharded folder of one rank (the bytes do not matter to the uploads)."""
    folder = tmp_path / "ep0-ba3-rank0.pt"
    folder.mkdir(exist_ok=True)
    for name in (".metadata", "__0_0.distcp", "cairn.pt"):
        (folder / name).write_bytes(name.encode())
    return folder


def test_no_folder_in_flight_adds_no_integers(uploads_to_the_store: Logger) -> None:
    notes = ShardedUploads().notes()
    assert notes.records == () and notes.slots == ()


def test_a_folder_settles_from_its_reduced_notes_once_stored_and_goes_up_with_cairn_pt(
    tmp_path: Path, uploads_to_the_store: Logger, s3_env: str, s3_bucket: str
) -> None:
    uploads = ShardedUploads()
    record = uploads.register(
        uploads_to_the_store, str(_folder(tmp_path)), _REMOTE, pointer="run/latest-rank0.pt.symlink", overwrite=False
    )
    notes = uploads.notes()
    assert notes.slots == (1, 0, 1), "not stored, not failed, known"
    uploads.settle(uploads_to_the_store, wait=False, agreed=notes.agreed(notes.slots))
    assert uploads.in_flight, "a folder not stored everywhere stays"

    uploads.start(uploads_to_the_store, record)
    for _, upload in record.uploads or ():
        upload.result(timeout=60)  # the real signal: this rank's uploads are done
    notes = uploads.notes()
    assert notes.slots == (0, 0, 1)
    uploads.settle(uploads_to_the_store, wait=False, agreed=notes.agreed(notes.slots))

    assert record.settled.result(timeout=60) == _REMOTE and not uploads.in_flight
    uploads_to_the_store.destinations[0].wait()
    assert f"{_REMOTE}/cairn.pt" in bucket_objects(s3_env, s3_bucket)


def test_a_folder_dropped_on_every_rank_is_forgotten_and_one_stored_on_some_ranks_only_stays(
    tmp_path: Path, uploads_to_the_store: Logger
) -> None:
    uploads = ShardedUploads()
    record = uploads.register(uploads_to_the_store, str(_folder(tmp_path)), _REMOTE, pointer=None, overwrite=False)
    uploads.drop(record, RuntimeError("the write failed"))
    notes = uploads.notes()
    assert notes.slots == (1, 0, 0), "not stored, not failed, forgotten here"
    uploads.settle(uploads_to_the_store, wait=False, agreed=notes.agreed([1, 0, 1]))  # another rank still knows it
    assert uploads.in_flight
    uploads.settle(uploads_to_the_store, wait=False, agreed=notes)
    assert not uploads.in_flight


@pytest.mark.parametrize("cause", ["upload", "start"])
def test_a_failure_in_the_reduced_notes_raises_the_error_gathered_statuses_raise(
    tmp_path: Path, uploads_to_a_missing_bucket: Logger, cause: str
) -> None:
    """A shard upload that failed (the bucket is gone) or a folder whose uploads could not start (it is missing):
    the reduced notes say some rank failed, the statuses are gathered for the reason, and the error is the one the
    gathering settle raises, naming the rank, the file and why."""
    folder = str(_folder(tmp_path)) if cause == "upload" else str(tmp_path / "missing")
    raised = []
    for agreed in (True, False):
        uploads = ShardedUploads()
        record = uploads.register(uploads_to_a_missing_bucket, folder, _REMOTE, pointer=None, overwrite=True)
        uploads.start(uploads_to_a_missing_bucket, record)
        for _, upload in record.uploads or ():
            upload.exception(timeout=60)  # the real signal: the upload has failed
        notes = uploads.notes()
        assert notes.slots == (1, 1, 1) and notes.any_failed
        with pytest.raises(ObjectStoreError, match="failed on rank 0") as error:
            uploads.settle(uploads_to_a_missing_bucket, wait=False, agreed=notes if agreed else None)
        assert not uploads.in_flight and record.settled.exception(timeout=0) is error.value
        raised.append(re.sub(r"/[0-9a-f]{16}-", "/<staged>-", str(error.value)))  # each upload's own staged name
    assert raised[0] == raised[1]
    assert ("the bucket does not exist" if cause == "upload" else "missing: FileNotFoundError") in raised[0]


def test_reduced_notes_must_cover_the_same_folders(tmp_path: Path, uploads_to_the_store: Logger) -> None:
    uploads = ShardedUploads()
    uploads.register(uploads_to_the_store, str(_folder(tmp_path)), _REMOTE, pointer=None, overwrite=False)
    with pytest.raises(ValueError, match="2 agreed integers for 1 folders in flight"):
        uploads.notes().agreed([0, 1])
