"""Seeds and random-number-generator states: what makes two runs, or a run and its resumption, the same."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["make_seed", "seed_all"]

_MAX_SEED = 2**31 - 1


def make_seed() -> int:
    """A fresh seed from the operating system, so choosing one does not disturb any seeded generator."""
    return int.from_bytes(os.urandom(4), "little") % _MAX_SEED


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed={seed!r}: use an integer from 0 to {_MAX_SEED}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
