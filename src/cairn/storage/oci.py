"""Oracle Cloud Infrastructure Object Storage, through the ``oci`` SDK and its config file."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback, TransientStoreError, file_md5

__all__ = ["MAX_PARTS", "OCIObjectStore", "part_size_for"]

MiB = 1 << 20
_READ_CHUNK = 1 * MiB

#: The most parts one OCI multipart upload may have. A file that would need more at the configured ``part_size``
#: goes up in larger parts (see :func:`part_size_for`).
MAX_PARTS = 10_000


class OCIObjectStore(ObjectStore):
    """A bucket in OCI Object Storage.

    Credentials come from ``config`` (a dict in the SDK's format) or else the profile ``profile`` of the SDK's config
    file (``config_file``; when not given, the file named by the environment variable ``OCI_CONFIG_FILE``, else
    ``~/.oci/config``). The service endpoint is ``endpoint``, else the environment variable ``OCI_ENDPOINT_URL``,
    else the SDK's endpoint for the config's region. The namespace is looked up on first use unless given. Files
    above ``part_size`` go up as a multipart upload whose parts travel in parallel; an upload that fails is aborted,
    so that no orphaned parts stay behind to be billed. A file that would need more than :data:`MAX_PARTS` parts
    goes up in parts of twice the size (four times, ...: as boto3 does for S3), so any file OCI takes can be
    uploaded; verification splits the file the same way.
    """

    scheme = "oci"
    #: parts of one multipart upload in flight at once
    parallel_parts: int = 3

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        namespace: str | None = None,
        config_file: str | None = None,
        profile: str = "DEFAULT",
        config: dict[str, Any] | None = None,
        endpoint: str | None = None,
        part_size: int = 128 * MiB,
        num_attempts: int = 3,
    ) -> None:
        super().__init__(bucket, prefix)
        try:
            import oci
        except ImportError:
            raise ImportError("OCIObjectStore needs the oci SDK: pip install 'cairn[oci]'") from None
        self.num_attempts = num_attempts
        self.part_size = part_size
        self._namespace = namespace
        self._namespace_lock = threading.Lock()
        config_file = config_file or os.environ.get("OCI_CONFIG_FILE") or None
        endpoint = endpoint or os.environ.get("OCI_ENDPOINT_URL") or None
        with _config_errors(config_file, profile):
            if config is None:
                config = oci.config.from_file(config_file or oci.config.DEFAULT_LOCATION, profile)
            client_kwargs: dict[str, Any] = {"retry_strategy": _sdk_retry_strategy()}
            if endpoint:
                client_kwargs["service_endpoint"] = endpoint
            self._client = oci.object_storage.ObjectStorageClient(config, **client_kwargs)
        self._uploads = oci.object_storage.UploadManager(
            self._client, allow_parallel_uploads=True, parallel_process_count=self.parallel_parts
        )

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None, **condition: str) -> None:
        size = os.path.getsize(filename)
        progress = _Progress(size, callback)
        with self._sdk_errors(key):
            if size > self.part_size:
                self._upload_in_parts(key, filename, progress, **condition)
            else:
                self._uploads.upload_file(
                    self.namespace,
                    self.bucket,
                    key,
                    filename,
                    part_size=self.part_size,
                    progress_callback=progress,
                    **condition,
                )
        progress.finish()

    def _upload_new(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """``if-none-match: *`` on the put (or on creating and committing a multipart upload): OCI refuses it with
        412 when the object exists, so one that appeared meanwhile is never replaced."""
        self._upload(key, filename, callback, if_none_match="*")

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        with self._sdk_errors(key):
            response = self._client.get_object(self.namespace, self.bucket, key)
            try:
                _stream_to_file(response, filename, callback)
            finally:
                response.data.close()

    def _size(self, key: str) -> int:
        with self._sdk_errors(key):
            return int(self._client.head_object(self.namespace, self.bucket, key).headers["content-length"])

    def _list(self, key_prefix: str) -> list[str]:
        return [key for key, _ in self._list_with_sizes(key_prefix)]

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        """Every page: OCI answers at most 1000 names at a time, and ``next_start_with`` names the next page."""
        entries: list[tuple[str, int]] = []
        start: str | None = None
        with self._sdk_errors(key_prefix):
            while True:
                page_kwargs = {"prefix": key_prefix, "fields": "name,size", **({"start": start} if start else {})}
                page = self._client.list_objects(self.namespace, self.bucket, **page_kwargs).data
                entries.extend((summary.name, int(summary.size or 0)) for summary in page.objects)
                start = page.next_start_with
                if not start:
                    return entries

    def _delete(self, key: str) -> None:
        """OCI answers 404 ``ObjectNotFound`` for a missing object (``delete_object`` lets it pass); a missing
        bucket or namespace is told apart by :meth:`_not_found`."""
        with self._sdk_errors(key):
            self._client.delete_object(self.namespace, self.bucket, key)

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """The MD5 OCI keeps: of the content for a simple put; of the parts' MD5s for a multipart upload.

        A multipart hash is compared with the file split into the parts this store uploads it in
        (:func:`part_size_for`: ``part_size``, enlarged for a file that would need more than :data:`MAX_PARTS`); an
        object with another number of parts was uploaded with another part size, and is unknown (None), not a
        mismatch.
        """
        key = self.key(name)
        with self._sdk_errors(key):
            headers = self._client.head_object(self.namespace, self.bucket, key).headers
        multipart = headers.get("opc-multipart-md5")
        if multipart:
            part_size = part_size_for(os.path.getsize(filename), self.part_size)
            return _multipart_md5_matches(multipart, filename, part_size)
        simple = headers.get("content-md5") or headers.get("opc-content-md5")
        return simple == _b64_md5(filename) if simple else None

    def close(self) -> None:
        self._client.base_client.session.close()

    # -- helpers --------------------------------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The tenancy's Object Storage namespace, looked up once (a network call) when it was not given."""
        with self._namespace_lock:
            if self._namespace is None:
                self._namespace = str(self._client.get_namespace().data)
            return self._namespace

    def _upload_in_parts(self, key: str, filename: str, progress: _Progress, **condition: str) -> None:
        """The SDK's assembler (what ``UploadManager`` uses), kept in hand so a failed upload can be aborted."""
        from oci.object_storage import MultipartObjectAssembler

        assembler = MultipartObjectAssembler(
            self._client,
            self.namespace,
            self.bucket,
            key,
            part_size=part_size_for(os.path.getsize(filename), self.part_size),
            allow_parallel_uploads=True,
            parallel_process_count=self.parallel_parts,
            **condition,
        )
        assembler.new_upload()
        try:
            assembler.add_parts_from_file(filename)
            assembler.upload(progress_callback=progress)
            assembler.commit(**condition)
        except BaseException:
            with contextlib.suppress(Exception):
                assembler.abort()
            raise

    def _translate(self, error: Exception, key: str) -> ObjectStoreError | None:
        from circuitbreaker import CircuitBreakerError
        from oci._vendor.requests.exceptions import RequestException  # what the SDK's HTTP layer raises
        from oci.exceptions import MultipartUploadError, ServiceError
        from urllib3.exceptions import HTTPError  # what a broken download stream raises (the SDK uses urllib3)

        if isinstance(error, ServiceError):
            return self._service_error(error, key)
        if isinstance(error, CircuitBreakerError):
            return TransientStoreError("the SDK's circuit breaker is open after repeated failures; wait and retry")
        if isinstance(error, (RequestException, HTTPError, MultipartUploadError, ConnectionError, TimeoutError)):
            return TransientStoreError(f"{type(error).__name__}: {error}")
        return None

    def _service_error(self, error: Any, key: str) -> ObjectStoreError:
        status, code = int(error.status or 0), str(error.code or "")
        if status == 404:
            return self._not_found(code, key)
        if status == 412:  # only conditional writes (if-none-match) send a precondition
            return ObjectExistsError(f"{key!r} already exists")
        if status == 401:
            return ObjectStoreError(
                f"OCI did not accept the request's signature (401 {code}): check user, tenancy, fingerprint and "
                "key_file in the OCI config"
            )
        if status == 403:
            return ObjectStoreError(f"OCI refused access (403 {code}): check the IAM policy for bucket {self.bucket!r}")
        if status >= 500 or status == 429 or (status == 409 and code == "ConcurrentObjectUpdate") or status == -1:
            return TransientStoreError(f"OCI answered {status} {code}")
        return ObjectStoreError(f"OCI refused the request ({status} {code}: {error.message})")

    def _not_found(self, code: str, key: str) -> ObjectStoreError:
        """A 404 names the object, the bucket or the namespace; HEAD answers carry no code, so ask about the bucket."""
        if code == "NamespaceNotFound":
            return ObjectStoreError(f"OCI knows no namespace {self.namespace!r}: fix the namespace argument")
        if code == "BucketNotFound" or (code != "ObjectNotFound" and not self._bucket_exists()):
            return ObjectStoreError(
                f"bucket {self.bucket!r} does not exist in namespace {self.namespace!r}, or these credentials may not "
                "see it: create it, fix the name, or grant access in an IAM policy"
            )
        return ObjectNotFoundError(f"no object {key!r}")

    def _bucket_exists(self) -> bool:
        """True unless the service says the bucket is missing (when it cannot be asked, assume it is there)."""
        from oci.exceptions import ServiceError

        try:
            self._client.head_bucket(self.namespace, self.bucket)
        except ServiceError as error:
            return error.status != 404
        except Exception:
            return True
        return True


class _Progress:
    """The SDK reports bytes per part (from several threads); cairn's callbacks take (done, total)."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total, self.callback, self.done = total, callback, 0
        self._lock = threading.Lock()

    def __call__(self, chunk: int) -> None:
        with self._lock:
            self.done = min(self.total, self.done + chunk)
            if self.callback:
                self.callback(self.done, self.total)

    def finish(self) -> None:
        """The SDK says nothing for an empty file; a caller waiting for done == total should still hear it."""
        if self.callback and (self.done < self.total or self.total == 0):
            self.done = self.total
            self.callback(self.total, self.total)


def _stream_to_file(response: Any, filename: str, callback: ProgressCallback | None) -> None:
    """Write the body in chunks (never all of it in memory); a short or corrupted body is worth another try."""
    total = int(response.headers.get("content-length", -1))
    expected_md5 = response.headers.get("content-md5") or response.headers.get("opc-content-md5")
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    with open(filename, "wb") as file:
        for chunk in response.data.raw.stream(_READ_CHUNK, decode_content=False):
            file.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if callback:
                callback(done, max(total, done))
    if total >= 0 and done != total:
        raise TransientStoreError(f"the download ended after {done} of {total} bytes")
    if expected_md5 and base64.b64encode(digest.digest()).decode() != expected_md5:
        raise TransientStoreError("the downloaded bytes do not match the object's MD5")


def _b64_md5(filename: str) -> str:
    return base64.b64encode(bytes.fromhex(file_md5(filename))).decode()


def _multipart_md5_matches(multipart: str, filename: str, part_size: int) -> bool | None:
    """Compare OCI's ``<base64 MD5 of the parts' MD5s>-<parts>`` with the local file split at ``part_size``."""
    remote, _, parts = multipart.rpartition("-")
    if not parts.isdigit() or int(parts) != math.ceil(os.path.getsize(filename) / part_size):
        return None
    local_hex, _, _ = file_md5(filename, part_size=part_size).partition("-")
    return base64.b64encode(bytes.fromhex(local_hex)).decode() == remote


def part_size_for(size: int, part_size: int) -> int:
    """The part size a file of ``size`` bytes goes up in: ``part_size``, doubled until the file fits in
    :data:`MAX_PARTS` parts (at the default 128 MiB, a file above 1.25 TiB would otherwise be refused by OCI).

    Doubling, not the smallest size that fits, keeps the part size a power-of-two multiple of the configured one,
    as boto3 does for S3; the upload and its verification both ask here, so they always split the file alike.
    """
    while math.ceil(size / part_size) > MAX_PARTS:
        part_size *= 2
    return part_size


def _sdk_retry_strategy() -> Any:
    """A few quick attempts inside the SDK; cairn's own retries (``num_attempts``) come on top of these."""
    import oci

    return oci.retry.RetryStrategyBuilder(
        max_attempts=3,
        total_elapsed_time_seconds=60,
        retry_base_sleep_time_seconds=0.5,
        retry_max_wait_between_calls_seconds=5,
    ).get_retry_strategy()


@contextlib.contextmanager
def _config_errors(config_file: str | None, profile: str) -> Iterator[None]:
    """A missing or broken config is the user's to fix: say which file, which profile, and what the SDK said."""
    from oci.exceptions import ClientError

    try:
        yield
    except ClientError as error:
        where = f"profile {profile!r} of {config_file or '~/.oci/config'}"
        raise ObjectStoreError(
            f"the OCI config is unusable ({type(error).__name__}: {error}); fix {where}, or pass config={{...}} with "
            "user, tenancy, fingerprint, key_file and region"
        ) from None
