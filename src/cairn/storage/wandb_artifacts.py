"""W&B artifacts as an object store: an artifact's file (``"<name>:latest"``, ``"<name>:v3"``,
``"entity/project/<name>:alias"``) downloaded through W&B's public API and checked against the MD5 W&B records,
behind the same :class:`~cairn.storage.base.ObjectStore` protocol as every other store, for
:class:`~cairn.loggers.wandb.WandBLogger` as a ``load_object_store``. ``wandb`` is imported on first use.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
from typing import Any

from cairn.errors import ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback

__all__ = ["WandBArtifactStore", "import_wandb", "short_error"]


def import_wandb() -> Any:
    """The ``wandb`` package (the real one: this module's own name is only ``cairn.loggers.wandb``), or an
    ImportError that says how to install it."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError(
            "WandBLogger needs the wandb package, which is not installed: pip install 'cairn[wandb]'"
        ) from err
    return wandb


class WandBArtifactStore(ObjectStore):
    """W&B artifacts read as objects: the name is an artifact's path and alias, the object its one file.

    Only downloads: checkpoints reach W&B through :meth:`WandBLogger.log_checkpoint`. The file is checked against
    the MD5 digest W&B's manifest records before it is handed over, and cairn then verifies it as any download.
    """

    scheme = "wandb-artifact"
    keeps_dot_segments = True

    def __init__(self, entity: str | None = None, project: str | None = None, api: Any = None) -> None:
        super().__init__("artifacts")
        self.entity, self.project = entity, project
        self._api = api

    def get_uri(self, name: str) -> str:
        return f"{self.scheme}:{self._path(name)}"

    def _path(self, name: str) -> str:
        """The artifact's full path: the logger's entity and project before a bare ``"<name>:alias"``."""
        parts = name.split("/")
        if len(parts) == 1 and self.project:
            parts = [self.project, *parts]
        if len(parts) == 2 and self.entity:
            parts = [self.entity, *parts]
        return "/".join(parts)

    @property
    def api(self) -> Any:
        if self._api is None:
            wandb = import_wandb()
            try:
                self._api = wandb.Api()
            except Exception as err:
                raise ObjectStoreError(f"could not reach W&B to read artifacts: {short_error(err)}") from None
        return self._api

    def _artifact(self, key: str) -> Any:
        """The artifact ``key`` names, or ObjectNotFoundError (also for names inside one: a sharded folder's)."""
        path = self._path(key)
        if ":" not in path.rsplit("/", 1)[-1]:
            raise ObjectNotFoundError(f"{path!r} names no artifact version: add an alias, e.g. {path}:latest")
        try:
            return self.api.artifact(path)
        except Exception as err:
            if _means_missing(err):
                raise ObjectNotFoundError(f"W&B has no artifact {path}") from None
            raise ObjectStoreError(f"W&B could not find the artifact {path}: {short_error(err)}") from None

    def _entry(self, key: str) -> tuple[Any, Any]:
        artifact = self._artifact(key)
        try:
            entries = list(artifact.manifest.entries.values())
        except Exception as err:
            raise ObjectStoreError(
                f"could not read the manifest of {self._path(key)} from W&B: {short_error(err)}"
            ) from None
        if len(entries) != 1:
            raise ObjectStoreError(
                f"the W&B artifact {self._path(key)} holds {len(entries)} files, not one checkpoint: name an "
                "artifact that WandBLogger(log_artifacts=True) logged"
            )
        return artifact, entries[0]

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        artifact, entry = self._entry(key)
        with tempfile.TemporaryDirectory(prefix="cairn-wandb-") as folder:
            try:
                local = artifact.get_entry(entry.path).download(root=folder)
            except Exception as err:
                raise ObjectStoreError(f"could not download {self._path(key)} from W&B: {short_error(err)}") from None
            if _md5_b64(str(local)) != entry.digest:
                raise ObjectStoreError(
                    f"the file of {self._path(key)} does not match the digest W&B records: download it again"
                )
            shutil.move(str(local), filename)
        if callback is not None:
            callback(int(entry.size or 0), int(entry.size or 0))

    def _size(self, key: str) -> int:
        return int(self._entry(key)[1].size or 0)

    def _list(self, key_prefix: str) -> list[str]:
        del key_prefix
        return []

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        raise ObjectStoreError("a W&B artifact is written by WandBLogger(log_artifacts=True), not uploaded as a file")


def _md5_b64(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def _means_missing(err: Exception) -> bool:
    text = str(err).lower()
    return "not found" in text or "does not exist" in text or "404" in text


def short_error(err: Exception) -> str:
    """The first line of an SDK error, without anything that looks like a key."""
    first = (str(err).splitlines() or [type(err).__name__])[0][:300]
    key = os.environ.get("WANDB_API_KEY")
    return first.replace(key, "***") if key else first
