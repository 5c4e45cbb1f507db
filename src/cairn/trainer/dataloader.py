"""Where the training data stands, so that a resumed run sees the same batches, in the same order.

A shuffling ``DataLoader`` without a generator draws its shuffle seed from torch's global generator when its
iterator is created. So at the start of every epoch the generators' states are recorded in
``state.dataset_state``; a run resumed mid-epoch rewinds them to that point, creates the iterator (which draws
the same seed, hence the same order), skips the batches already trained on, and then restores the generators to
the checkpoint's moment. A loader built with its own ``generator`` (or a sampler with one) is handled the same way:
its state is recorded at the epoch's start and at every checkpoint, and put back on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _SingleProcessDataLoaderIter

from cairn.core.state import State
from cairn.errors import CheckpointIncompatibleError
from cairn.names import EPOCH_START_GENERATORS, EPOCH_START_RNG, GENERATORS
from cairn.utils.reproducibility import load_rng_state, rng_state

__all__ = ["epoch_iterator", "record_loader_position", "restore_loader_position"]



def epoch_iterator(loader: Iterable[Any], state: State) -> Iterator[Any]:
    """An iterator over the rest of the current epoch of ``loader``."""
    _set_sampler_epoch(loader, state.timestamp.epoch)
    done = state.timestamp.batch_in_epoch
    if done == 0:
        state.dataset_state[EPOCH_START_RNG] = rng_state()
        state.dataset_state[EPOCH_START_GENERATORS] = _generator_states(loader)
        return iter(loader)
    if EPOCH_START_RNG not in state.dataset_state:
        raise ValueError(
            f"cannot resume mid-epoch (batch {done} of epoch {state.timestamp.epoch}): the checkpoint has no "
            "dataset position; resume from a checkpoint taken at an epoch boundary"
        )
    at_checkpoint = rng_state()
    load_rng_state(state.dataset_state[EPOCH_START_RNG])
    _set_generator_states(loader, state.dataset_state.get(EPOCH_START_GENERATORS))
    iterator = iter(loader)
    _skip(loader, iterator, done)
    load_rng_state(at_checkpoint)
    return iterator


def record_loader_position(loader: Iterable[Any], state: State) -> None:
    """Note the loader's own generators as they are now; the Trainer calls this before each checkpoint event."""
    generators = _generator_states(loader)
    if generators:
        state.dataset_state[GENERATORS] = generators


def restore_loader_position(loader: Iterable[Any], state: State) -> None:
    """After a checkpoint is loaded: put the loader's own generators where they were when it was taken."""
    _set_generator_states(loader, state.dataset_state.get(GENERATORS))


def _loader_generators(loader: Iterable[Any]) -> dict[str, torch.Generator]:
    """The generators a loader shuffles with, by where they sit; one object reached twice is listed once."""
    found: dict[str, torch.Generator] = {}
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    places = {
        "loader": getattr(loader, "generator", None),
        "sampler": getattr(sampler, "generator", None),
        "batch_sampler.sampler": getattr(getattr(batch_sampler, "sampler", None), "generator", None),
    }
    for place, generator in places.items():
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found.values()):
            found[place] = generator
    return found


def _generator_states(loader: Iterable[Any]) -> dict[str, torch.Tensor]:
    return {place: generator.get_state() for place, generator in _loader_generators(loader).items()}


def _set_generator_states(loader: Iterable[Any], states: dict[str, torch.Tensor] | None) -> None:
    if not states:
        return
    for place, generator in _loader_generators(loader).items():
        if place in states:
            generator.set_state(states[place])


def _skip(loader: Iterable[Any], iterator: Iterator[Any], batches: int) -> None:
    """Advance past ``batches`` batches: by index alone when the loader allows it, else by fetching them."""
    indices = getattr(iterator, "_sampler_iter", None)
    index_only = (
        isinstance(loader, DataLoader)
        and isinstance(iterator, _SingleProcessDataLoaderIter)
        and not isinstance(loader.dataset, IterableDataset)
        and indices is not None
    )
    for skipped in range(batches):
        try:
            if index_only:
                next(indices)  # type: ignore[arg-type]
                iterator._num_yielded += 1  # type: ignore[attr-defined]
            else:
                next(iterator)
        except StopIteration:  # inside the loop's generator it would become a bare "generator raised StopIteration"
            raise CheckpointIncompatibleError(
                f"the checkpoint resumes after batch {batches} of its epoch, but train_dataloader ends after "
                f"{skipped}; resume with the data loader the checkpoint was saved with"
            ) from None


def _set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Samplers such as ``DistributedSampler`` reshuffle by epoch number."""
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
