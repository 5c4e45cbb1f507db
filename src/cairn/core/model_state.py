"""The model's and optimizers' state as plain, full tensors, whether or not the model is sharded with FSDP2.

A checkpoint holds the user's network's own ``state_dict()``: for a model sharded with ``fully_shard`` that
means gathering every shard into full CPU tensors (on rank 0) when saving, and scattering them back (broadcast
from rank 0) when loading. Unsharded models take the plain ``state_dict`` path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "is_fully_sharded",
    "load_model_state",
    "load_optimizer_state",
    "model_state",
    "model_weights_module",
    "optimizer_state",
]


def model_weights_module(model: nn.Module) -> nn.Module:
    """The module whose ``state_dict()`` a checkpoint stores: the user's own network, without any wrapper.

    ``cairn.models.Classifier(net)`` answers ``net``; DDP and similar wrappers answer what they wrap, so a
    checkpoint's keys are the ones ``net.load_state_dict()`` expects.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    weights_module = getattr(model, "weights_module", None)
    return weights_module() if callable(weights_module) else model


def is_fully_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _full_options(**extra: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def model_state(model: nn.Module) -> dict[str, Any]:
    module = model_weights_module(model)
    if not is_fully_sharded(model):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_full_options())  # full tensors on rank 0, {} elsewhere


def load_model_state(model: nn.Module, weights: dict[str, Any], *, strict: bool) -> None:
    module = model_weights_module(model)
    if not is_fully_sharded(model):
        module.load_state_dict(weights, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, weights, options=_full_options(strict=strict, broadcast_from_rank0=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    if not is_fully_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    if not is_fully_sharded(model):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=_full_options(broadcast_from_rank0=True))
