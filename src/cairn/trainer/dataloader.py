"""Where the training data stands, so that a resumed run sees the same batches, in the same order.

Three ways back to the middle of an epoch, the first that applies:

1. **The loader's own state.** A loader, dataset or sampler that offers ``state_dict()``/``load_state_dict()``
   (torchdata's ``StatefulDataLoader`` included, workers and all) has that state saved per rank in every
   checkpoint (:mod:`cairn.core.loader_state`); on resume it is loaded before the epoch's iterator is made, and no
   batch is fetched twice. Resuming at batch 100,000 costs what resuming at batch 100 does.
2. **Fast-forward.** Otherwise the epoch is replayed from its start. A shuffling ``DataLoader`` without a
   generator draws its shuffle seed from torch's global generator when its iterator is created, so at the start of
   every epoch the generators' states are recorded in ``state.dataset_state``; a run resumed mid-epoch rewinds them
   to that point, creates the iterator (which draws the same seed, hence the same order), skips the batches already
   trained on, and then restores the generators to the checkpoint's moment. A map-style dataset loaded in the main
   process is skipped by index alone; anything else is fetched and thrown away, with a warning and a progress bar.
   A loader built with its own ``generator`` (or a sampler with one) is handled the same way.
3. **Another number of ranks.** The epoch's split was recorded at its start, so the samples the saving run had
   left are shared among the new ranks, each handed out once (:mod:`cairn.trainer.resplit`), or the resume is
   refused with an error that offers ``load_at_epoch_boundary=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.dataloader import _SingleProcessDataLoaderIter
from tqdm import tqdm

from cairn.core.loader_state import check_loader_state_fits, load_loader_state, why_replayed
from cairn.core.state import State
from cairn.errors import CheckpointCorruptError, CheckpointIncompatibleError
from cairn.names import EPOCH_SPLIT, EPOCH_START_GENERATORS, EPOCH_START_RNG, GENERATORS, LOADER_STATES
from cairn.trainer.distributed import loader_like
from cairn.trainer.resplit import Rest, describe_split, is_resplit, resplit_record, rest_of_epoch
from cairn.utils.dist import get_rank, get_world_size
from cairn.utils.reproducibility import load_rng_state, rng_state

__all__ = ["ResumePoint", "epoch_iterator", "record_loader_position", "restore_loader_position"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """How this run's first epoch continues mid-way, decided when the checkpoint is loaded (before any training
    time is spent): from this rank's saved loader state, or from its share of a re-split epoch."""

    loader_state: Any = None
    rest: Rest | None = None
    epoch_length: int | None = None  # batches in the resumed epoch on this run's ranks, when re-split


def epoch_iterator(
    loader: Iterable[Any], state: State, resume: ResumePoint | None = None, *, show_progress: bool = True
) -> Iterator[Any]:
    """An iterator over the rest of the current epoch of ``loader``; ``resume`` is what
    :func:`restore_loader_position` decided for the first epoch of a resumed run."""
    _set_sampler_epoch(loader, state.timestamp.epoch)
    done = state.timestamp.batch_in_epoch
    if done == 0:
        state.dataset_state[EPOCH_START_RNG] = rng_state()
        state.dataset_state[EPOCH_START_GENERATORS] = _generator_states(loader)
        state.dataset_state[EPOCH_SPLIT] = describe_split(loader, get_world_size())
        return iter(loader)
    if resume is not None and resume.loader_state is not None:
        return _untouched_rng(lambda: _continued(loader, resume.loader_state, state))
    if resume is not None and resume.rest is not None:
        return _untouched_rng(lambda: iter(loader_like(loader, resume.rest.indices)))  # type: ignore[union-attr]
    if EPOCH_START_RNG not in state.dataset_state:
        raise ValueError(
            f"cannot resume mid-epoch (batch {done} of epoch {state.timestamp.epoch}): the checkpoint has no "
            "dataset position; resume from a checkpoint taken at an epoch boundary"
        )
    at_checkpoint = rng_state()
    load_rng_state(state.dataset_state[EPOCH_START_RNG])
    _set_generator_states(loader, state.dataset_state.get(EPOCH_START_GENERATORS))
    iterator = iter(loader)
    _skip(loader, iterator, done, epoch=int(state.timestamp.epoch), show_progress=show_progress)
    load_rng_state(at_checkpoint)
    return iterator


def _untouched_rng(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """The iterator ``make()`` returns, with the global generators as they were before it: making an iterator draws
    seeds from them, which the run that was never stopped drew at the epoch's start, not here."""
    at_checkpoint = rng_state()
    try:
        return make()
    finally:
        load_rng_state(at_checkpoint)


def _continued(loader: Iterable[Any], saved: Any, state: State) -> Iterator[Any]:
    load_loader_state(loader, saved, source=str(state.resumed_from))
    return iter(loader)


def record_loader_position(loader: Iterable[Any], state: State) -> None:
    """Note the loader's own generators as they are now; the Trainer calls this before each checkpoint event."""
    generators = _generator_states(loader)
    if generators:
        state.dataset_state[GENERATORS] = generators


def restore_loader_position(
    loader: Iterable[Any], state: State, *, at_epoch_boundary: bool = False
) -> ResumePoint | None:
    """After a checkpoint is loaded: put the loader's own generators where they were when it was taken, and decide
    how its epoch continues (see the module's docstring). Everything that can refuse the resume refuses here, when
    the Trainer is built, not after the first epoch's worth of set-up.

    ``at_epoch_boundary`` moves a mid-epoch checkpoint's run to the start of the next epoch: the rest of the saved
    epoch is not trained (nor its epoch-end evaluation and checkpoint run).
    """
    _set_generator_states(loader, state.dataset_state.get(GENERATORS))
    saved_states = state.dataset_state.pop(LOADER_STATES, None)  # each checkpoint takes them afresh
    if state.resumed_from is None:
        return None
    done = int(state.timestamp.batch_in_epoch)
    if done and at_epoch_boundary:
        state.advance(state.timestamp.to_next_epoch())
        log.warning("load_at_epoch_boundary: resuming at the start of epoch %d", int(state.timestamp.epoch))
        return None  # the saved loader state is mid-epoch: the next epoch starts afresh
    source = str(state.resumed_from)
    split = state.dataset_state.get(EPOCH_SPLIT)
    saved_world = split.get("world_size") if isinstance(split, dict) else None
    world = get_world_size()
    if done == 0:  # at an epoch's end the loader starts its next epoch as a freshly built one does: a state saved
        return None  # at the end of an epoch would, loaded, continue that finished epoch (an empty one)
    if (saved_world is None or saved_world == world) and not is_resplit(split):  # None: saved before splits were
        return _same_ranks(loader, saved_states, world, source)  # recorded, by as many ranks as this run has
    rest = rest_of_epoch(
        split, loader, epoch=int(state.timestamp.epoch), done=done, rank=get_rank(), world_size=world, source=source
    )
    state.dataset_state[EPOCH_SPLIT] = resplit_record(split, done, world)  # stopped again, it resumes from here
    log.warning(
        "resuming batch %d of epoch %d on %d ranks, saved by %d: this rank takes %d of the samples left, in %d batches",
        done, int(state.timestamp.epoch), world, saved_world, len(rest.indices), rest.batches,
    )  # fmt: skip
    return ResumePoint(rest=rest, epoch_length=done + rest.batches)


def _same_ranks(loader: Iterable[Any], saved_states: Any, world: int, source: str) -> ResumePoint | None:
    if saved_states is None:
        return None
    if not isinstance(saved_states, list) or len(saved_states) != world:
        raise CheckpointCorruptError(
            f"{source!r} holds data-loader states for {len(saved_states) if isinstance(saved_states, list) else 'no'} "
            f"ranks, but it was saved by {world}; it is damaged or was edited: load another checkpoint"
        )
    mine = saved_states[get_rank()]
    if mine is None:
        return None
    check_loader_state_fits(loader, mine, source=source)  # loaded when the epoch's iterator is made, after set_epoch
    return ResumePoint(loader_state=mine)


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


def _skip(loader: Iterable[Any], iterator: Iterator[Any], batches: int, *, epoch: int, show_progress: bool) -> None:
    """Advance past ``batches`` batches: by index alone when the loader allows it, else by fetching them (said
    loudly, with a progress bar: at batch 100,000 of a tokenized corpus that is hours)."""
    indices = getattr(iterator, "_sampler_iter", None)
    index_only = (
        isinstance(loader, DataLoader)
        and isinstance(iterator, _SingleProcessDataLoaderIter)
        and not isinstance(loader.dataset, IterableDataset)
        and indices is not None
    )
    replaying = not index_only
    if replaying:
        log.warning(
            "resuming at batch %d of epoch %d fetches and throws away the %d batches before it: %s",
            batches, epoch, batches, why_replayed(loader),
        )  # fmt: skip
    bar = tqdm(
        total=batches, desc="replaying batches", unit="ba", leave=False, disable=not (replaying and show_progress)
    )
    for skipped in range(batches):
        bar.update()
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
    bar.close()


def _set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Samplers such as ``DistributedSampler`` reshuffle by epoch number."""
    sampler = getattr(loader, "sampler", None)
    if sampler is not None and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)
