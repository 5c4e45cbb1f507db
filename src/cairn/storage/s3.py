"""Amazon S3 and S3-compatible stores (CoreWeave, MinIO, GCS's interoperability API), through boto3."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback, TransientStoreError, file_md5

__all__ = ["S3ObjectStore"]

log = logging.getLogger(__name__)

MiB = 1 << 20
_MISSING_OBJECT = {"404", "NoSuchKey", "NotFound"}
_TRANSIENT = {"SlowDown", "RequestTimeout", "InternalError", "ConditionalRequestConflict"}  # the last: a race, 409
_PERMANENT = {
    "NoSuchBucket": "the bucket does not exist: create it or fix the name",
    "AccessDenied": "access denied: check the credentials and the bucket's permissions",
    "InvalidAccessKeyId": "the access key is not known: check it (AWS_ACCESS_KEY_ID, or GCS_KEY for gs://)",
    "SignatureDoesNotMatch": "the secret key does not match the access key: check the credentials",
    "403": "access denied: check the credentials and the bucket's permissions",
}


class S3ObjectStore(ObjectStore):
    """A bucket reached with boto3. ``S3_ENDPOINT_URL`` (or ``endpoint_url``) points it at any S3-compatible store.

    Files above ``multipart_threshold`` go up in parallel parts of ``multipart_chunksize`` over ``max_concurrency``
    threads. Credentials come from the arguments, else boto3's usual chain (environment, config files, roles).
    """

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        region_name: str | None = None,
        endpoint_url: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
        *,
        multipart_threshold: int = 64 * MiB,
        multipart_chunksize: int = 16 * MiB,
        max_concurrency: int = 8,
        num_attempts: int = 3,
    ) -> None:
        super().__init__(bucket, prefix)
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError:
            raise ImportError("S3ObjectStore needs boto3: pip install 'cairn[s3]'") from None
        self.endpoint_url = endpoint_url or os.environ.get("S3_ENDPOINT_URL") or None
        self.num_attempts = num_attempts
        self._chunksize = multipart_chunksize
        self._client = boto3.session.Session().client(
            "s3",
            region_name=region_name,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=aws_access_key_id,
            aws_secret_access_key=aws_secret_access_key,
            aws_session_token=aws_session_token,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60),
        )
        self._conditional_writes = True  # until the store answers 501 to one
        self._no_replace: set[str] = set()  # keys being uploaded with If-None-Match
        self._hooked_client: Any = None
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        with _translated(key):
            self._client.upload_file(
                filename, self.bucket, key, Config=self._transfer, Callback=_counter(filename, callback)
            )

    def _upload_new(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """A conditional write (``If-None-Match: *`` on PutObject, and on CompleteMultipartUpload for large files):
        S3 refuses it with 412 when the key exists, so an object that appeared meanwhile is never replaced.

        boto3's managed transfer does not pass that argument, so a hook adds it to the requests for ``key``. A store
        that does not implement conditional writes (501) gets plain writes from then on, after a warning: the
        existence check in :meth:`upload_object` then remains the only guard.
        """
        if not self._conditional_writes:
            return self._upload(key, filename, callback)
        self._install_condition_hook()
        self._no_replace.add(key)
        try:
            self._upload(key, filename, callback)
        except _NotImplementedByStore:
            log.warning(
                "%s does not support conditional writes (If-None-Match): an object another writer creates while "
                "this one uploads may be replaced",
                self.get_uri(""),
            )
            self._conditional_writes = False
            self._upload(key, filename, callback)
        finally:
            self._no_replace.discard(key)
        return None

    def _install_condition_hook(self) -> None:
        if self._hooked_client is self._client:
            return
        for operation in ("PutObject", "CompleteMultipartUpload"):
            self._client.meta.events.register(f"before-parameter-build.s3.{operation}", self._add_condition)
        self._hooked_client = self._client

    def _add_condition(self, params: dict[str, Any], **kwargs: Any) -> None:
        if params.get("Key") in self._no_replace:
            params["IfNoneMatch"] = "*"

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        total = self._size(key)  # also tells a missing bucket from a missing object
        with _translated(key):
            self._client.download_file(
                self.bucket, key, filename, Config=self._transfer, Callback=_counter(total, callback)
            )

    def _size(self, key: str) -> int:
        try:
            with _translated(key):
                return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ObjectNotFoundError:
            self._check_bucket()  # a HEAD answers a bare 404 for a missing bucket too
            raise

    def _check_bucket(self) -> None:
        with _translated(""):
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except Exception as err:
                if getattr(err, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                    raise ObjectStoreError(
                        f"the bucket does not exist: create {self.bucket!r} or fix the name"
                    ) from None
                raise

    def _list(self, key_prefix: str) -> list[str]:
        return [key for key, _ in self._list_with_sizes(key_prefix)]

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        entries: list[tuple[str, int]] = []
        with _translated(key_prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=key_prefix):
                entries.extend((item["Key"], int(item["Size"])) for item in page.get("Contents", []))
        return entries

    def _delete(self, key: str) -> None:
        """S3's DELETE answers 204 whether or not the object was there; a missing bucket is ``NoSuchBucket``."""
        with _translated(key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """Compare the ETag: the MD5 of a single-part upload, or of the parts' MD5s for a multipart one.

        A multipart ETag is compared at the part size the upload really used, which is not always the configured
        one: boto3 raises parts below 5 MiB to 5 MiB and doubles them until the file fits in 10,000 parts. That
        size is computed as boto3 computes it; where it does not give the ETag's number of parts (an object that
        another tool uploaded), the store is asked for its first part's size. With no part size that fits, the
        checksum is unknown (None), never a mismatch.
        """
        key = self.key(name)
        with _translated(key):
            etag = str(self._client.head_object(Bucket=self.bucket, Key=key)["ETag"]).strip('"')
        if "-" not in etag:
            return etag == file_md5(filename) if len(etag) == 32 else None
        count = etag.rpartition("-")[2]
        if not count.isdigit():
            return None
        size, parts = os.path.getsize(filename), int(count)
        compared: list[int] = []
        for part_size in self._part_size_candidates(key, size, parts):
            if part_size not in compared and math.ceil(size / part_size) == parts:
                compared.append(part_size)
                if etag == file_md5(filename, part_size=part_size):
                    return True
        return False if compared else None

    def _part_size_candidates(self, key: str, size: int, parts: int) -> Iterator[int]:
        """The part sizes an upload of ``size`` bytes in ``parts`` parts may have used, cheapest to learn first:
        boto3's own adjustment of the configured size, then what the store says its first part holds."""
        from s3transfer.utils import ChunksizeAdjuster

        yield ChunksizeAdjuster().adjust_chunksize(self._chunksize, size)
        first_part = self._first_part_size(key, parts)
        if first_part:
            yield first_part

    def _first_part_size(self, key: str, parts: int) -> int | None:
        """The size of a multipart object's first part (``HEAD`` with ``partNumber=1``), where the store answers
        it; None where it does not (it ignores the parameter, answering for the whole object, or refuses it)."""
        try:
            with _translated(key):
                head = self._client.head_object(Bucket=self.bucket, Key=key, PartNumber=1)
        except (TransientStoreError, ObjectNotFoundError):
            raise
        except ObjectStoreError:
            return None
        if int(head.get("PartsCount") or 0) != parts:
            return None
        return int(head.get("ContentLength") or 0) or None

    def close(self) -> None:
        self._client.close()


def _counter(total_or_file: int | str, callback: ProgressCallback | None) -> Any:
    """boto3 reports bytes per chunk; cairn's callbacks take (done, total)."""
    if callback is None:
        return None
    total = os.path.getsize(total_or_file) if isinstance(total_or_file, str) else total_or_file
    done = 0

    def advance(chunk: int) -> None:
        nonlocal done
        done += chunk
        callback(done, total)

    return advance


class _NotImplementedByStore(ObjectStoreError):
    """The store answered 501: a feature of the request (such as a conditional write) is not supported."""


class _translated:
    """Turns botocore's exceptions into cairn's, naming the key."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> bool:
        if error is None or isinstance(error, ObjectStoreError):
            return False
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceededError

        if isinstance(error, (RetriesExceededError, TransferRetriesExceededError)):  # each try arrived cut off
            raise TransientStoreError(
                f"the download of {self.key!r} kept breaking off before the end ({error.last_exception}); check the "
                "connection to the store (a proxy or firewall that cuts long transfers?) and try again"
            ) from None
        if isinstance(error, S3UploadFailedError):  # boto3 raises it inside `except ClientError` without `from`
            error = error.__cause__ or error.__context__ or error
        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _MISSING_OBJECT:
                raise ObjectNotFoundError(f"no object {self.key!r}") from None
            if code == "PreconditionFailed" or status == 412:  # only conditional writes send a precondition
                raise ObjectExistsError(f"{self.key!r} already exists") from None
            if code == "NotImplemented" or status == 501:
                raise _NotImplementedByStore(f"the store does not implement this request ({code or status})") from None
            if code in _PERMANENT:
                raise ObjectStoreError(_PERMANENT[code]) from None
            if status >= 500 or status == 429 or code in _TRANSIENT:
                raise TransientStoreError(f"the store answered {status} {code}") from None
            raise ObjectStoreError(f"the store refused the request ({code or status})") from None
        if isinstance(error, NoCredentialsError):
            raise ObjectStoreError("no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        if isinstance(error, (BotoCoreError, ConnectionError, OSError, S3UploadFailedError)):
            raise TransientStoreError(f"{type(error).__name__}: {error}") from None
        return False
