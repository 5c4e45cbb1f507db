"""What the conformance suite cannot say about GCS and OCI: which API each path speaks, and how each one fails."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cairn.errors import ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, TransientStoreError
from cairn.storage.gcs import GCSObjectStore
from cairn.storage.oci import OCIObjectStore
from cairn.storage.uri import store_from_uri
from store_servers.faulty_proxy import FaultyProxy
from store_servers.gcs import new_gcs_bucket
from store_servers.moto import CREDENTIALS
from store_servers.oci import OCIStandIn


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


_CALLS = ("upload", "download", "size", "list")


@pytest.fixture
def hmac_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GCS_KEY", CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("GCS_SECRET", CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def no_hmac_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GCS_KEY", raising=False)
    monkeypatch.delenv("GCS_SECRET", raising=False)


def _assert_bucket_is_missing(store: ObjectStore, tmp_path: Path, calls: tuple[str, ...] = _CALLS) -> None:
    """Each call names the bucket as the problem, at once: not a missing object, not a failure worth retrying."""
    source = _file(tmp_path, "x.bin", 100)
    run = {
        "upload": lambda: store.upload_object("x.bin", str(source)),
        "download": lambda: store.download_object("x.bin", str(tmp_path / "out.bin")),
        "size": lambda: store.get_object_size("x.bin"),
        "list": lambda: store.list_objects(""),
    }
    for what in calls:
        with pytest.raises(ObjectStoreError, match="bucket.*(does not exist|create it)") as excinfo:
            run[what]()
        assert not isinstance(excinfo.value, (ObjectNotFoundError, TransientStoreError)), what


# -- GCS ----------------------------------------------------------------------------------------------------------


def test_gcs_hmac_speaks_the_s3_api(gcs_hmac_store: GCSObjectStore, moto_endpoint: str, tmp_path: Path) -> None:
    import boto3

    assert gcs_hmac_store.uses_hmac
    source = _file(tmp_path, "model.pt", 5000)
    gcs_hmac_store.upload_object("run/model.pt", str(source))
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    body = s3.get_object(Bucket=gcs_hmac_store.bucket, Key="conformance/run/model.pt")["Body"].read()
    assert body == source.read_bytes()
    assert gcs_hmac_store.get_uri("run/model.pt") == f"gs://{gcs_hmac_store.bucket}/conformance/run/model.pt"


def test_gcs_hmac_asks_boto3_for_no_default_checksums(gcs_hmac_store: GCSObjectStore) -> None:
    """boto3 >= 1.36 sends aws-chunked uploads with CRC32 trailers unless told not to; GCS's XML API may refuse them."""
    config = gcs_hmac_store._interop._client.meta.config  # type: ignore[union-attr]
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"


def test_gcs_default_credentials_path_is_used_without_hmac_keys(gcs_store: GCSObjectStore) -> None:
    assert not gcs_store.uses_hmac


def test_gcs_big_files_go_up_in_chunks(gcs_store: GCSObjectStore, tmp_path: Path) -> None:
    """A resumable upload reads one chunk at a time; a single-request upload would read the file at once."""
    source = _file(tmp_path, "big.bin", 12 << 20)
    progress: list[tuple[int, int]] = []
    gcs_store.upload_object("big.bin", str(source), callback=lambda done, total: progress.append((done, total)))
    assert progress == [(8 << 20, 12 << 20), (12 << 20, 12 << 20)]
    gcs_store.verify_upload("big.bin", str(source))


def test_a_gcs_download_that_keeps_arriving_cut_off_fails_after_cairns_retries_alone(
    gcs_emulator: str, no_hmac_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One request per attempt, then an error that names the object: the SDK's own retries (30 s of them, under
    each of cairn's attempts) once made this take about a minute."""
    bucket = new_gcs_bucket()
    proxy = FaultyProxy(gcs_emulator).start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.endpoint)
        store = GCSObjectStore(bucket, prefix="p", num_attempts=3)
        # uploaded through the proxy, so that the emulator's download link (mediaLink) leads through it too
        store.upload_object("run/ckpt.pt", str(_file(tmp_path, "ckpt.pt", 200_000)))
        proxy.cut_downloads = "alt=media"  # the object's bytes arrive cut off; its metadata arrives whole
        started = time.monotonic()
        with pytest.raises(TransientStoreError, match=rf"^could not download gs://{bucket}/p/run/ckpt\.pt: "):
            store.download_object("run/ckpt.pt", str(tmp_path / "out.pt"))
        took = time.monotonic() - started
        store.close()
    finally:
        proxy.stop()
    assert proxy.counts["cut"] == 3, proxy.counts  # one download request for each of cairn's three attempts
    assert took < 10, f"took {took:.1f} s"  # cairn's pauses: at most 0.2 s, then 0.4 s
    assert not (tmp_path / "out.pt").exists()


def test_gcs_missing_bucket_is_named(gcs_emulator: str, no_hmac_env: None, tmp_path: Path) -> None:
    _assert_bucket_is_missing(GCSObjectStore("cairn-no-such-bucket"), tmp_path)


def test_gcs_hmac_missing_bucket_is_named(moto_endpoint: str, hmac_env: None, tmp_path: Path) -> None:
    store = GCSObjectStore("cairn-no-such-bucket", endpoint_url=moto_endpoint)
    _assert_bucket_is_missing(store, tmp_path, ("download", "size", "list"))


def test_gcs_hmac_upload_to_missing_bucket_is_not_retried(moto_endpoint: str, hmac_env: None, tmp_path: Path) -> None:
    store = GCSObjectStore("cairn-no-such-bucket", endpoint_url=moto_endpoint)
    _assert_bucket_is_missing(store, tmp_path, ("upload",))


def test_gcs_uri(hmac_env: None) -> None:
    store = GCSObjectStore("b", prefix="/runs/exp1/")
    assert store.get_uri("ckpt/ep1.pt") == "gs://b/runs/exp1/ckpt/ep1.pt"


def test_store_from_gs_uri_builds_a_gcs_store(hmac_env: None) -> None:
    store, path = store_from_uri("gs://b/path/to/ckpt.pt")
    assert isinstance(store, GCSObjectStore)
    assert (store.bucket, path) == ("b", "path/to/ckpt.pt")


def test_gcs_chunk_size_must_suit_resumable_uploads(hmac_env: None) -> None:
    with pytest.raises(ValueError, match="256 KiB"):
        GCSObjectStore("b", chunk_size=1000)


# -- OCI ----------------------------------------------------------------------------------------------------------


def test_oci_missing_bucket_is_named(oci_server: OCIStandIn, oci_config: dict[str, str], tmp_path: Path) -> None:
    store = OCIObjectStore("cairn-no-such-bucket", config=oci_config, endpoint=oci_server.endpoint)
    _assert_bucket_is_missing(store, tmp_path)


def test_oci_uri(oci_config: dict[str, str]) -> None:
    store = OCIObjectStore("b", prefix="runs/exp1", config=oci_config, endpoint="http://127.0.0.1:9")
    assert store.get_uri("ckpt/ep1.pt") == "oci://b/runs/exp1/ckpt/ep1.pt"


def test_oci_listing_follows_next_start_with(oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path) -> None:
    source = _file(tmp_path, "x.bin", 10)
    names = [f"many/{i}.bin" for i in range(5)]
    for name in names:
        oci_store.upload_object(name, str(source))
    before = len(oci_server.requests)
    assert oci_store.list_objects("many/") == names
    pages = [line for line in oci_server.requests[before:] if line.startswith("GET") and "/o?" in line]
    assert len(pages) == 3  # 2 + 2 + 1 names, at the stand-in's page size of 2
    assert all("start=" in line for line in pages[1:])


def test_oci_big_files_go_up_in_parts_and_verify(
    oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path
) -> None:
    source = _file(tmp_path, "big.bin", 12 << 20)
    before = len(oci_server.requests)
    oci_store.upload_object("big.bin", str(source))
    sent = oci_server.requests[before:]
    assert sum(1 for line in sent if line.startswith("PUT") and "uploadPartNum=" in line) == 3
    oci_store.verify_upload("big.bin", str(source))
    same_size = _file(tmp_path, "other.bin", 12 << 20)
    with pytest.raises(ObjectStoreError, match="checksum"):
        oci_store.verify_upload("big.bin", str(same_size))


def test_oci_failed_multipart_upload_is_aborted(
    oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path
) -> None:
    source = _file(tmp_path, "big.bin", 12 << 20)
    oci_server.fail_next(100, status=400, method="PUT")  # every part refused
    try:
        with pytest.raises(ObjectStoreError, match="400"):
            oci_store.upload_object("big.bin", str(source))
    finally:
        oci_server.clear_failures()
    assert oci_server.buckets[oci_store.bucket].uploads == {}
    assert oci_store.list_objects("") == []


def test_oci_transient_failures_are_retried(oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path) -> None:
    """More 503s than the SDK's own attempts: cairn's retry (TransientStoreError) carries the call through."""
    oci_store.upload_object("x.bin", str(_file(tmp_path, "x.bin", 1000)))
    oci_server.fail_next(3, status=503)
    assert oci_store.get_object_size("x.bin") == 1000


def test_oci_bad_signature_is_not_retried(oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path) -> None:
    oci_store.upload_object("x.bin", str(_file(tmp_path, "x.bin", 1000)))
    oci_server.fail_next(1, status=401)
    before = len(oci_server.requests)
    with pytest.raises(ObjectStoreError, match="fingerprint"):
        oci_store.get_object_size("x.bin")
    assert len(oci_server.requests) == before + 1


def test_oci_unusable_config_says_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ObjectStoreError, match="OCI config is unusable"):
        OCIObjectStore("b", config_file=str(tmp_path / "no-such-config"))


def test_store_from_oci_uri_builds_an_oci_store(oci_config: dict[str, str]) -> None:
    store, path = store_from_uri("oci://b/path/x.pt", {"config": oci_config, "namespace": "ns"})
    assert isinstance(store, OCIObjectStore)
    assert (store.bucket, store.namespace, path) == ("b", "ns", "path/x.pt")
