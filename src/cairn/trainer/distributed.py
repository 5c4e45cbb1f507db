"""Running as one of many processes launched by ``torchrun``: the process group, the model wrapper, the data split.

cairn has no launcher of its own. Under ``torchrun`` the environment holds ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; the Trainer then joins the process group (NCCL on GPUs, gloo on CPUs), wraps the model in
``DistributedDataParallel`` and gives each rank its share of the data with a ``DistributedSampler``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from cairn.utils.dist import is_distributed

__all__ = ["init_from_environment", "shard_dataloader", "wrap_model"]

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
        log.info("joined process group: rank %d of %d", dist.get_rank(), dist.get_world_size())
    return device


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The module the training step calls: ``DistributedDataParallel`` around the model when there are several ranks."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


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
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )
