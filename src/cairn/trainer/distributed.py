"""Running as one of many processes launched by ``torchrun``: the process group, the model wrapper, the data split.

cairn has no launcher of its own. Under ``torchrun`` the environment holds ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; the Trainer then joins the process group (NCCL on GPUs, gloo on CPUs), wraps the model in
``DistributedDataParallel`` and gives each rank its share of the data with a ``DistributedSampler``.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import sys
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from cairn.utils.dist import is_distributed

__all__ = [
    "FSDP_OPTIONS",
    "init_from_environment",
    "loader_like",
    "parse_parallelism_config",
    "shard_dataloader",
    "wrap_model",
]

FSDP_OPTIONS = {"state_dict_type": ("full", "sharded"), "reshard_after_forward": (True, False)}

log = logging.getLogger(__name__)


def init_from_environment(device: torch.device) -> torch.device:
    """Join the job ``torchrun`` started (once), and return this rank's device (its own GPU: ``LOCAL_RANK``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        _note_uncaught_exceptions()
        atexit.register(_leave_process_group)
        log.info("joined process group: rank %d of %d", dist.get_rank(), dist.get_world_size())
    return device


#: How long a rank leaving normally waits at exit for the others to leave too, before it goes regardless.
EXIT_WAIT = datetime.timedelta(seconds=60)

_exit = {"on_error": False}


def _note_uncaught_exceptions() -> None:
    """Remember when the process ends on an uncaught exception: then it must not wait for the others at exit (they
    may be blocked in a collective it will never join; torchrun stops them once this rank is gone)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, trace: TracebackType | None) -> None:
        _exit["on_error"] = True
        previous(kind, value, trace)

    sys.excepthook = hook


def _leave_process_group() -> None:
    """Tear the group down while Python still runs: left to C++ static destructors at exit, gloo's worker threads
    can be destroyed while joinable, and the process dies with SIGABRT after training succeeded. On a normal exit
    the ranks first meet once, so that none closes its connections while a peer is still finishing a collective
    with it (the abort was seen on a rank whose peer was still at work, about once in a hundred runs)."""
    if dist.is_initialized():
        if not _exit["on_error"] and dist.get_backend() == "gloo":
            _wait_for_the_other_ranks()
        dist.destroy_process_group()
    gc.collect()  # wrappers (DDP's reducer, FSDP) hold the group too: free them now, not during finalization


def _wait_for_the_other_ranks() -> None:
    """gloo's barrier with a timeout: a rank that never comes (it failed, or is still busy) delays the exit by
    ``EXIT_WAIT`` at most, and is named in the warning."""
    try:
        dist.monitored_barrier(timeout=EXIT_WAIT)
    except Exception as err:  # noqa: BLE001 - leaving regardless: the process is exiting
        log.warning("leaving the process group without every rank: %s", str(err).splitlines()[0][:200])


def parse_parallelism_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The FSDP settings from ``parallelism_config={"fsdp": {...}}``, checked; None without FSDP."""
    if config is None:
        return None
    if not isinstance(config, dict) or set(config) - {"fsdp"}:
        raise ValueError(f"parallelism_config={config!r}: use {{'fsdp': {{...}}}} (or leave it out for DDP)")
    fsdp = config.get("fsdp")
    if fsdp is None:
        return None
    if not isinstance(fsdp, dict):
        raise ValueError(f"parallelism_config['fsdp']={fsdp!r}: give a dict of options, e.g. {{}}")
    settings = {"state_dict_type": "full", "reshard_after_forward": True, **fsdp}
    for key, value in settings.items():
        allowed = FSDP_OPTIONS.get(key)
        if allowed is None or value not in allowed:
            choices = "; ".join(f"{k}: {', '.join(map(repr, v))}" for k, v in FSDP_OPTIONS.items())
            raise ValueError(f"parallelism_config['fsdp'][{key!r}]={value!r} is not supported; use {choices}")
    return settings


def wrap_model(
    model: nn.Module,
    device: torch.device,
    fsdp: dict[str, Any] | None = None,
    optimizers: list[torch.optim.Optimizer] | None = None,
) -> nn.Module:
    """The module the training step calls.

    With several ranks: the model sharded in place with FSDP2's ``fully_shard`` when ``fsdp`` is given (the
    optimizers already built are pointed at the new, sharded parameters), else ``DistributedDataParallel``
    around it. A single process trains the model as it is.
    """
    if not is_distributed():
        return model
    if fsdp is None:
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    _shard_in_place(model, optimizers or [], reshard_after_forward=fsdp["reshard_after_forward"])
    return model


def _shard_in_place(model: nn.Module, optimizers: list[torch.optim.Optimizer], *, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    names = {id(parameter): name for name, parameter in model.named_parameters()}
    for optimizer in optimizers:
        if optimizer.state:
            raise ValueError(
                "an optimizer that has already stepped cannot follow its parameters into FSDP shards; "
                "pass optimizers that have not stepped yet"
            )
    fully_shard(model, reshard_after_forward=reshard_after_forward)  # replaces every parameter with a DTensor
    sharded = dict(model.named_parameters())
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(parameter)]] for parameter in group["params"]]


def shard_dataloader(loader: Any, seed: int) -> Any:
    """A loader that yields only this rank's share; one with a ``DistributedSampler`` already is kept as it is.

    A plain ``DataLoader`` is rebuilt around a ``DistributedSampler`` (shuffling if it shuffled, seeded with the
    run's seed so every rank agrees on the order); other iterables are the user's to split.
    """
    if not is_distributed() or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, DistributedSampler) or loader.batch_sampler is None:
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    # a loader that keeps its own state (torchdata's StatefulDataLoader) stays one: the rebuilt loader is of its class
    kind = type(loader) if callable(getattr(loader, "state_dict", None)) else DataLoader
    every = getattr(loader, "snapshot_every_n_steps", None)
    return loader_like(loader, sampler, kind=kind, **({} if every is None else {"snapshot_every_n_steps": every}))


def loader_like(loader: DataLoader, sampler: Any, *, kind: type[DataLoader] = DataLoader, **extra: Any) -> DataLoader:
    """A loader that batches, collates and loads as ``loader`` does, drawing its samples from ``sampler``."""
    return kind(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        **extra,
    )
