"""gcp-storage-emulator on 127.0.0.1 for google-cloud-storage, and moto for GCS's HMAC (S3-compatible) path.

The emulator runs as a subprocess for the whole session, in memory; ``STORAGE_EMULATOR_HOST`` points
google-cloud-storage at it. Each test gets a fresh bucket. The HMAC path is GCS's XML API, which speaks S3, so its
tests run against the moto server with moto's test credentials given as ``GCS_KEY``/``GCS_SECRET``.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from store_servers.moto import CREDENTIALS, new_s3_bucket

__all__ = ["gcs_emulator", "gcs_hmac_store", "gcs_store"]

_buckets = itertools.count()
_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _emulator_command(port: int) -> list[str]:
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    if not executable.exists():
        pytest.skip("gcp-storage-emulator is not installed: pip install gcp-storage-emulator (the dev extra has it)")
    return [str(executable), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--quiet"]


def _wait_until_answering(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until the emulator answers HTTP at all (any status will do), for at most _START_TIMEOUT_S."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"gcp-storage-emulator exited with {process.returncode} before answering:\n{output}")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b?project=probe", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator did not answer on {url} within {_START_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The emulator's URL, with ``STORAGE_EMULATOR_HOST`` set to it for the session (and restored after)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("gcs-emulator") / "output.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(_emulator_command(port), stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    try:
        _wait_until_answering(url, process, log)
        os.environ["STORAGE_EMULATOR_HOST"] = url
        yield url
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def new_gcs_bucket() -> str:
    """A fresh bucket on the emulator (``STORAGE_EMULATOR_HOST`` must be set), made with google-cloud-storage."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    name = f"cairn-test-{os.getpid()}-{next(_buckets)}"
    client = storage.Client(project="cairn-emulator", credentials=AnonymousCredentials())
    client.create_bucket(name)
    client.close()
    return name


@pytest.fixture
def gcs_store(gcs_emulator: str, monkeypatch: pytest.MonkeyPatch):
    from cairn.storage.gcs import GCSObjectStore

    monkeypatch.delenv("GCS_KEY", raising=False)
    monkeypatch.delenv("GCS_SECRET", raising=False)
    store = GCSObjectStore(new_gcs_bucket(), prefix="conformance")
    yield store
    store.close()


@pytest.fixture
def gcs_hmac_store(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    from cairn.storage.gcs import GCSObjectStore

    monkeypatch.setenv("GCS_KEY", CREDENTIALS["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("GCS_SECRET", CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    store = GCSObjectStore(new_s3_bucket(moto_endpoint), prefix="conformance", endpoint_url=moto_endpoint)
    yield store
    store.close()
