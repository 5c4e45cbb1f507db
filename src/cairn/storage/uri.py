"""One parser for every URI cairn accepts: ``s3://``, ``gs://``, ``oci://`` and ``libcloud://`` for cairn's own stores,
and any other scheme fsspec knows (``az://``, ``abfs://``, ``file://``, ``memory://``, ...) for
:class:`~cairn.storage.fsspec.FsspecObjectStore`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cairn.storage.base import ObjectStore

__all__ = ["SCHEMES", "ParsedUri", "is_uri", "parse_uri", "store_from_uri"]

SCHEMES = ("s3", "gs", "oci", "libcloud")


@dataclass(frozen=True)
class ParsedUri:
    scheme: str
    bucket: str  # empty for a filesystem without buckets: file:///path
    path: str  # inside the bucket, without a leading slash

    @property
    def bucket_uri(self) -> str:
        return f"{self.scheme}://{self.bucket}"


def is_uri(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def parse_uri(uri: str) -> ParsedUri:
    """Split ``scheme://bucket/path``; refuse anything else with a sentence that says what would work.

    A scheme that is not one of :data:`SCHEMES` goes to fsspec, which must know it and have its package installed
    (an ``ImportError`` that names the extra to install otherwise); the host part may then be empty
    (``file:///absolute/path``) or hold a port.
    """
    if not is_uri(uri):
        raise ValueError(f"{uri!r} is not a URI; write it as scheme://bucket/path with a scheme of {_schemes()}")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        from cairn.storage.fsspec import split_fsspec_uri

        return ParsedUri(*split_fsspec_uri(uri))
    if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
        from cairn.storage.fsspec import without_password

        raise ValueError(f"{without_password(uri)!r} names no bucket; write it as {parts.scheme}://bucket/path")
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: '?' and '#' have no meaning here; name the object by its path alone")
    return ParsedUri(parts.scheme, parts.netloc, parts.path.lstrip("/"))


def store_from_uri(uri: str, backend_kwargs: dict[str, Any] | None = None) -> tuple[ObjectStore, str]:
    """The store for ``uri``'s bucket, and the path inside it. ``backend_kwargs`` go to the store's constructor
    (for :class:`~cairn.storage.fsspec.FsspecObjectStore`: ``storage_options``, ``prefix``, ``num_attempts``)."""
    parsed = parse_uri(uri)
    kwargs = dict(backend_kwargs or {})
    if parsed.scheme not in SCHEMES:
        from cairn.storage.fsspec import FsspecObjectStore

        return FsspecObjectStore(parsed.bucket_uri, **kwargs), parsed.path
    if parsed.scheme == "s3":
        from cairn.storage.s3 import S3ObjectStore

        return S3ObjectStore(parsed.bucket, **kwargs), parsed.path
    if parsed.scheme == "gs":
        from cairn.storage.gcs import GCSObjectStore

        return GCSObjectStore(parsed.bucket, **kwargs), parsed.path
    if parsed.scheme == "oci":
        from cairn.storage.oci import OCIObjectStore

        return OCIObjectStore(parsed.bucket, **kwargs), parsed.path
    from cairn.storage.libcloud import LibcloudObjectStore

    kwargs.setdefault("container", parsed.bucket)
    if "provider" not in kwargs:
        raise ValueError(
            f"{uri!r}: a libcloud:// URI names a container but not its provider; pass backend_kwargs={{'provider': "
            "'AZURE_BLOBS', 'key': ..., 'secret': ...} (a RemoteUploaderDownloader's), or use the provider's own "
            "scheme (s3://, gs://, az://)"
        )
    return LibcloudObjectStore(**kwargs), parsed.path


def _schemes() -> str:
    return ", ".join(f"{s}://" for s in SCHEMES) + ", or any scheme fsspec knows (az://, file://, memory://, ...)"
