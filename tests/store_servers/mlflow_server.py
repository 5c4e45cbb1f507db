"""A real ``mlflow server`` on 127.0.0.1, started once per test session by the tests that ask for it.

Its runs live in SQLite and its artifacts in a local folder, both in a temporary folder; ``--serve-artifacts``
makes clients upload and download through the server (``mlflow-artifacts:``), as with a team's shared server.
Readiness is the server's own health endpoint answering; the server (and the workers it spawns, in its own process
group) is stopped at the end. A test module imports the fixture
(``from store_servers.mlflow_server import mlflow_server_fixture``) and asks for ``mlflow_server``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["mlflow_server_fixture"]

_BINARY = Path(sys.executable).with_name("mlflow")
_START_TIMEOUT_S = 120.0  # a cold start on a busy 2-core machine (it creates its SQLite tables, then spawns uvicorn)
_STOP_TIMEOUT_S = 10.0


@pytest.fixture(scope="session", name="mlflow_server")
def mlflow_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The tracking URI (``http://127.0.0.1:<port>``) of a running MLflow server with its own empty store."""
    if not _BINARY.exists():
        pytest.fail(f"mlflow is not installed beside {sys.executable}: install the dev extras (`make test` does)")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    command = [str(_BINARY), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += ["--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
    environment = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true"}
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=folder, env=environment, start_new_session=True
        )
        try:
            uri = f"http://127.0.0.1:{port}"
            _wait_until_healthy(process, uri, folder / "server.log")
            yield uri
        finally:
            _stop(process)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen[bytes], uri: str, log: Path) -> None:
    """Poll ``/health`` until the server answers OK; fail early, with its log, if it exits or takes too long."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode} before serving:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    _stop(process)
    pytest.fail(
        f"mlflow server did not answer {uri}/health within {_START_TIMEOUT_S:.0f} s:\n{log.read_text()[-2000:]}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and the workers it spawned: the process group this fixture made for it (its own id). Its
    data is thrown away, so it is killed outright (a graceful stop of uvicorn's workers takes seconds)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(_STOP_TIMEOUT_S)
