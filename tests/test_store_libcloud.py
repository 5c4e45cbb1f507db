"""LibcloudObjectStore beyond the conformance suite: its errors, its secrets, its URI and its documented shape.

Everything runs against real servers: Azurite for Azure Blobs, moto for libcloud's S3 driver.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from cairn.errors import ObjectNotFoundError, ObjectStoreError
from cairn.storage.libcloud import LibcloudObjectStore
from cairn.storage.uri import store_from_uri
from store_servers.azurite import azure_provider_kwargs, moto_provider_kwargs
from store_servers.moto import CREDENTIALS, new_s3_bucket

WRONG_SECRET = base64.b64encode(b"cairn-test-not-the-azurite-key-0123456789").decode()


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture(params=["s3", "azure_blobs"])
def provider_and_kwargs(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Both drivers cairn documents, each pointed at its local server."""
    if request.param == "s3":
        return "s3", moto_provider_kwargs(request.getfixturevalue("moto_endpoint"))
    return "azure_blobs", azure_provider_kwargs(request.getfixturevalue("azurite_endpoint"))


def test_a_missing_container_is_an_error_that_names_it(
    provider_and_kwargs: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    provider, kwargs = provider_and_kwargs
    store = LibcloudObjectStore(provider, "no-such-container", kwargs)
    source = _file(tmp_path, "a.bin", 100)
    for attempt in (
        lambda: store.list_objects(""),
        lambda: store.upload_object("a.bin", str(source)),
        lambda: store.get_object_size("a.bin"),
        lambda: store.download_object("a.bin", str(tmp_path / "out.bin")),
    ):
        with pytest.raises(ObjectStoreError, match="container 'no-such-container' does not exist") as excinfo:
            attempt()
        assert not isinstance(excinfo.value, ObjectNotFoundError)  # a wrong setting, not a missing checkpoint
    assert not (tmp_path / "out.bin").exists()


def test_bad_credentials_are_a_cairn_error_without_the_secret(
    azurite_endpoint: tuple[str, int], azure_container: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = LibcloudObjectStore("azure_blobs", azure_container, azure_provider_kwargs(azurite_endpoint, WRONG_SECRET))
    source = _file(tmp_path, "a.bin", 100)
    caplog.set_level(logging.DEBUG)
    for attempt in (
        lambda: store.list_objects(""),
        lambda: store.upload_object("a.bin", str(source)),
        lambda: store.get_object_size("a.bin"),
        lambda: store.download_object("a.bin", str(tmp_path / "out.bin")),
    ):
        with pytest.raises(ObjectStoreError, match="refused the credentials") as excinfo:
            attempt()
        error = excinfo.value
        assert type(error).__module__.startswith("cairn.")
        assert WRONG_SECRET not in f"{error} {error!r}"
    assert WRONG_SECRET not in f"{store} {store!r}"
    assert WRONG_SECRET not in caplog.text


def test_store_from_uri_builds_a_libcloud_store(
    azurite_endpoint: tuple[str, int], azure_container: str, tmp_path: Path
) -> None:
    backend_kwargs = {"provider": "azure_blobs", "provider_kwargs": azure_provider_kwargs(azurite_endpoint)}
    store, path = store_from_uri(f"libcloud://{azure_container}/runs/one", backend_kwargs)
    assert isinstance(store, LibcloudObjectStore)
    assert (store.bucket, path) == (azure_container, "runs/one")
    source = _file(tmp_path, "ckpt.pt", 5000)
    store.upload_object(f"{path}/ckpt.pt", str(source))
    assert store.list_objects(path) == ["runs/one/ckpt.pt"]
    assert store.get_uri(f"{path}/ckpt.pt") == f"libcloud://{azure_container}/runs/one/ckpt.pt"
    store.close()


def test_the_documented_shape_works_against_moto(moto_endpoint: str, tmp_path: Path) -> None:
    bucket = new_s3_bucket(moto_endpoint)
    endpoint = moto_provider_kwargs(moto_endpoint)  # the reference's shape, plus where the local server listens
    store = LibcloudObjectStore(
        provider="s3",
        container=bucket,
        provider_kwargs={
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "host": endpoint["host"],
            "port": endpoint["port"],
            "secure": False,
        },
    )
    source = _file(tmp_path, "ckpt.pt", 11 << 20)  # libcloud's S3 driver streams downloads in 5 MiB chunks
    store.upload_object("run/ckpt.pt", str(source))
    store.verify_upload("run/ckpt.pt", str(source))
    assert store.list_objects("run/") == ["run/ckpt.pt"]
    progress: list[tuple[int, int]] = []
    target = tmp_path / "copy.pt"
    store.download_object("run/ckpt.pt", str(target), callback=lambda done, total: progress.append((done, total)))
    assert target.read_bytes() == source.read_bytes()
    assert [done for done, _ in progress] == sorted({done for done, _ in progress}) and len(progress) > 1
    assert progress[-1] == (11 << 20, 11 << 20)
    assert store.get_uri("run/ckpt.pt") == f"libcloud://{bucket}/run/ckpt.pt"
    store.close()


def test_same_size_other_content_fails_the_checksum(
    provider_and_kwargs: tuple[str, dict[str, Any]], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    provider, kwargs = provider_and_kwargs
    store = request.getfixturevalue("libcloud_s3_store" if provider == "s3" else "libcloud_azure_store")
    source = _file(tmp_path, "a.bin", 5000)
    store.upload_object("a.bin", str(source))
    store.verify_upload("a.bin", str(source))
    with pytest.raises(ObjectStoreError, match="checksum"):
        store.verify_upload("a.bin", str(_file(tmp_path, "b.bin", 5000)))


@pytest.mark.parametrize("with_progress", [False, True], ids=["upload_object", "via_stream"])
def test_an_azure_blob_sent_in_blocks_keeps_an_md5_to_verify(
    libcloud_azure_store: LibcloudObjectStore, tmp_path: Path, with_progress: bool
) -> None:
    """libcloud sends Azure blobs above 4 MiB in blocks, each with its MD5, and declares the MD5 of the bytes it
    sent when it commits them: verification compares that, not the size alone, on both upload routes."""
    source = _file(tmp_path, "big.pt", (6 << 20) + 1)
    callback = (lambda done, total: None) if with_progress else None
    libcloud_azure_store.upload_object("run/big.pt", str(source), callback=callback)
    assert libcloud_azure_store._checksum_matches("run/big.pt", str(source)) is True
    with pytest.raises(ObjectStoreError, match="checksum mismatch"):
        libcloud_azure_store.verify_upload("run/big.pt", str(_file(tmp_path, "other.pt", (6 << 20) + 1)))


def test_an_unknown_provider_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match=r"libcloud\.storage\.types\.Provider.*azure_blobs.*s3"):
        LibcloudObjectStore("no_such_cloud", "bucket")


def test_provider_constants_and_capitals_are_accepted(azurite_endpoint: tuple[str, int]) -> None:
    from libcloud.storage.types import Provider

    for provider in (Provider.AZURE_BLOBS, "AZURE_BLOBS"):
        store = LibcloudObjectStore(provider, "bucket", azure_provider_kwargs(azurite_endpoint))
        assert store.provider == "azure_blobs"


def test_wrong_driver_arguments_are_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"could not set up libcloud's 'azure_blobs' driver.*\['secret'\]"):
        LibcloudObjectStore("azure_blobs", "bucket", {"secret": WRONG_SECRET})


def test_an_unreachable_server_is_retried_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kwargs = {"key": "k", "secret": WRONG_SECRET, "host": "127.0.0.1", "port": port, "secure": False}
    store = LibcloudObjectStore("s3", "bucket", kwargs, num_attempts=2)
    with pytest.raises(ObjectStoreError, match="could not list"):
        store.list_objects("")
    assert "attempt 1" in caplog.text
    assert WRONG_SECRET not in caplog.text


def test_a_libcloud_uri_without_a_provider_says_how_to_give_one(capsys: pytest.CaptureFixture[str]) -> None:
    """A URI names a container, never its provider: ``cairn ckpt verify libcloud://c/x`` or a bare
    ``store_from_uri`` must say what to pass, not raise Python's own missing-argument error."""
    with pytest.raises(ValueError, match="names a container but not its provider; pass backend_kwargs"):
        store_from_uri("libcloud://checkpoints/run/ep1.pt")
    from cairn.cli.main import main

    assert main(["ckpt", "verify", "libcloud://checkpoints/run/ep1.pt"]) != 0
    assert "not its provider" in capsys.readouterr().out
