"""One parser for every URI cairn accepts: ``s3://``, ``gs://``, ``oci://`` and ``libcloud://``."""

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
    bucket: str
    path: str  # inside the bucket, without a leading slash

    @property
    def bucket_uri(self) -> str:
        return f"{self.scheme}://{self.bucket}"


def is_uri(value: object) -> bool:
    return isinstance(value, str) and "://" in value


def parse_uri(uri: str) -> ParsedUri:
    """Split ``scheme://bucket/path``; refuse anything else with a sentence that says what would work."""
    if not is_uri(uri):
        raise ValueError(f"{uri!r} is not a URI; write it as scheme://bucket/path with a scheme of {_schemes()}")
    parts = urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{uri!r}: unknown scheme {parts.scheme!r}; use one of {_schemes()}")
    if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError(f"{uri!r} names no bucket; write it as {parts.scheme}://bucket/path")
    if parts.query or parts.fragment:
        raise ValueError(f"{uri!r}: '?' and '#' have no meaning here; name the object by its path alone")
    return ParsedUri(parts.scheme, parts.netloc, parts.path.lstrip("/"))


def store_from_uri(uri: str, backend_kwargs: dict[str, Any] | None = None) -> tuple[ObjectStore, str]:
    """The store for ``uri``'s bucket, and the path inside it. ``backend_kwargs`` go to the store's constructor."""
    parsed = parse_uri(uri)
    kwargs = dict(backend_kwargs or {})
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
    return LibcloudObjectStore(**kwargs), parsed.path


def _schemes() -> str:
    return ", ".join(f"{s}://" for s in SCHEMES)
