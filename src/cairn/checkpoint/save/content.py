"""What goes into a checkpoint: the state's plain data, every rank's RNG, and metadata that vouches for both.

The file is one nested dict a reader understands at a glance::

    {"state": {"model": ..., "optimizers": ..., ..., "integrations": ..., "metadata": {...}}, "rng": [rank 0, ...]}

A weights-only checkpoint is ``{"state": {"model": ..., "metadata": {...}}}``. The content hash covers everything
but the hash itself, so a flipped bit anywhere in the data is caught when the file is loaded.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from cairn.checkpoint.format import FORMAT_VERSION, content_hash, drop_keys
from cairn.checkpoint.tree import map_tensors, overlaps
from cairn.core.loader_state import loader_state
from cairn.core.model_state import model_state, model_weights_module
from cairn.core.state import State, class_keys
from cairn.names import LOADER_STATES
from cairn.utils.dist import all_gather_object, get_world_size
from cairn.utils.reproducibility import rng_state
from cairn.version import __version__

__all__ = ["build_checkpoint", "collect_checkpoint", "on_cpu", "parameter_names", "recording_metrics", "seal"]

#: the metric values the saver records in the checkpoints built inside :func:`recording_metrics`
_RECORDED_METRICS: contextvars.ContextVar[Mapping[str, float] | None] = contextvars.ContextVar(
    "cairn_recorded_metrics", default=None
)


@contextlib.contextmanager
def recording_metrics(values: Mapping[str, float]) -> Iterator[None]:
    """Record ``values`` (logged metric name -> value at save time) in the metadata (``metadata["metrics"]``) of
    every checkpoint built inside this block, on this thread: how the saver hands the value ``keep_best`` ranks by
    to whichever writer it has, without each writer learning about metrics. Every writer builds the checkpoint's
    content in ``start``, on the thread that calls it, so the block need only surround that call."""
    token = _RECORDED_METRICS.set(dict(values))
    try:
        yield
    finally:
        _RECORDED_METRICS.reset(token)


def build_checkpoint(
    state: State, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), sharded: bool = False
) -> dict[str, Any]:
    """The checkpoint of ``state`` right now, on the CPU, hashed and ready to write.

    In a distributed run every rank must call it: each rank's generators are gathered into ``rng``. ``sharded``
    leaves the model and optimizers out: they are written as shards beside this file.
    """
    checkpoint = collect_checkpoint(state, weights_only=weights_only, ignore_keys=ignore_keys, sharded=sharded)
    return seal(on_cpu(checkpoint))


def collect_checkpoint(
    state: State, *, weights_only: bool = False, ignore_keys: Sequence[str] = (), sharded: bool = False
) -> dict[str, Any]:
    """What :func:`build_checkpoint` holds, before the hash: its tensors are still the run's own, wherever they live.

    An async save copies this into snapshot buffers and seals the copy in the background.
    """
    if weights_only:
        checkpoint: dict[str, Any] = {"state": {} if sharded else {"model": model_state(state.model)}}
    else:
        per_rank = all_gather_object((rng_state(), loader_state(state.train_dataloader)))  # one gather for both
        checkpoint = {"state": state.state_dict(tensors=not sharded), "rng": [rng for rng, _ in per_rank]}
        _add_loader_states(checkpoint, [loader for _, loader in per_rank])
    checkpoint = drop_keys(checkpoint, ignore_keys)
    checkpoint["state"]["metadata"] = {**_metadata(get_world_size(), weights_only), "sharded": sharded}
    checkpoint["state"]["metadata"]["progress"] = _progress(state)
    metrics = _RECORDED_METRICS.get()
    if metrics:
        checkpoint["state"]["metadata"]["metrics"] = {str(name): float(value) for name, value in metrics.items()}
    if not weights_only:
        checkpoint["state"]["metadata"]["parameter_names"] = parameter_names(state)
    return checkpoint


def _add_loader_states(checkpoint: dict[str, Any], states: list[dict[str, Any] | None]) -> None:
    """Every rank's data-loader state, by rank, beside the position the Trainer keeps in ``dataset_state``: a
    resumed run continues each rank's loader from it instead of replaying batches (:mod:`cairn.core.loader_state`)."""
    if any(state is not None for state in states):
        position = checkpoint["state"].get("dataset_state", {})
        checkpoint["state"]["dataset_state"] = {**position, LOADER_STATES: states}


def parameter_names(state: State) -> dict[str, list[str]]:
    """Each optimizer's parameters by name, in the order its state dict numbers them.

    A single file stores optimizer state the way ``optimizer.state_dict()`` does, by position; these names let
    tools reshard it (``cairn ckpt convert --to sharded``) and show it without the model's code.
    """
    names = {id(p): name for name, p in model_weights_module(state.model).named_parameters()}
    return {
        key: [names.get(id(p), f"<unnamed {index}>") for index, p in enumerate(_ordered_params(optimizer))]
        for key, optimizer in zip(class_keys(state.optimizers), state.optimizers, strict=True)
    }


def _ordered_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def seal(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``checkpoint`` (CPU tensors) with its content hash, in place; returns it."""
    checkpoint["state"]["metadata"]["content_hash"] = content_hash(checkpoint)
    return checkpoint


def on_cpu(node: Any) -> Any:
    """Files hold CPU tensors, so a checkpoint from a GPU run opens on any machine with plain ``torch.load``."""
    return map_tensors(node, _as_saved)


def _as_saved(tensor: torch.Tensor) -> torch.Tensor:
    """On the CPU, and a plain view of its storage: a loader refuses views whose elements share memory (an
    ``expand``ed tensor, stride 0), since in a hostile file 4 bytes could then pose as gigabytes."""
    tensor = tensor.detach().cpu() if tensor.device.type != "cpu" else tensor
    if overlaps(tuple(tensor.shape), tensor.stride()):
        tensor = tensor.contiguous()
    return tensor


def _progress(state: State) -> dict[str, int]:
    """Where the run was, in the metadata of every checkpoint (weights-only ones hold no timestamp): retention
    reads it to keep ``keep_every`` boundaries, without relying on the file's name."""
    timestamp = state.timestamp
    return {
        "epoch": int(timestamp.epoch),
        "batch": int(timestamp.batch),
        "sample": int(timestamp.sample),
        "token": int(timestamp.token),
        "batch_in_epoch": int(timestamp.batch_in_epoch),
        "sample_in_epoch": int(timestamp.sample_in_epoch),
        "token_in_epoch": int(timestamp.token_in_epoch),
    }


def _metadata(world_size: int, weights_only: bool) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "cairn_version": str(__version__),
        "torch_version": str(torch.__version__),
        "world_size": world_size,
        "created_at": time.time(),
        "weights_only": weights_only,
    }
