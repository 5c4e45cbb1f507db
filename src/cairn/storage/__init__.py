"""Object stores behind one small protocol (:class:`ObjectStore`): cairn's own for S3, GCS, OCI and Libcloud, and
:class:`FsspecObjectStore` for any other scheme fsspec knows; one URI parser for all of them, and the
:class:`Transfers` that move files to and from a store in the background (the store's ``latest`` pointer is
:mod:`cairn.storage.pointer`'s).

The store classes import their SDKs (and fsspec) lazily, so ``import cairn.storage`` works with none installed.
"""

from __future__ import annotations

from typing import Any

from cairn.storage.base import ObjectStore
from cairn.storage.transfer import Transfers
from cairn.storage.uri import parse_uri, store_from_uri

__all__ = [
    "FsspecObjectStore",
    "GCSObjectStore",
    "LibcloudObjectStore",
    "OCIObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "Transfers",
    "parse_uri",
    "store_from_uri",
]

_LAZY = {
    "S3ObjectStore": "cairn.storage.s3",
    "GCSObjectStore": "cairn.storage.gcs",
    "OCIObjectStore": "cairn.storage.oci",
    "LibcloudObjectStore": "cairn.storage.libcloud",
    "FsspecObjectStore": "cairn.storage.fsspec",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cairn.storage' has no attribute {name!r}")
