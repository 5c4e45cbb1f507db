"""Any store that fsspec reaches and cairn has no store of its own for: ``az://`` and ``abfs://`` (Azure Blob Storage,
through adlfs), ``file://``, ``memory://``, and every other scheme fsspec has a filesystem for.

fsspec speaks to each backend through one filesystem interface (``info``, ``find``, ``put_file``, ``get_file``), so
this one store covers them all; what differs between backends (which failures are worth another try, which checksum
the backend reports, whether a write can be refused when the object exists) is decided here, per failure class.
fsspec and the backend's package are imported when a store is built, never before: ``import cairn.storage`` works
without either.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from cairn.atomic import atomic_write, is_temporary
from cairn.errors import ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, ProgressCallback, TransientStoreError, file_md5

__all__ = ["FsspecObjectStore", "fsspec_scheme_problem", "split_fsspec_uri", "without_password"]

#: Schemes served by adlfs (Azure Blob Storage and Data Lake Gen2), installed by the ``azure`` extra.
AZURE_SCHEMES = frozenset({"az", "abfs", "abfss"})
#: Schemes whose objects are plain files on this machine: written through cairn's atomic write.
_LOCAL_SCHEMES = frozenset({"file", "local"})
#: Schemes whose objects are cheap to read back, so verification reads them (they report no checksum).
_READ_BACK_SCHEMES = _LOCAL_SCHEMES | {"memory"}
_NO_BUCKET = "-"  # what the base class is given as the bucket of a filesystem without buckets (file://, memory:///)
_SECRET_OPTION_WORDS = ("key", "secret", "password", "token", "credential", "connection_string", "sas")
_SECRET_ENVIRONMENT = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CLIENT_SECRET",
)
_SIGNATURE = re.compile(r"(sig=)[^&\s'\"]+", re.IGNORECASE)  # a SAS token's signature, wherever a URL shows it
#: Exceptions (by class name, so no SDK is imported to recognise them) that mean the connection failed or ended
#: early: azure-core's, aiohttp's (under adlfs, gcsfs, s3fs and http), and fsspec's own timeout.
_CONNECTION_FAILURES = frozenset(
    {
        "ServiceRequestError",
        "ServiceResponseError",
        "IncompleteReadError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "FSTimeoutError",
    }
)
#: Modules whose exceptions are the store's business (others, a TypeError say, are bugs and propagate as raised).
_BACKEND_MODULES = ("azure.", "aiohttp.", "adlfs", "fsspec", "gcsfs", "s3fs", "requests.", "urllib3.")
_CHUNK = 8 << 20
#: The Azure SDK waits 15 s before its first retry, then 18 s and 24 s. A few quick attempts inside the SDK, with
#: cairn's own retries (``num_attempts``, with their random pauses) on top, as for the other stores.
_AZURE_SDK_RETRIES = {"total_retries": 2, "connect_retries": 2, "read_retries": 2, "status_retries": 2}
_AZURE_SDK_BACKOFF = {"initial_backoff": 0.25, "increment_base": 1, "random_jitter_range": 0.2}


class FsspecObjectStore(ObjectStore):
    """The filesystem fsspec has for ``uri``'s scheme, seen as a bucket (the URI's host part) and a key prefix.

    ``uri`` is the store's root with an optional path that prefixes every name: ``az://container/run``,
    ``memory://bucket``, ``file:///mnt/shared/checkpoints`` (three slashes: a local path has no host). ``prefix`` is
    added after that path. ``storage_options`` go to the filesystem's constructor as they are (for adlfs:
    ``connection_string``, ``account_name``, ``account_key``, ``sas_token``, ...; without them it reads
    ``AZURE_STORAGE_CONNECTION_STRING`` and the other ``AZURE_STORAGE_*`` variables). Their secret values never reach
    a message or a repr.

    ``file://`` objects are written through cairn's atomic write (a temporary beside the target, then a rename), so a
    reader never sees half an object; ``memory://`` lives in this process only.
    """

    #: file:// resolves ``..`` on disk (outside the root), and aiohttp folds it out of adlfs's URLs (Azure then
    #: refuses the request's signature, a failure that blamed the credentials): such names are refused.
    keeps_dot_segments = False

    def __init__(
        self,
        uri: str,
        prefix: str = "",
        *,
        storage_options: dict[str, Any] | None = None,
        num_attempts: int = 3,
    ) -> None:
        scheme, netloc, path = split_fsspec_uri(uri)
        super().__init__(netloc or _NO_BUCKET, "/".join(part.strip("/") for part in (path, prefix) if part.strip("/")))
        self.bucket = netloc  # empty for a filesystem without buckets: its URIs start with three slashes
        self.scheme = scheme
        self.num_attempts = num_attempts
        options = dict(storage_options or {})
        self._secrets = _secret_values(options)
        self._fs = _filesystem(scheme, netloc, options, self._scrub)
        self._root = self._fs._strip_protocol(f"{scheme}://{netloc}/").rstrip("/")
        self._has_buckets = bool(netloc) and getattr(self._fs, "root_marker", "/") == ""
        self._upload_options = {"validate_content": True} if scheme in AZURE_SCHEMES else {}

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _upload(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        with self._sdk_errors(key):
            self._put(key, filename, callback, replace=True)

    def _upload_new(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """A conditional write where the backend has one: adlfs sends ``If-None-Match: *`` (``overwrite=False``),
        ``file://`` publishes with a hard link that fails on an existing name, and a filesystem whose ``put_file``
        takes ``mode="create"`` gets it. Others get the base class's check, then a plain write."""
        with self._sdk_errors(key):
            self._put(key, filename, callback, replace=False)

    def _download(self, key: str, filename: str, callback: ProgressCallback | None) -> None:
        """Into ``filename`` (a temporary the base class renames); a download that ends short is tried again."""
        with self._sdk_errors(key):
            total = int(self._file_info(key)["size"])
            if self.scheme in _LOCAL_SCHEMES:
                shutil.copyfile(self._path(key), filename)
            else:
                self._fs.get_file(self._path(key), filename, callback=_progress(callback))
        done = os.path.getsize(filename)
        if done != total:
            raise TransientStoreError(f"the download of {key!r} stopped after {done} of {total} bytes")
        if callback is not None:
            callback(total, total)

    def _size(self, key: str) -> int:
        with self._sdk_errors(key):
            return int(self._file_info(key)["size"])

    def _list(self, key_prefix: str) -> list[str]:
        return [key for key, _ in self._list_with_sizes(key_prefix)]

    def _list_with_sizes(self, key_prefix: str) -> list[tuple[str, int]]:
        """Every object whose key starts with ``key_prefix``, with its size from the listing: ``find`` under the
        prefix's folder (told the rest of the prefix where the filesystem takes it, as adlfs does), filtered."""
        folder, _, start = key_prefix.rpartition("/")
        with self._sdk_errors(key_prefix):
            options = {"prefix": start} if start and _takes(self._fs, "find", "prefix") else {}
            try:
                found = self._fs.find(self._path(folder) if folder else self._root or "/", detail=True, **options)
            except FileNotFoundError:
                found = {}
            entries = [(key, int(info["size"])) for key, info in self._objects(found) if key.startswith(key_prefix)]
            if not entries and self._bucket_missing():
                raise self._missing_bucket()
        return entries

    def _delete(self, key: str) -> None:
        """Remove the one file ``key``: looked up first, so that a folder (``file://``) or a name that only prefixes
        others is a missing object (which ``delete_object`` lets pass), never a folder removed with its contents.
        A ``file://`` folder left empty stays: removing it could pull it from under an upload starting in it."""
        with self._sdk_errors(key):
            self._file_info(key)
            self._fs.rm_file(self._path(key))

    def _checksum_matches(self, name: str, filename: str) -> bool | None:
        """Compare the MD5 the backend reports (Azure's ``Content-MD5``: the service's own for a blob sent in one
        request, the one declared at upload for a blob sent in blocks, see :meth:`_declared_md5`; GCS's
        ``md5Hash``); ``file://`` and ``memory://`` report none, but reading them back is cheap, so their content is
        hashed. None otherwise (a blob another tool uploaded in blocks): the size alone was compared."""
        key = self.key(name)
        with self._sdk_errors(key):
            remote = _reported_md5(self._file_info(key))
            if remote is None and self.scheme in _READ_BACK_SCHEMES:
                remote = self._object_md5(key)
        return None if remote is None else remote == file_md5(filename)

    def close(self) -> None:
        """adlfs keeps an aiohttp session per filesystem; close it so its sockets do not outlive the store."""
        client, loop = getattr(self._fs, "service_client", None), getattr(self._fs, "loop", None)
        if client is not None and loop is not None and hasattr(client, "close"):
            from fsspec.asyn import sync

            sync(loop, client.close)

    def _translate(self, error: Exception, key: str) -> ObjectStoreError | None:
        status = _status_of(error)
        if isinstance(error, FileExistsError) or status == 412:
            return ObjectExistsError(f"{self._uri_of(key)} already exists")
        if isinstance(error, FileNotFoundError) or status == 404:
            return self._missing_bucket() if self._bucket_missing() else self._missing_object(key)
        if isinstance(error, PermissionError) or status in (401, 403):
            where = "storage_options, or AZURE_STORAGE_CONNECTION_STRING" if self._azure else "storage_options"
            return ObjectStoreError(
                f"{self._uri_of(key)} refused access ({self._reason(error)}): check the credentials ({where}) and "
                "what they may access"
            )
        if _is_connection_failure(error) or (status is not None and (status >= 500 or status == 429)):
            return TransientStoreError(f"{type(error).__name__}: {self._reason(error)}")
        if isinstance(error, OSError) or type(error).__module__.startswith(_BACKEND_MODULES):
            return ObjectStoreError(f"{self.scheme}:// refused the request for {key!r}: {self._reason(error)}")
        return None

    # -- helpers --------------------------------------------------------------------------------------------------

    @property
    def _azure(self) -> bool:
        return self.scheme in AZURE_SCHEMES

    def _path(self, key: str) -> str:
        """The filesystem's path of ``key``: fsspec strips the protocol its own way (``az`` keeps the container,
        ``file`` and ``memory`` start with a slash)."""
        return self._fs._strip_protocol(f"{self.scheme}://{self.bucket}/{key}")

    def _key_of(self, path: str) -> str | None:
        """The key of a listed path, or None for what is no object (a ``file://`` upload's temporary)."""
        root = f"{self._root}/"
        if not path.startswith(root) or (self.scheme in _LOCAL_SCHEMES and is_temporary(path)):
            return None
        return path[len(root) :]

    def _objects(self, found: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(key, info)`` of each object in what ``find(detail=True)`` found."""
        for path, info in found.items():
            key = self._key_of(path)
            if key is not None and info.get("type", "file") == "file" and info.get("size") is not None:
                yield key, info

    def _uri_of(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def _put(self, key: str, filename: str, callback: ProgressCallback | None, *, replace: bool) -> None:
        size = os.path.getsize(filename)
        if self.scheme in _LOCAL_SCHEMES:

            def copy(temporary: str) -> None:
                shutil.copyfile(filename, temporary)

            atomic_write(self._path(key), copy, overwrite=replace, explain_failure=False)
        else:
            options = dict(self._upload_options) if replace else {**self._upload_options, **self._refusal()}
            options.update(self._declared_md5(filename, size))
            self._fs.put_file(filename, self._path(key), callback=_progress(callback), **options)
        if callback is not None:
            callback(size, size)

    def _declared_md5(self, filename: str, size: int) -> dict[str, Any]:
        """For an Azure blob the SDK uploads in blocks (above its single-request size, 64 MiB), the file's MD5 as
        the blob's ``Content-MD5``; nothing otherwise.

        Azure computes a blob's MD5 itself only when it arrives in one request; a blob committed from blocks has
        none, and its verification fell back to the size alone. The service cannot check a whole-blob MD5 given at
        commit (it stores it as given), but it checks each block against the MD5 the SDK sends with it
        (``validate_content=True``), so what landed is what was read; the declared MD5, taken from the file before
        the upload, then lets :meth:`verify_upload` (and any later reader) tell whether the file read was the file
        meant: one that changed while it went up, or another file of the same size, no longer passes.
        """
        if not self._azure or size <= _azure_single_put_size(self._fs):
            return {}
        return {"content_settings": {"content_md5": bytearray.fromhex(file_md5(filename))}}

    def _refusal(self) -> dict[str, Any]:
        """What makes this filesystem's ``put_file`` refuse an existing object, if anything does."""
        if _takes(self._fs, "put_file", "overwrite"):
            return {"overwrite": False}
        if _takes(self._fs, "put_file", "mode"):
            return {"mode": "create"}
        return {}

    def _file_info(self, key: str) -> dict[str, Any]:
        """The object's ``info``; a folder (``file://``) or a name that only prefixes others is no object."""
        info = self._fs.info(self._path(key))
        if info.get("type") != "file" or info.get("size") is None:
            raise FileNotFoundError(key)
        return info

    def _object_md5(self, key: str) -> str:
        if self.scheme in _LOCAL_SCHEMES:
            return file_md5(self._path(key))
        digest = hashlib.md5(usedforsecurity=False)
        with self._fs.open(self._path(key), "rb") as file:
            while chunk := file.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _bucket_missing(self) -> bool:
        """Whether the container (bucket) itself is missing: asked only after something was not found, and only
        of filesystems that have buckets. A failure to ask says nothing, so it counts as not missing."""
        if not self._has_buckets:
            return False
        try:
            self._fs.info(self._root)
        except FileNotFoundError:
            return True
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            return False
        return False

    def _missing_bucket(self) -> ObjectStoreError:
        kind = "container" if self._azure else "bucket"
        return ObjectStoreError(
            f"{self.scheme}://{self.bucket}: the {kind} {self.bucket!r} does not exist: create it or fix the name"
        )

    def _missing_object(self, key: str) -> ObjectNotFoundError:
        if not self.bucket:
            return ObjectNotFoundError(f"no object {self._uri_of(key)}")
        return ObjectNotFoundError(f"no object {key!r} in {self.scheme}://{self.bucket}")

    def _reason(self, error: BaseException) -> str:
        """The error's first line, secrets scrubbed; Azure's answers say most in their error code."""
        code = getattr(error, "error_code", None)
        code = getattr(code, "value", code)  # azure's StorageErrorCode is an enum of the service's words
        lines = str(error).strip().splitlines()
        text = lines[0] if lines else type(error).__name__
        if code and str(code) not in text:
            text = f"{text} ({code})"
        return self._scrub(text[:300])

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _SIGNATURE.sub(r"\1***", text)


def split_fsspec_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, host part, path)`` of a URI that fsspec is to serve, checked: the scheme is one fsspec knows and
    its filesystem is installed. Each refusal is a ``ValueError`` (``ImportError`` for a missing package) in one
    sentence that says what would work. The one parser for every URI is :func:`cairn.storage.uri.parse_uri`; this is
    its part for the schemes cairn has no store of its own for."""
    parts = urlsplit(uri)
    scheme, shown = parts.scheme, without_password(uri)
    if parts.password is not None:
        raise ValueError(
            f"{shown!r} holds a password: give credentials in backend_kwargs' storage_options or the environment "
            "instead"
        )
    if "::" in uri:
        raise ValueError(f"{shown!r}: chained fsspec URLs (a::b://...) are not supported; give the store's own URI")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: '?' and '#' have no meaning here; name the object by its path alone")
    if scheme in _LOCAL_SCHEMES and parts.netloc:
        raise ValueError(f"{shown!r}: a local path has no host; write it with three slashes, {scheme}:///absolute/path")
    problem = fsspec_scheme_problem(scheme)
    if problem is not None:
        kind, message = problem
        raise kind(f"{shown!r}: {message}")
    return scheme, parts.netloc, parts.path.lstrip("/")


def without_password(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` part (if any) replaced, fit to show in a message."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def fsspec_scheme_problem(scheme: str) -> tuple[type[Exception], str] | None:
    """Why fsspec cannot serve ``scheme`` here, as the exception to raise and its sentence: fsspec or the backend's
    package is not installed (``ImportError``), or fsspec knows no such scheme (``ValueError``). None when it can.
    Nothing is imported but fsspec's registry."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        extra = "azure" if scheme in AZURE_SCHEMES else "fsspec"
        return ImportError, (
            f"{scheme}:// is not one of cairn's own schemes, and the others go through fsspec, which is not "
            f"installed: pip install 'cairn[{extra}]'"
        )
    if scheme in registry:
        return None
    known = known_implementations.get(scheme)
    if known is None:
        return ValueError, f"unknown scheme {scheme!r}; use {known_schemes()}"
    package = str(known["class"]).split(".", 1)[0]
    if importlib.util.find_spec(package) is not None:
        return None
    if scheme in AZURE_SCHEMES:
        return ImportError, f"{scheme}:// needs adlfs: pip install 'cairn[azure]'"
    return ImportError, f"{scheme}:// needs the package {package!r}, which fsspec uses for it: pip install {package}"


def known_schemes() -> str:
    """The schemes that work, in words, for messages."""
    return (
        "one of s3://, gs://, oci://, libcloud://, or a scheme fsspec knows (az:// and abfs:// with "
        "pip install 'cairn[azure]'; file://, memory://, ... with pip install 'cairn[fsspec]')"
    )


def _filesystem(scheme: str, netloc: str, options: dict[str, Any], scrub: Callable[[str], str]) -> Any:
    """A filesystem of its own for this store (not fsspec's shared instance: closing it must not close another
    store's), without a listings cache (another writer's objects must show at once). What the URI's host part says
    (an FTP or HDFS host and port, an ``abfs://container@account...`` account) is read as fsspec reads it from a
    URL; ``options`` win over it."""
    from fsspec.registry import get_filesystem_class

    try:
        filesystem_class = get_filesystem_class(scheme)
        settings = {
            "skip_instance_cache": True,
            "use_listings_cache": False,
            **filesystem_class._get_kwargs_from_urls(f"{scheme}://{netloc}/"),
            **options,
        }
        filesystem = filesystem_class(**settings)
    except ImportError as err:
        problem = fsspec_scheme_problem(scheme)
        raise ImportError(
            problem[1] if problem else f"{scheme}:// needs a package fsspec could not import: {err}"
        ) from None
    except TypeError as err:
        raise ValueError(
            f"could not set up fsspec's {scheme!r} filesystem from storage_options with keys {sorted(options)}: "
            f"{scrub(str(err))}; check them against its documentation"
        ) from None
    except (ValueError, OSError) as err:
        hint = (
            "; set AZURE_STORAGE_CONNECTION_STRING, or give connection_string, or account_name with account_key or "
            "sas_token, in storage_options"
            if scheme in AZURE_SCHEMES
            else ""
        )
        raise ObjectStoreError(
            f"could not set up fsspec's {scheme!r} filesystem (storage_options keys {sorted(options)}): "
            f"{scrub(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)}{hint}"
        ) from None
    _quicken_azure_retries(filesystem)
    return filesystem


def _quicken_azure_retries(filesystem: Any) -> None:
    """Give adlfs's client a few quick retries instead of the Azure SDK's 15 s pauses (see ``_AZURE_SDK_BACKOFF``).

    adlfs builds the client itself and offers no setting for it; the policy object is shared by every blob client
    it makes, so changing it once covers them all. A client without one is left as it is.
    """
    config = getattr(getattr(filesystem, "service_client", None), "_config", None)
    policy = getattr(config, "retry_policy", None)
    if policy is None or not all(hasattr(policy, name) for name in (*_AZURE_SDK_RETRIES, *_AZURE_SDK_BACKOFF)):
        return
    for name, value in {**_AZURE_SDK_RETRIES, **_AZURE_SDK_BACKOFF}.items():
        setattr(policy, name, value)


def _azure_single_put_size(filesystem: Any) -> int:
    """The largest blob the Azure SDK sends in one request (its ``max_single_put_size``, 64 MiB by default)."""
    config = getattr(getattr(filesystem, "service_client", None), "_config", None)
    return int(getattr(config, "max_single_put_size", 64 << 20))


def _takes(filesystem: Any, method: str, argument: str) -> bool:
    """Whether ``filesystem.<method>`` (or its async form, which the sync one wraps) declares ``argument``."""
    for name in (f"_{method}", method):
        function = getattr(type(filesystem), name, None)
        if function is None:
            continue
        try:
            if argument in inspect.signature(function).parameters:
                return True
        except (TypeError, ValueError):
            continue
    return False


def _progress(callback: ProgressCallback | None) -> Any:
    """An fsspec callback that reports (done, total) to ``callback``."""
    from fsspec.callbacks import Callback, NoOpCallback

    if callback is None:
        return NoOpCallback()

    class _Report(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            if self.size:
                callback(min(self.value, self.size), self.size)

    return _Report()


def _reported_md5(info: dict[str, Any]) -> str | None:
    """A hex MD5 the backend reported for the whole object: Azure's ``content_md5`` (bytes; absent for a blob
    another tool uploaded in blocks), GCS's ``md5Hash`` (base64). ETags are left alone: not every store makes them
    MD5s."""
    settings = info.get("content_settings")
    raw = settings.get("content_md5") if isinstance(settings, dict) else getattr(settings, "content_md5", None)
    if raw:
        return bytes(raw).hex()
    encoded = info.get("md5Hash")
    if isinstance(encoded, str) and encoded:
        try:
            return base64.b64decode(encoded, validate=True).hex()
        except ValueError:
            return None
    return None


def _status_of(error: BaseException) -> int | None:
    """The HTTP status a backend's exception carries: azure-core's ``status_code``, aiohttp's ``status``, gcsfs's
    ``code``."""
    for attribute in ("status_code", "status", "code"):
        value = getattr(error, attribute, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _is_connection_failure(error: BaseException) -> bool:
    """Whether the connection failed or ended early, told by the error or by what it was raised from: the Azure
    SDK reports a download cut short as a plain ``HttpResponseError`` raised from its ``IncompleteReadError``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _CONNECTION_FAILURES for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def _secret_values(options: dict[str, Any]) -> tuple[str, ...]:
    """Values that must never be shown: secret-looking storage options, the Azure variables adlfs reads, and the
    key and signature inside a connection string."""
    values = [str(value) for name, value in options.items() if _is_secret(name) and isinstance(value, str) and value]
    values += [os.environ[name] for name in _SECRET_ENVIRONMENT if os.environ.get(name)]
    for text in list(values):
        for part in text.split(";"):
            name, _, value = part.partition("=")
            if name.strip().lower() in ("accountkey", "sharedaccesssignature") and value:
                values.append(value)
    return tuple(sorted({value for value in values if len(value) >= 4}, key=len, reverse=True))


def _is_secret(option: str) -> bool:
    return any(word in option.lower() for word in _SECRET_OPTION_WORDS)
