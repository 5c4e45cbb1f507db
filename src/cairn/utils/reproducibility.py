"""Seeds and random-number-generator states: what makes two runs, or a run and its resumption, the same."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
import xxhash

__all__ = [
    "MAX_SEED",
    "check_generator_states",
    "check_rng_state",
    "joining_rank_seed",
    "load_rng_state",
    "make_seed",
    "rank_seed",
    "rng_state",
    "seed_all",
]

MAX_SEED = 2**31 - 1  # the largest seed every generator (Python, NumPy, torch) takes


def make_seed() -> int:
    """A fresh seed from the operating system, so choosing one does not disturb any seeded generator."""
    return int.from_bytes(os.urandom(4), "little") % MAX_SEED


def rank_seed(rank_zero_seed: int, rank: int) -> int:
    """Each rank's own seed, so ranks draw different dropout masks from one run seed."""
    return (rank_zero_seed + rank) % (MAX_SEED + 1)


def joining_rank_seed(rank_zero_seed: int, batch: int, rank: int) -> int:
    """The seed of a rank that joins a resumed run its checkpoint has no random state for (the run was saved on
    fewer ranks): its own (never rank 0's, whose dropout masks it would repeat), and the same each time that
    checkpoint is resumed, as it mixes in where the run stands rather than the clock."""
    mixed = xxhash.xxh64_intdigest(f"cairn-joining-rank|{rank_zero_seed}|{batch}|{rank}".encode())
    return mixed % (MAX_SEED + 1)


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r}: use an integer from 0 to {MAX_SEED}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain data (lists, ints, tensors), so that weights-only loading accepts it."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back where :func:`rng_state` found it."""
    _set_generators(state, random, np.random, torch.default_generator)
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _set_generators(state: dict[str, Any], python: Any, numpy: Any, generator: torch.Generator) -> None:
    """Load ``state`` into the given generators: the global ones to restore, throwaway ones to try it first."""
    saved = state["python"]
    python.setstate((int(saved["version"]), tuple(int(v) for v in saved["state"]), saved["gauss"]))
    saved = state["numpy"]
    numpy.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": int(saved["pos"])},
            "has_gauss": int(saved["has_gauss"]),
            "gauss": float(saved["gauss"]),
        }
    )
    generator.set_state(state["torch"])


def check_generator_states(states: Any) -> None:
    """Raise ``ValueError`` unless ``states`` maps names to states a ``torch.Generator`` accepts (tried on a
    throwaway one), as a data loader's generators were saved."""
    if not isinstance(states, dict) or not all(isinstance(s, torch.Tensor) for s in states.values()):
        raise ValueError("generator states must be a dict of tensors")
    for name, state in states.items():
        try:
            torch.Generator().set_state(state)
        except (TypeError, RuntimeError) as err:
            raise ValueError(f"generator state {name!r} is refused by torch ({err})") from None


def check_rng_state(state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` has the shape :func:`rng_state` produces; loading it cannot then fail."""

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise ValueError(f"rng state: {what}")

    require(isinstance(state, dict), "not a dict")
    python, numpy, torch_state = state.get("python"), state.get("numpy"), state.get("torch")
    require(isinstance(python, dict) and isinstance(python.get("version"), int), "no python generator state")
    internal = python["state"] if isinstance(python, dict) else None
    require(isinstance(internal, (list, tuple)) and len(internal) == 625, "python state is not 625 integers")
    require(all(isinstance(v, int) and not isinstance(v, bool) for v in internal), "python state holds non-integers")
    require(python.get("gauss") is None or isinstance(python.get("gauss"), float), "python gauss is not a float")
    require(isinstance(numpy, dict) and numpy.get("bit_generator") == "MT19937", "no numpy MT19937 state")
    key = numpy.get("key")
    require(isinstance(key, torch.Tensor) and key.shape == (624,) and not key.is_floating_point(), "bad numpy key")
    require(all(isinstance(numpy.get(k), t) for k, t in (("pos", int), ("has_gauss", int), ("gauss", float))), "numpy")
    require(isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8, "torch state is not bytes")
    cuda = state.get("cuda", [])
    require(
        isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda), "cuda"
    )
    require(not isinstance(python["version"], bool), "python version is not a number")
    try:  # the types are right; the generators themselves judge the values
        _set_generators(state, random.Random(), np.random.RandomState(), torch.Generator())
    except (TypeError, ValueError, RuntimeError, KeyError, OverflowError) as err:  # numpy: pos=2**70
        raise ValueError(f"rng state: the generators refuse it ({err})") from None
