"""Helpers users reach for directly: seeding, object stores (re-exported from :mod:`cairn.storage`, also as
:mod:`cairn.utils.object_store`), and :mod:`cairn.utils.checkpoint` for saving and loading by hand."""

from __future__ import annotations

from typing import Any

from cairn.utils.object_store import STORES, ObjectStore
from cairn.utils.reproducibility import load_rng_state, make_seed, rng_state, seed_all

__all__ = [
    "FsspecObjectStore",
    "GCSObjectStore",
    "LibcloudObjectStore",
    "OCIObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "load_rng_state",
    "make_seed",
    "rng_state",
    "seed_all",
]


def __getattr__(name: str) -> Any:
    if name in STORES:
        from cairn.utils import object_store

        return getattr(object_store, name)
    raise AttributeError(f"module 'cairn.utils' has no attribute {name!r}")
