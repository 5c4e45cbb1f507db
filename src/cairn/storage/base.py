"""The one small protocol every object store speaks, and the shared behaviour around it.

Names and URIs are ``str``, never ``Path``: ``Path("s3://b/k")`` would fold the double slash. Public methods check
their arguments and turn each SDK's exceptions into cairn's (a missing object is :class:`ObjectNotFoundError`, a
``FileNotFoundError`` too; anything else that still fails after retries is :class:`ObjectStoreError`). Stores
implement the private hooks; they never retry themselves beyond what their SDK already does. Deleting an object
that is not there is not an error (:meth:`ObjectStore.delete_object`), as in S3.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from cairn.atomic import atomic_write
from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.settings import retry_wait

__all__ = ["ObjectStore", "ProgressCallback", "TransientStoreError", "file_md5"]

log = logging.getLogger(__name__)

#: Room left in a download's temporary name for what an SDK adds to it (some write ``<name>.<random>``, then rename).
_SDK_ROOM = 16

ProgressCallback = Callable[[int, int], None]  # (bytes done so far, total bytes)
T = TypeVar("T")


class TransientStoreError(ObjectStoreError):
    """A failure worth another try: a dropped connection, a 5xx answer, throttling. Raised by the hooks."""


class ObjectStore(abc.ABC):
    """A bucket (or container) and a key prefix inside it.

    Every name passed to these methods is relative to the prefix; ``list_objects`` answers in the same terms, so
    what it lists can be downloaded as it is.
    """

    #: attempts for each call (the first one included) before a transient failure is raised
    num_attempts: int = 3
    #: Whether a ``..`` in a name reaches the service as part of a literal key (S3, GCS and OCI send names so:
    #: ``run/../x`` is one more key under ``run/``). False where names are paths, and ``..`` would be folded away
    #: by the filesystem (``file://``) or the HTTP client (aiohttp's and urllib3's URLs, under adlfs and libcloud),
    #: leading out of the prefix, or the root: there such names are refused (:meth:`key`).
    keeps_dot_segments: bool = True

    def __init__(self, bucket: str, prefix: str = "") -> None:
        if not isinstance(bucket, str) or not bucket or "/" in bucket:
            raise ValueError(f"bucket={bucket!r}: give the bucket's bare name, without scheme or slashes")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""

    # -- the protocol ---------------------------------------------------------------------------------------------

    def get_uri(self, name: str) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key(name)}"

    def upload_object(
        self, name: str, filename: str, callback: ProgressCallback | None = None, *, overwrite: bool = True
    ) -> None:
        """Upload the local file ``filename`` as ``name``, replacing any object of that name.

        With ``overwrite=False`` an existing object is never replaced: :class:`ObjectExistsError` (a
        ``FileExistsError``) is raised instead, unless the object already holds exactly this file (an earlier attempt
        of this same upload that landed before its answer was lost). An object that was there before the call is
        always found; one that another writer lands during the upload is refused by stores that write conditionally
        (S3, GCS, OCI), and may be replaced by the others (see :meth:`_upload_new`).
        """
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"cannot upload {filename!r}: no such file")
        what = f"upload {filename!r} to {self.get_uri(name)}"
        if overwrite:
            self._retrying(what, self._upload, self.key(name), filename, callback)
            return
        try:
            if self._exists(name):
                raise ObjectExistsError(f"{self.get_uri(name)} already exists")
            self._retrying(what, self._upload_new, self.key(name), filename, callback)
        except ObjectExistsError:
            if not self._holds(name, filename):
                raise ObjectExistsError(
                    f"{self.get_uri(name)} already exists and overwrite=False never replaces an object; delete it, "
                    "upload under another name, or pass overwrite=True"
                ) from None

    def download_object(
        self, name: str, filename: str, overwrite: bool = False, callback: ProgressCallback | None = None
    ) -> None:
        """Download ``name`` into ``filename``; the file appears complete or not at all, through the same commit as a
        checkpoint (:func:`cairn.atomic.atomic_write`: temporary beside it, fsync, rename). The store's errors pass
        on as raised."""
        uri = self.get_uri(name)  # refuses a name that leads outside the prefix before anything is written
        if os.path.exists(filename) and not overwrite:
            raise FileExistsError(f"{filename!r} already exists; pass overwrite=True to replace it")

        def download(temporary: str) -> None:
            self._retrying(f"download {uri}", self._download, self.key(name), temporary, callback)

        atomic_write(os.path.abspath(filename), download, overwrite=overwrite, explain_failure=False, room=_SDK_ROOM)

    def get_object_size(self, name: str) -> int:
        return self._retrying(f"read the size of {self.get_uri(name)}", self._size, self.key(name))

    def list_objects(self, prefix: str = "") -> list[str]:
        """Names (relative to this store's prefix) that start with ``prefix``, sorted."""
        keys = self._retrying(f"list {self.get_uri(prefix)}", self._list, self.key(prefix))
        return sorted(key[len(self.prefix) :] for key in keys if key.startswith(self.prefix))

    def list_objects_with_sizes(self, prefix: str = "") -> list[tuple[str, int]]:
        """``(name, bytes)`` of each object :meth:`list_objects` names, sorted by name.

        The sizes come from the listing itself (every store's listing carries them), so a prefix of 10,000 objects
        costs a few listing pages, not 10,000 size requests.
        """
        entries = self._retrying(f"list {self.get_uri(prefix)}", self._list_with_sizes, self.key(prefix))
        skip = len(self.prefix)
        return sorted((key[skip:], size) for key, size in entries if key.startswith(self.prefix))

    def delete_object(self, name: str) -> None:
        """Delete the object ``name``, with the same retries and errors as every other call.

        An object that is not there is not an error, as in S3 (whose DELETE answers alike either way): a delete
        retried after its answer was lost, or one that another process (a second prune, a person) got to first,
        leaves the store as asked. A missing bucket, or a refusal (no permission to delete), is
        :class:`ObjectStoreError` naming the object's URI. Only the one object goes: ``name`` is never a prefix, and
        a sharded folder's files are deleted one by one (see :mod:`cairn.checkpoint.save.remote_retention`). In a
        bucket with versioning on, the store keeps the old version behind a delete marker, as its own rules say.
        """
        uri = self.get_uri(name)  # refuses a name that leads outside the prefix before any request
        try:
            self._retrying(f"delete {uri}", self._delete, self.key(name))
        except ObjectNotFoundError:
            log.debug("%s was already gone", uri)

    def close(self) -> None:  # noqa: B027 - most SDK clients need no closing
        """Release connections. The store must not be used afterwards."""

    # -- beyond the protocol --------------------------------------------------------------------------------------

    def verify_upload(self, name: str, filename: str) -> None:
        """Check that ``name`` has the size, and (where the store reports one) the checksum, of ``filename``."""
        local_size = os.path.getsize(filename)
        remote_size = self.get_object_size(name)
        if remote_size != local_size:
            raise ObjectStoreError(
                f"{self.get_uri(name)} holds {remote_size} bytes but {filename!r} has {local_size}: the upload is "
                "incomplete; upload it again"
            )
        matches = self._retrying(f"read the checksum of {self.get_uri(name)}", self._checksum_matches, name, filename)
        if matches is False:
            raise ObjectStoreError(
                f"{self.get_uri(name)} has the right size but not the content of {filename!r} (checksum mismatch); "
                "upload it again"
            )

    def _exists(self, name: str) -> bool:
        try:
            self.get_object_size(name)
        except ObjectNotFoundError:
            return False
        return True

    def _holds(self, name: str, filename: str) -> bool:
        """Whether ``name`` certainly holds the content of ``filename`` (same size, and a checksum that matches)."""
        if self.get_object_size(name) != os.path.getsize(filename):
            return False
        what = f"read the checksum of {self.get_uri(name)}"
        return self._retrying(what, self._checksum_matches, name, filename) is True

    def key(self, name: str) -> str:
        """The store's key of ``name``: the prefix, then the name.

        A name is a path inside the prefix, so one that could leave it is refused before any request, with a
        ``ValueError`` (the caller's mistake, which no retry mends): a leading ``/`` (an absolute name has no place
        inside a prefix), and, in a store whose names are paths (:attr:`keeps_dot_segments` False), a ``..``
        segment.
        """
        if not isinstance(name, str):
            raise TypeError(f"object names are str, not {type(name).__name__}")
        if name.startswith("/") or (not self.keeps_dot_segments and ".." in name.split("/")):
            raise ValueError(
                f"object name {name!r} leads outside {self.get_uri('')}: names are relative to the store's prefix, "
                "with no leading '/' and no '..' segment; name the object from inside it"
            )
        return self.prefix + name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_uri('')!r})"

    # -- hooks for each store -------------------------------------------------------------------------------------

    scheme: str = "?"

    @abc.abstractmethod
    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None: ...

    def _upload_new(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """Upload only if no object ``key`` exists, raising :class:`ObjectExistsError` if one does.

        This default is a plain write, called after :meth:`upload_object` checked that the object is absent: an object
        another writer lands between that check and this write is replaced. Stores whose service can refuse a write
        to an existing name (a conditional write) override it, which closes that race.
        """
        self._upload(key, filename, callback)

    @abc.abstractmethod
    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None: ...

    @abc.abstractmethod
    def _size(self, key: str) -> int: ...

    @abc.abstractmethod
    def _list(self, key_prefix: str) -> list[str]: ...

    def _delete(self, key: str) -> None:
        """Delete the object ``key``; a missing one may raise :class:`ObjectNotFoundError` or pass quietly. This
        default, for stores written elsewhere before deleting was part of the protocol, refuses."""
        raise ObjectStoreError(f"{type(self).__name__} cannot delete objects (it implements no _delete)")

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        """``(key, bytes)`` for each key :meth:`_list` gives. Every store here reads the sizes from its listing; this
        fallback, for stores written elsewhere, asks for each size in turn."""
        return [(key, self._size(key)) for key in self._list(key_prefix)]

    def _translate(self, error: Exception, key: str) -> ObjectStoreError | None:
        """The cairn error for an SDK exception (None: not the store's business, let it propagate)."""
        del error, key
        return None

    @contextlib.contextmanager
    def _sdk_errors(self, key: str) -> Iterator[None]:
        """Turn the SDK's exceptions into cairn's through :meth:`_translate`; ``from None`` keeps secrets that an
        SDK message may carry out of chained tracebacks."""
        try:
            yield
        except ObjectStoreError:
            raise
        except Exception as error:
            translated = self._translate(error, key)
            if translated is None:
                raise
            raise translated from None

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """True or False where the store reports a checksum to compare with; None where it does not."""
        del name, filename
        return None

    # -- shared machinery -----------------------------------------------------------------------------------------

    def _retrying(self, what: str, call: Callable[..., T], *args: Any) -> T:
        """Run ``call`` with jittered exponential backoff (:func:`~cairn.storage.settings.retry_wait`) on transient
        failures; raise cairn's errors with ``what`` in them."""
        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.num_attempts)),
            wait=retry_wait(),
            retry=retry_if_exception_type(TransientStoreError),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "could not %s (attempt %d): %s",
                what,
                state.attempt_number,
                state.outcome.exception() if state.outcome else "?",
            ),
        )
        try:
            return retrying(call, *args)
        except ObjectStoreError as err:  # keeps the kind (not found, transient, permanent) for callers that retry
            raise type(err)(f"could not {what}: {err}") from None


def file_md5(filename: str, *, part_size: int | None = None) -> str:
    """Hex MD5 of a file; with ``part_size``, S3's multipart form: MD5 of the parts' MD5s, then ``-<parts>``."""
    whole = hashlib.md5(usedforsecurity=False)
    parts: list[bytes] = []
    with open(filename, "rb") as file:
        while chunk := file.read(part_size or 8 << 20):
            whole.update(chunk)
            if part_size:
                parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    if part_size is None:
        return whole.hexdigest()
    return f"{hashlib.md5(b''.join(parts), usedforsecurity=False).hexdigest()}-{len(parts)}"
