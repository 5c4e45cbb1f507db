"""One MLflow run's artifacts as an object store (``runs:/<run_id>/<path>``): where :class:`~cairn.loggers.mlflow.
MLFlowLogger` puts checkpoints and reads them back from, behind the same :class:`~cairn.storage.base.ObjectStore`
protocol as every other store. Only MLflow's client API is used; ``mlflow`` is imported on first use.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cairn.atomic import temporary_path
from cairn.errors import ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback
from cairn.storage.transfer import stage_file

__all__ = ["MLflowArtifactStore", "import_mlflow", "is_missing", "redacted", "scrubbed"]


def import_mlflow() -> Any:
    """The ``mlflow`` package, imported on first use, with the extra to install named when it is missing."""
    try:
        import mlflow
    except ImportError as err:
        raise ImportError(
            "MLFlowLogger needs the MLflow client, which is not installed: pip install 'cairn[mlflow]'"
        ) from err
    return mlflow


def redacted(uri: str | None) -> str:
    """``uri`` with any user information, query and fragment removed: what a message may say of a tracking URI."""
    if not uri:
        return "the default tracking URI"
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def scrubbed(text: str) -> str:
    """A message from the MLflow client with any ``user:password@`` in a URL, and token-like query values, removed."""
    text = re.sub(r"(//)[^/@\s]+@", r"\1", text)
    return re.sub(r"([?&](?:token|access_token|key|sig|password)=)[^&\s]+", r"\1***", text, flags=re.IGNORECASE)


def is_missing(error: BaseException) -> bool:
    """Whether an MLflow client error says the run or artifact does not exist."""
    code = getattr(error, "error_code", None)
    return code == "RESOURCE_DOES_NOT_EXIST" or isinstance(error, FileNotFoundError)


class MLflowArtifactStore(ObjectStore):
    """One MLflow run's artifacts as an object store: names are artifact paths, URIs are ``runs:/<run_id>/<path>``.

    Uploads go through ``MlflowClient.log_artifact`` (the server's artifact proxy, or the artifact store it names),
    downloads through ``MlflowClient.download_artifacts``; sizes come from ``list_artifacts``. MLflow reports no
    checksum, so an upload is checked by size; a checkpoint is still verified by its content hash when it is read.
    MLflow's client cannot delete an artifact, so neither can this store.
    """

    scheme = "runs"
    keeps_dot_segments = False  # artifact paths are paths: a '..' would leave the run's folder

    def __init__(self, client: Any, run_id: str, prefix: str = "") -> None:
        super().__init__(run_id, prefix)
        self._client = client

    @property
    def run_id(self) -> str:
        return self.bucket

    def get_uri(self, name: str) -> str:
        return f"runs:/{self.run_id}/{self.key(name)}"

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        folder, base = posixpath.split(key)
        with self._sdk_errors(key), _named(filename, base) as local:
            self._client.log_artifact(self.run_id, local, folder or None)
        if callback is not None:
            size = os.path.getsize(filename)
            callback(size, size)

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        self._size(key)  # a missing artifact (or a folder) is ObjectNotFoundError, before anything is fetched
        scratch = tempfile.mkdtemp(prefix=".cairn-mlflow-", dir=os.path.dirname(os.path.abspath(filename)))
        try:
            with self._sdk_errors(key):
                local = self._client.download_artifacts(self.run_id, key, scratch)
            os.replace(local, filename)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if callback is not None:
            size = os.path.getsize(filename)
            callback(size, size)

    def _size(self, key: str) -> int:
        folder = posixpath.dirname(key)
        for entry in self._listed(folder, key):
            if entry.path == key and not entry.is_dir:
                return int(entry.file_size or 0)
        raise ObjectNotFoundError(f"{self.get_uri(key[len(self.prefix) :])} does not exist")

    def _list(self, key_prefix: str) -> list[str]:
        return [key for key, _ in self._list_with_sizes(key_prefix)]

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        """Every file under the folder that holds ``key_prefix`` whose path starts with it (MLflow lists one folder
        at a time: sub-folders are walked only where they can hold a match)."""
        found: list[tuple[str, int]] = []
        folders = [key_prefix.rstrip("/") if key_prefix.endswith("/") else posixpath.dirname(key_prefix)]
        while folders:
            folder = folders.pop()
            for entry in self._listed(folder, key_prefix):
                reachable = entry.path.startswith(key_prefix) or key_prefix.startswith(entry.path + "/")
                if entry.is_dir and reachable:
                    folders.append(entry.path)
                elif not entry.is_dir and entry.path.startswith(key_prefix):
                    found.append((entry.path, int(entry.file_size or 0)))
        return found

    def _listed(self, folder: str, key: str) -> list[Any]:
        with self._sdk_errors(key):
            return list(self._client.list_artifacts(self.run_id, folder or None))

    def _translate(self, error: Exception, key: str) -> ObjectStoreError | None:
        uri = f"runs:/{self.run_id}/{key}"
        if is_missing(error):
            return ObjectNotFoundError(f"{uri} does not exist")
        return ObjectStoreError(f"MLflow refused {uri}: {scrubbed(str(error))}")


@contextlib.contextmanager
def _named(filename: str, base: str) -> Iterator[str]:
    """``filename`` under the name ``base`` (``log_artifact`` keeps a file's own name): itself when the names agree,
    else a hard link (a copy across filesystems) in a hidden temporary folder beside it, removed afterwards."""
    if os.path.basename(filename) == base:
        yield filename
        return
    folder = temporary_path(os.path.join(os.path.dirname(os.path.abspath(filename)), "cairn-mlflow-staging"))
    os.mkdir(folder)
    try:
        staged = os.path.join(folder, base)
        stage_file(filename, staged)
        yield staged
    finally:
        shutil.rmtree(folder, ignore_errors=True)
