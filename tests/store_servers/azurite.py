"""Azurite (Microsoft's Blob storage emulator) on 127.0.0.1, started once per test session, and the Libcloud stores.

``make test`` installs Azurite from npm into ``.venv/azurite``. Each test gets a fresh container; the Libcloud S3
store reaches the moto server of :mod:`store_servers.moto`, so both Libcloud drivers cairn documents run for real.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from store_servers.moto import CREDENTIALS, new_s3_bucket

__all__ = [
    "AZURITE_ACCOUNT",
    "AZURITE_KEY",
    "azure_container",
    "azure_provider_kwargs",
    "azurite_endpoint",
    "libcloud_azure_store",
    "libcloud_s3_store",
    "moto_provider_kwargs",
]

# Azurite's well-known development account, published in its README; it opens nothing but the local emulator.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_BINARY = Path(__file__).resolve().parents[2] / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_containers = itertools.count()


@pytest.fixture(scope="session")
def azurite_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a running Azurite Blob service; its data lives in a temporary folder."""
    if not _BINARY.exists():
        pytest.fail(f"Azurite is not installed at {_BINARY}: run `make test`, which installs it from npm")
    folder = tmp_path_factory.mktemp("azurite")
    port = _free_port()
    command = [str(_BINARY), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(folder / "data")]
    command += ["--silent", "--disableTelemetry", "--skipApiVersionCheck"]
    with open(folder / "azurite.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_listening(process, port, folder / "azurite.log")
            yield "127.0.0.1", port
        finally:
            _stop(process)


def azure_provider_kwargs(endpoint: tuple[str, int], secret: str = AZURITE_KEY) -> dict[str, Any]:
    host, port = endpoint
    return {"key": AZURITE_ACCOUNT, "secret": secret, "host": host, "port": port, "secure": False}


def moto_provider_kwargs(moto_endpoint: str) -> dict[str, Any]:
    parts = urlsplit(moto_endpoint)
    return {
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "host": parts.hostname,
        "port": parts.port,
        "secure": False,
    }


@pytest.fixture
def azure_container(azurite_endpoint: tuple[str, int]) -> str:
    """A new, empty container (Azure wants 3 to 63 lowercase letters, digits and hyphens)."""
    from libcloud.storage.providers import get_driver

    name = f"cairn-test-{os.getpid()}-{next(_containers)}"
    get_driver("azure_blobs")(**azure_provider_kwargs(azurite_endpoint)).create_container(name)
    return name


@pytest.fixture
def libcloud_azure_store(azurite_endpoint: tuple[str, int], azure_container: str) -> Iterator[Any]:
    from cairn.storage.libcloud import LibcloudObjectStore

    store = LibcloudObjectStore(
        "azure_blobs", azure_container, azure_provider_kwargs(azurite_endpoint), prefix="conformance"
    )
    yield store
    store.close()


@pytest.fixture
def libcloud_s3_store(moto_endpoint: str) -> Iterator[Any]:
    """libcloud's plain "s3" driver (region us-east-1, moto's default) pointed at moto by host and port."""
    from cairn.storage.libcloud import LibcloudObjectStore

    store = LibcloudObjectStore(
        "s3", new_s3_bucket(moto_endpoint), moto_provider_kwargs(moto_endpoint), prefix="conformance"
    )
    yield store
    store.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll the port until Azurite answers; fail early, with its log, if it exits or takes too long."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Azurite exited with {process.returncode} before listening:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    _stop(process)
    pytest.fail(
        f"Azurite did not listen on 127.0.0.1:{port} within {_START_TIMEOUT_S:.0f} s:\n{log.read_text()[-2000:]}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(_STOP_TIMEOUT_S)
