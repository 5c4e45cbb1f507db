"""Any Apache Libcloud storage driver (Azure Blobs, MinIO, Backblaze B2, OpenStack Swift, ...) as an object store.

Libcloud speaks to dozens of providers through one driver interface, so this store covers whatever has no store of
its own in cairn. Its exceptions are turned into cairn's here; provider secrets never reach a message or a repr.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from typing import Any

from cairn.errors import ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback, TransientStoreError, file_md5

__all__ = ["LibcloudObjectStore"]

_CHUNK = 1 << 20  # bytes per read when streaming; libcloud's base default (8 KiB) makes large files slow
_SECRET_WORDS = ("secret", "password", "token", "credential")
_STATUS = re.compile(r"(?:status[ _]?code|code)\s*[:=]?\s*(\d{3})\b", re.IGNORECASE)
_MD5 = re.compile(r"[0-9a-f]{32}")


class LibcloudObjectStore(ObjectStore):
    """A container reached through ``libcloud.storage.providers.get_driver(provider)(**provider_kwargs)``.

    ``provider`` is a value of ``libcloud.storage.types.Provider`` such as ``"s3"`` or ``"azure_blobs"``;
    ``provider_kwargs`` go to the driver as they are (``key``, ``secret``, and ``host``/``port``/``secure`` for a
    self-hosted or emulated endpoint). Give each thread its own store: libcloud's connection keeps per-request state.
    """

    scheme = "libcloud"
    keeps_dot_segments = False  # urllib3 folds them out of the request's URL: run/../../x would land at x

    def __init__(
        self,
        provider: str,
        container: str,
        provider_kwargs: dict[str, Any] | None = None,
        prefix: str = "",
        *,
        num_attempts: int = 3,
    ) -> None:
        super().__init__(container, prefix)
        kwargs = dict(provider_kwargs or {})
        self.num_attempts = num_attempts
        self._secrets = tuple(str(value) for name, value in kwargs.items() if _is_secret(name) and value)
        self.provider, driver_class = _driver_class(provider)
        self._driver = self._make_driver(driver_class, kwargs)
        self._container: Any = None

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """Without a callback, ``upload_object`` lets the driver check the MD5 the server computed; with one,
        the file goes through ``upload_object_via_stream``, the only route where libcloud shows how far it is."""
        with self._sdk_errors(key):
            container = self._get_container()
            if callback is None or os.path.getsize(filename) == 0:
                self._driver.upload_object(file_path=filename, container=container, object_name=key, verify_hash=True)
                if callback is not None:
                    callback(0, 0)
                return
            chunks = _counting_chunks(filename, callback)
            try:
                self._driver.upload_object_via_stream(iterator=chunks, container=container, object_name=key)
            finally:
                chunks.close()

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """Streams into ``filename`` (a temporary name the base class renames), counting bytes for progress and to
        notice a connection that ended early."""
        with self._sdk_errors(key):
            obj = self._driver.get_object(self.bucket, key)
            total, done = int(obj.size), 0
            with open(filename, "wb") as file:
                for chunk in self._driver.download_object_as_stream(obj, chunk_size=_CHUNK):
                    file.write(chunk)
                    done += len(chunk)
                    if callback is not None:
                        callback(done, total)
        if done != total:
            raise TransientStoreError(f"the download of {key!r} stopped after {done} of {total} bytes")

    def _size(self, key: str) -> int:
        with self._sdk_errors(key):
            return int(self._driver.get_object(self.bucket, key).size)

    def _list(self, key_prefix: str) -> list[str]:
        return [key for key, _ in self._list_with_sizes(key_prefix)]

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        with self._sdk_errors(key_prefix):
            container = self._get_container()
            objects = self._driver.iterate_container_objects(container, prefix=key_prefix or None)
            return [(obj.name, int(obj.size or 0)) for obj in objects]

    def _delete(self, key: str) -> None:
        """libcloud deletes an ``Object``, so the object is looked up first (``ObjectDoesNotExistError`` when it is
        not there, which ``delete_object`` lets pass); a driver that answers False refused the delete."""
        with self._sdk_errors(key):
            obj = self._driver.get_object(self.bucket, key)
            deleted = self._driver.delete_object(obj)
        if not deleted:
            raise ObjectStoreError(f"provider {self.provider!r} did not delete {key!r} (the driver answered False)")

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """Compare the MD5 the provider reports; None where it reports none (S3 multipart ETags, Azure's ETags)."""
        key = self.key(name)
        with self._sdk_errors(key):
            obj = self._driver.get_object(self.bucket, key)
        remote = self._reported_md5(obj)
        return None if remote is None else remote == file_md5(filename)

    def close(self) -> None:
        """libcloud keeps a requests session per driver; close it so its sockets do not outlive the store."""
        session = getattr(getattr(self._driver.connection, "connection", None), "session", None)
        if session is not None:
            session.close()

    # -- helpers --------------------------------------------------------------------------------------------------

    def _make_driver(self, driver_class: Any, kwargs: dict[str, Any]) -> Any:
        """Build the driver, turning a wrong argument into a ValueError that names arguments but no values."""
        try:
            return driver_class(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"could not set up libcloud's {self.provider!r} driver from provider_kwargs with keys "
                f"{sorted(kwargs)}: {self._scrub(str(err))}; check them against the driver's documentation"
            ) from None

    def _get_container(self) -> Any:
        """The driver's Container, looked up once: most drivers check that it exists on the way."""
        if self._container is None:
            self._container = self._driver.get_container(self.bucket)
        return self._container

    def _reported_md5(self, obj: Any) -> str | None:
        """A plain hex MD5 from what the driver reported, if any: Azure puts it in ``extra``, S3 in the ETag."""
        candidates = [(obj.extra or {}).get("md5_hash")]
        if getattr(self._driver, "hash_type", "md5") == "md5":
            candidates.append(obj.hash)
        for value in candidates:
            text = str(value or "").strip('"').lower()
            if _MD5.fullmatch(text):
                return text
        return None

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _translate(self, error: Exception, key: str) -> ObjectStoreError | None:
        from http.client import HTTPException

        from libcloud.common.exceptions import BaseHTTPError
        from libcloud.common.types import InvalidCredsError, LibcloudError
        from libcloud.storage.types import ContainerDoesNotExistError, ObjectDoesNotExistError, ObjectHashMismatchError

        if isinstance(error, ObjectDoesNotExistError):
            return ObjectNotFoundError(f"no object {key!r} in container {self.bucket!r}")
        if isinstance(error, ContainerDoesNotExistError):
            return ObjectStoreError(
                f"container {self.bucket!r} does not exist at provider {self.provider!r}: create it or fix the name"
            )
        if isinstance(error, InvalidCredsError):
            return ObjectStoreError(
                f"provider {self.provider!r} refused the credentials: check the key and secret in provider_kwargs "
                f"and that they may use container {self.bucket!r}"
            )
        if isinstance(error, ObjectHashMismatchError):
            return TransientStoreError(f"{key!r} arrived with another checksum than the file's: it changed in transit")
        message = self._scrub(str(getattr(error, "value", None) or error))
        status = _status_of(error, message)
        if isinstance(error, (OSError, HTTPException)) or (status is not None and (status >= 500 or status == 429)):
            return TransientStoreError(f"{type(error).__name__}: {message}")
        if isinstance(error, (LibcloudError, BaseHTTPError)):
            return ObjectStoreError(f"provider {self.provider!r} refused the request: {message}")
        return None


def _driver_class(provider: object) -> tuple[str, Any]:
    """The provider's name and driver class. ``Provider.S3`` is the string ``"s3"``; ``"S3"`` is accepted too."""
    try:
        from libcloud.storage.providers import DRIVERS, get_driver
    except ImportError:
        raise ImportError("LibcloudObjectStore needs apache-libcloud: pip install 'cairn[libcloud]'") from None
    name = provider.strip().lower() if isinstance(provider, str) else ""
    try:
        return name, get_driver(name)
    except AttributeError:
        raise ValueError(
            f"unknown libcloud storage provider {provider!r}: use a value of libcloud.storage.types.Provider, one of "
            f"{', '.join(sorted(DRIVERS))}"
        ) from None


def _is_secret(argument: str) -> bool:
    return any(word in argument.lower() for word in _SECRET_WORDS)


def _status_of(error: Exception, message: str) -> int | None:
    """libcloud carries the HTTP status in an attribute for some errors, and only in the message for the rest."""
    for attribute in ("http_code", "code"):
        value = getattr(error, attribute, None)
        if isinstance(value, int):
            return value
    match = _STATUS.search(message)
    return int(match.group(1)) if match else None


def _counting_chunks(filename: str, callback: ProgressCallback) -> Generator[bytes, None, None]:
    """The file in chunks, reporting (done, total) as libcloud takes each: the only progress libcloud exposes."""
    total = os.path.getsize(filename)
    done = 0
    with open(filename, "rb") as file:
        while chunk := file.read(_CHUNK):
            yield chunk
            done += len(chunk)
            callback(done, total)
