"""Where the training data stands, so that a resumed run sees the same batches, in the same order.

A shuffling ``DataLoader`` without a generator draws its shuffle seed from torch's global generator when its
iterator is created. So at the start of every epoch the generators' states are recorded in
``state.dataset_state``; a run resumed mid-epoch rewinds them to that point, creates the iterator (which draws
the same seed, hence the same order), skips the batches already trained on, and then restores the generators to
the checkpoint's moment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _SingleProcessDataLoaderIter

from cairn.core.state import State
from cairn.utils.reproducibility import load_rng_state, rng_state

__all__ = ["epoch_iterator"]

EPOCH_START_RNG = "epoch_start_rng"


def epoch_iterator(loader: Iterable[Any], state: State) -> Iterator[Any]:
    """An iterator over the rest of the current epoch of ``loader``."""
    _set_sampler_epoch(loader, state.timestamp.epoch)
    done = state.timestamp.batch_in_epoch
    if done == 0:
        state.dataset_state[EPOCH_START_RNG] = rng_state()
        return iter(loader)
    if EPOCH_START_RNG not in state.dataset_state:
        raise ValueError(
            f"cannot resume mid-epoch (batch {done} of epoch {state.timestamp.epoch}): the checkpoint has no "
            "dataset position; resume from a checkpoint taken at an epoch boundary"
        )
    at_checkpoint = rng_state()
    load_rng_state(state.dataset_state[EPOCH_START_RNG])
    iterator = iter(loader)
    _skip(loader, iterator, done)
    load_rng_state(at_checkpoint)
    return iterator


def _skip(loader: Iterable[Any], iterator: Iterator[Any], batches: int) -> None:
    """Advance past ``batches`` batches: by index alone when the loader allows it, else by fetching them."""
    indices = getattr(iterator, "_sampler_iter", None)
    index_only = (
        isinstance(loader, DataLoader)
        and isinstance(iterator, _SingleProcessDataLoaderIter)
        and not isinstance(loader.dataset, IterableDataset)
        and indices is not None
    )
    for _ in range(batches):
        if index_only:
            next(indices)  # type: ignore[arg-type]
            iterator._num_yielded += 1  # type: ignore[attr-defined]
        else:
            next(iterator)


def _set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Samplers such as ``DistributedSampler`` reshuffle by epoch number."""
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
