"""The object stores under the reference's import path: ``from cairn.utils.object_store import S3ObjectStore``.

They live in :mod:`cairn.storage`; the store classes are imported on first use (each imports its SDK, or fsspec, only
when built), so importing this module costs no cloud SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cairn.storage import ObjectStore

if TYPE_CHECKING:  # imported on first use at run time (__getattr__ below)
    from cairn.storage import FsspecObjectStore, GCSObjectStore, LibcloudObjectStore, OCIObjectStore, S3ObjectStore

__all__ = [
    "FsspecObjectStore",
    "GCSObjectStore",
    "LibcloudObjectStore",
    "OCIObjectStore",
    "ObjectStore",
    "S3ObjectStore",
]

STORES = ("FsspecObjectStore", "GCSObjectStore", "LibcloudObjectStore", "OCIObjectStore", "S3ObjectStore")


def __getattr__(name: str) -> Any:
    if name in STORES:
        import cairn.storage

        return getattr(cairn.storage, name)
    raise AttributeError(f"module 'cairn.utils.object_store' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *STORES])
