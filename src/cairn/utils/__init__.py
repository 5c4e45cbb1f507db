"""Helpers users reach for directly: seeding, object stores (re-exported from :mod:`cairn.storage`), and
:mod:`cairn.utils.checkpoint` for saving and loading by hand."""

from __future__ import annotations

from typing import Any

from cairn.storage import ObjectStore
from cairn.utils.reproducibility import load_rng_state, make_seed, rng_state, seed_all

__all__ = [
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
    if name in ("S3ObjectStore", "GCSObjectStore", "OCIObjectStore", "LibcloudObjectStore"):
        import cairn.storage

        return getattr(cairn.storage, name)
    raise AttributeError(f"module 'cairn.utils' has no attribute {name!r}")
