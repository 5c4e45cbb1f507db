"""Helpers users reach for directly (seeding now; object stores and manual checkpoint helpers as they land)."""

from cairn.utils.reproducibility import load_rng_state, make_seed, rng_state, seed_all

__all__ = ["load_rng_state", "make_seed", "rng_state", "seed_all"]
