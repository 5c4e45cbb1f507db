"""Google Cloud Storage: google-cloud-storage with default credentials, or HMAC keys through GCS's S3-compatible API.

With ``GCS_KEY`` and ``GCS_SECRET`` in the environment (HMAC keys, which is what most training clusters outside
Google get), requests go to GCS's XML API through cairn's S3 store; otherwise through google-cloud-storage and
Application Default Credentials. ``STORAGE_EMULATOR_HOST`` points the latter at an emulator, anonymously;
``GCS_ENDPOINT_URL`` (when ``endpoint_url`` is not given) points the former at another S3-compatible address.
"""

from __future__ import annotations

import base64
import os
from typing import IO, Any

from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback, TransientStoreError, file_md5
from cairn.storage.s3 import S3ObjectStore

__all__ = ["GCS_XML_ENDPOINT", "GCSObjectStore"]

MiB = 1 << 20
GCS_XML_ENDPOINT = "https://storage.googleapis.com"
_CHUNK_GRANULARITY = 256 << 10  # resumable uploads send chunks in multiples of 256 KiB
#: google-cloud-storage's own retries of an upload's chunks (a resumable upload resumes, not restarts) give up after
#: this; cairn's come on top. Reads (metadata, listings, downloads) get no SDK retries at all: see ``_download``.
_SDK_UPLOAD_RETRY_SECONDS = 30.0
_EMULATOR_PROJECT = "cairn-emulator"  # the emulator wants some project; any name does


class GCSObjectStore(ObjectStore):
    """A GCS bucket. ``uses_hmac`` says which of the two ways (see the module's docstring) this one speaks.

    Files above 8 MiB go up as resumable uploads in ``chunk_size`` parts (a multiple of 256 KiB), so a dropped
    connection costs one chunk, not the file. ``endpoint_url`` replaces the XML API's address (HMAC) or the JSON
    API's (default credentials). Without it, the HMAC way reads the XML API's address from the environment variable
    ``GCS_ENDPOINT_URL`` when set (the default credentials way has ``STORAGE_EMULATOR_HOST`` for that).
    """

    scheme = "gs"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        chunk_size: int = 8 * MiB,
        num_attempts: int = 3,
    ) -> None:
        super().__init__(bucket, prefix)
        if chunk_size <= 0 or chunk_size % _CHUNK_GRANULARITY:
            raise ValueError(
                f"chunk_size={chunk_size}: GCS needs a positive multiple of 256 KiB ({_CHUNK_GRANULARITY})"
            )
        self.num_attempts = num_attempts
        self.chunk_size = chunk_size
        self.endpoint_url = endpoint_url
        key, secret = os.environ.get("GCS_KEY"), os.environ.get("GCS_SECRET")
        self._interop: _InteropStore | None = None
        if key and secret:
            interop_endpoint = endpoint_url or os.environ.get("GCS_ENDPOINT_URL") or GCS_XML_ENDPOINT
            self._interop = _InteropStore(bucket, interop_endpoint, key, secret, num_attempts)
        else:
            self._client = _native_client(endpoint_url)
            self._bucket = self._client.bucket(bucket)
            self._upload_retry = _sdk_upload_retry()

    @property
    def uses_hmac(self) -> bool:
        return self._interop is not None

    # -- hooks: each goes to the S3 store (HMAC) or to google-cloud-storage -------------------------------------

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        if self._interop:
            return self._interop._upload(key, filename, callback)
        self._upload_native(key, filename, callback)
        return None

    def _upload_new(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """With google-cloud-storage, ``if_generation_match=0`` makes GCS refuse the write (412) when the object exists,
        so one that appeared meanwhile is never replaced. The HMAC path checks, then writes (see _InteropStore)."""
        if self._interop:
            return self._interop._upload_new(key, filename, callback)
        self._upload_native(key, filename, callback, if_generation_match=0)
        return None

    def _upload_native(self, key: str, filename: str, callback: ProgressCallback | None, **condition: int) -> None:
        size = os.path.getsize(filename)
        blob = self._bucket.blob(key, chunk_size=self.chunk_size)
        with self._sdk_errors(key), open(filename, "rb") as file:
            reader = _ProgressReader(file, size, callback)
            blob.upload_from_file(reader, size=size, retry=self._upload_retry, **condition)
        reader.finish()

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """Reads go without the SDK's retries (``retry=None``): with them, each of cairn's attempts spent up to the
        SDK's own 30 s deadline on a download that keeps arriving cut off, so one failed in about a minute instead of
        after cairn's retry policy (:func:`~cairn.storage.settings.retry_wait`, ``num_attempts``), the one every
        store follows. A retried download starts again from its first byte, as with every other store."""
        if self._interop:
            return self._interop._download(key, filename, callback)
        with self._sdk_errors(key):
            blob = self._blob(key)  # its generation pins the download to this version of the object
            with open(filename, "wb") as file:
                blob.download_to_file(_ProgressWriter(file, blob.size or 0, callback), retry=None)
        return None

    def _size(self, key: str) -> int:
        if self._interop:
            return self._interop._size(key)
        with self._sdk_errors(key):
            return int(self._blob(key).size or 0)

    def _list(self, key_prefix: str) -> list[str]:
        return [key for key, _ in self._list_with_sizes(key_prefix)]

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        if self._interop:
            return self._interop._list_with_sizes(key_prefix)
        with self._sdk_errors(key_prefix):
            blobs = self._client.list_blobs(self._bucket, prefix=key_prefix, retry=None)
            return [(blob.name, int(blob.size or 0)) for blob in blobs]

    def _delete(self, key: str) -> None:
        """Without the SDK's retries, as for reads: cairn's are the ones every store follows. GCS answers 404 for a
        missing object (then :class:`ObjectNotFoundError`, which ``delete_object`` lets pass) and for a missing
        bucket (told apart by :meth:`_missing`)."""
        if self._interop:
            return self._interop._delete(key)
        with self._sdk_errors(key):
            self._bucket.delete_blob(key, retry=None)
        return None

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """GCS keeps an MD5 for objects uploaded whole, and a CRC32C for every object (composed ones too)."""
        if self._interop:
            return self._interop._checksum_matches(self.key(name), filename)
        with self._sdk_errors(self.key(name)):
            blob = self._blob(self.key(name))
        if blob.md5_hash:
            return blob.md5_hash == _b64(bytes.fromhex(file_md5(filename)))
        if blob.crc32c:
            return blob.crc32c == _file_crc32c(filename)
        return None

    def close(self) -> None:
        if self._interop:
            self._interop.close()
        else:
            self._client.close()

    # -- helpers --------------------------------------------------------------------------------------------------

    def _blob(self, key: str) -> Any:
        """The object's metadata (size, hashes, generation), or :class:`ObjectNotFoundError`."""
        blob = self._bucket.get_blob(key, retry=None)
        if blob is None:
            raise self._missing(key)
        return blob

    def _missing(self, key: str) -> ObjectStoreError:
        """GCS answers 404 for a missing bucket as for a missing object; ask about the bucket to tell them apart."""
        if self._bucket_exists():
            return ObjectNotFoundError(f"no object {key!r}")
        return ObjectStoreError(
            f"bucket {self.bucket!r} does not exist (or these credentials may not see it): create it or fix the name"
        )

    def _bucket_exists(self) -> bool:
        """True unless GCS says the bucket is missing: credentials that may read objects but not buckets get True."""
        try:
            return bool(self._bucket.exists(retry=None))
        except Exception:
            return True

    def _translate(self, error: Exception, key: str) -> ObjectStoreError | None:
        import requests
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth

        corrupt, invalid = _media_errors()
        if isinstance(error, invalid):  # the upload/download layer's HTTP error, when not already converted
            status = int(getattr(getattr(error, "response", None), "status_code", 0) or 0)
            error = api.from_http_status(status, str(error)) if status else TransientStoreError(str(error))
        if isinstance(error, api.NotFound):
            return self._missing(key)
        if isinstance(error, api.PreconditionFailed):  # only conditional writes (if_generation_match) send one
            return ObjectExistsError(f"{key!r} already exists")
        if isinstance(error, (api.Unauthorized, auth.RefreshError, auth.DefaultCredentialsError)):
            return ObjectStoreError(f"Google did not accept the credentials ({error}); {_CREDENTIALS_HINT}")
        if isinstance(error, api.Forbidden):
            return ObjectStoreError(f"access denied to bucket {self.bucket!r}: check its IAM permissions ({error})")
        if isinstance(error, (api.TooManyRequests, api.ServerError, api.RetryError, TransientStoreError)):
            return TransientStoreError(f"GCS answered: {error}")
        if isinstance(error, api.GoogleAPICallError):
            return ObjectStoreError(f"GCS refused the request ({error})")
        if isinstance(error, (corrupt, auth.TransportError, requests.RequestException, ConnectionError, TimeoutError)):
            return TransientStoreError(f"{type(error).__name__}: {error}")
        return None


_CREDENTIALS_HINT = (
    "run `gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a service account key, "
    "or set GCS_KEY and GCS_SECRET to HMAC keys"
)


class _InteropStore(S3ObjectStore):
    """cairn's S3 store, adjusted to GCS's XML API.

    boto3 (1.36 on) adds CRC32 checksums to every upload by default, which S3-compatible services, GCS among them,
    may refuse: this store asks for checksums only where an operation requires them. GCS keeps no MD5 for objects
    made by multipart uploads and their ETag is not S3's MD5-of-parts, so only a whole-object MD5 is compared.
    """

    scheme = "gs"

    def __init__(self, bucket: str, endpoint_url: str, key: str, secret: str, num_attempts: int) -> None:
        credentials = {"aws_access_key_id": key, "aws_secret_access_key": secret}
        super().__init__(
            bucket, "", region_name="auto", endpoint_url=endpoint_url, num_attempts=num_attempts, **credentials
        )
        import boto3
        from botocore.config import Config

        config = self._client.meta.config.merge(
            Config(request_checksum_calculation="when_required", response_checksum_validation="when_required")
        )
        self._client.close()
        self._client = boto3.session.Session().client(
            "s3", region_name="auto", endpoint_url=endpoint_url, config=config, **credentials
        )

    def _upload_new(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """A plain write after the existence check: S3's ``If-None-Match`` is not part of GCS's XML API, and GCS's own
        precondition header is not known to hold for multipart uploads there; the race stays open on this path."""
        self._upload(key, filename, callback)

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """``x-goog-hash``'s md5 where GCS sends one, else an ETag that is a plain MD5 (32 hex digits), else None."""
        from cairn.storage.s3 import _translated

        with _translated(self.key(name)):
            head = self._client.head_object(Bucket=self.bucket, Key=self.key(name))
        hashes = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-goog-hash", "")
        md5 = dict(part.strip().split("=", 1) for part in hashes.split(",") if "=" in part).get("md5")
        if md5:
            return md5 == _b64(bytes.fromhex(file_md5(filename)))
        etag = str(head.get("ETag", "")).strip('"')
        if len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower()):
            return etag.lower() == file_md5(filename)
        return None


def _native_client(endpoint_url: str | None) -> Any:
    """A google-cloud-storage client: anonymous on an emulator, else Application Default Credentials."""
    try:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage
    except ImportError:
        raise ImportError(
            "GCSObjectStore needs google-cloud-storage: pip install 'cairn[gcs]' (or set GCS_KEY and GCS_SECRET to "
            "use HMAC keys, which needs pip install 'cairn[s3]')"
        ) from None
    options = ClientOptions(api_endpoint=endpoint_url) if endpoint_url else None
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project=_EMULATOR_PROJECT, credentials=AnonymousCredentials(), client_options=options)
    try:
        return storage.Client(client_options=options)
    except DefaultCredentialsError as error:
        raise ObjectStoreError(f"no Google credentials found ({error}); {_CREDENTIALS_HINT}") from None


def _sdk_upload_retry() -> Any:
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(_SDK_UPLOAD_RETRY_SECONDS)


def _media_errors() -> tuple[type[Exception], type[Exception]]:
    """(DataCorruption, InvalidResponse): in google.cloud.storage since 3.0, in google-resumable-media before."""
    try:
        from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
    except ImportError:
        from google.resumable_media import DataCorruption, InvalidResponse
    return DataCorruption, InvalidResponse


class _ProgressReader:
    """The file, read by the upload; reports how far the reading got (a chunk is read just before it is sent)."""

    def __init__(self, file: IO[bytes], total: int, callback: ProgressCallback | None) -> None:
        self._file, self._total, self._callback, self._done = file, total, callback, 0

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        position = self._file.tell()
        if self._callback and position > self._done:  # a retried chunk rewinds; progress never goes back
            self._done = position
            self._callback(position, self._total)
        return data

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def finish(self) -> None:
        """Once the upload succeeded, say so even where no read moved the position (an empty file)."""
        if self._callback and (self._done < self._total or self._total == 0):
            self._done = self._total
            self._callback(self._total, self._total)


class _ProgressWriter:
    """The target file, written by the download in small pieces; reports about every MiB, and the end."""

    def __init__(self, file: IO[bytes], total: int, callback: ProgressCallback | None) -> None:
        self._file, self._total, self._callback, self._reported = file, total, callback, 0

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        if self._callback:
            position = self._file.tell()
            if position - self._reported >= MiB or position >= self._total:
                self._reported = position
                self._callback(position, max(self._total, position))
        return written

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        return self._file.truncate(size)

    def flush(self) -> None:
        self._file.flush()


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _file_crc32c(filename: str) -> str:
    """Base64 big-endian CRC32C, as GCS reports it (google-crc32c comes with google-cloud-storage)."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(filename, "rb") as file:
        while chunk := file.read(8 * MiB):
            checksum.update(chunk)
    return _b64(checksum.digest())
