"""One conformance suite, run against every store on a real server (or, for OCI, a local HTTP stand-in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cairn.errors import ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore

KINDS = ["s3", "gcs", "gcs_hmac", "oci", "libcloud_s3", "libcloud_azure"]  # each store adds its kind


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest) -> ObjectStore:
    try:
        return request.getfixturevalue(f"{request.param}_store")
    except pytest.FixtureLookupError:
        pytest.fail(f"no fixture {request.param}_store: every store must pass this suite")


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_upload_list_size_download_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = _file(tmp_path, "a.bin", 300_000)
    progress: list[tuple[int, int]] = []
    store.upload_object("run/ckpt/a.bin", str(source), callback=lambda done, total: progress.append((done, total)))
    store.verify_upload("run/ckpt/a.bin", str(source))
    assert store.get_object_size("run/ckpt/a.bin") == 300_000
    assert "run/ckpt/a.bin" in store.list_objects("run/")
    assert store.list_objects("nothing-here/") == []
    target = tmp_path / "out" / "a.bin"
    store.download_object("run/ckpt/a.bin", str(target))
    assert target.read_bytes() == source.read_bytes()
    assert store.get_uri("run/ckpt/a.bin").endswith("/run/ckpt/a.bin")
    if progress:
        assert progress[-1] == (300_000, 300_000)


def test_a_large_file_survives_the_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = _file(tmp_path, "big.bin", 12 << 20)  # above the stores' multipart thresholds in these tests
    store.upload_object("big.bin", str(source))
    store.verify_upload("big.bin", str(source))
    store.download_object("big.bin", str(tmp_path / "copy.bin"))
    assert (tmp_path / "copy.bin").read_bytes() == source.read_bytes()


def test_a_missing_object_is_file_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError) as excinfo:
        store.download_object("no/such/object.pt", str(tmp_path / "x"))
    assert isinstance(excinfo.value, FileNotFoundError)
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError):
        store.get_object_size("no/such/object.pt")


def test_download_does_not_replace_a_file_unless_asked(store: ObjectStore, tmp_path: Path) -> None:
    source = _file(tmp_path, "c.bin", 1000)
    store.upload_object("c.bin", str(source))
    existing = tmp_path / "existing"
    existing.write_text("keep me")
    with pytest.raises(FileExistsError):
        store.download_object("c.bin", str(existing))
    assert existing.read_text() == "keep me"
    store.download_object("c.bin", str(existing), overwrite=True)
    assert existing.read_bytes() == source.read_bytes()


def test_a_changed_object_fails_verification(store: ObjectStore, tmp_path: Path) -> None:
    store.upload_object("d.bin", str(_file(tmp_path, "d.bin", 2000)))
    other = _file(tmp_path, "other.bin", 2001)
    with pytest.raises(ObjectStoreError, match="incomplete|checksum"):
        store.verify_upload("d.bin", str(other))


def test_uploading_a_missing_file_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        store.upload_object("e.bin", str(tmp_path / "absent.bin"))


def test_delete_removes_that_one_object_and_a_missing_one_is_no_error(store: ObjectStore, tmp_path: Path) -> None:
    """Deleting is one object, never a prefix; deleting what is not there (a retried delete whose answer was lost,
    another prune that got there first, a name that only prefixes others) passes quietly, as S3's DELETE does."""
    for name in ("run/a.bin", "run/ab.bin", "run/sub/c.bin"):
        store.upload_object(name, str(_file(tmp_path, name.replace("/", "-"), 1000)))
    store.delete_object("run/a.bin")
    assert store.list_objects("run/") == ["run/ab.bin", "run/sub/c.bin"]
    with pytest.raises(ObjectNotFoundError):
        store.get_object_size("run/a.bin")
    store.delete_object("run/a.bin")  # already gone
    store.delete_object("run/sub")  # a prefix of an object, not an object: nothing under it goes
    store.delete_object("never/was.bin")
    assert store.list_objects("run/") == ["run/ab.bin", "run/sub/c.bin"]
    store.delete_object("run/sub/c.bin")
    assert store.list_objects("run/") == ["run/ab.bin"]


def test_delete_refuses_a_name_outside_the_prefix(store: ObjectStore, tmp_path: Path) -> None:
    store.upload_object("kept.bin", str(_file(tmp_path, "kept.bin", 10)))
    with pytest.raises(ValueError, match="leads outside"):
        store.delete_object("/kept.bin")
    assert store.list_objects("") == ["kept.bin"]
