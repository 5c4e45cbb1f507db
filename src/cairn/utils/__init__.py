"""Helpers users reach for directly (seeding now; object stores and manual checkpoint helpers as they land)."""

from cairn.utils.reproducibility import make_seed, seed_all

__all__ = ["make_seed", "seed_all"]
