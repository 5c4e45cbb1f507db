"""Does a checkpoint fit the objects it is about to be loaded into? Every mismatch is named before anything changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cairn.core.state import State, class_keys, model_weights_module
from cairn.errors import CheckpointIncompatibleError

__all__ = ["check_compatible"]

log = logging.getLogger(__name__)


def check_compatible(saved: Mapping[str, Any], state: State, *, weights_only: bool, strict: bool, source: str) -> None:
    """Raise :class:`CheckpointIncompatibleError` listing every problem; warn about names skipped when not strict."""
    problems = _model_problems(saved.get("model"), state, strict=strict)
    if not weights_only:
        problems += _keyed_problems("optimizers", saved.get("optimizers"), state.optimizers)
        problems += _keyed_problems("schedulers", saved.get("schedulers"), state.schedulers)
        for key, optimizer in zip(class_keys(state.optimizers), state.optimizers, strict=True):
            if isinstance(saved.get("optimizers"), Mapping) and key in saved["optimizers"]:
                problems += _optimizer_problems(key, saved["optimizers"][key], optimizer)
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointIncompatibleError(
            f"checkpoint {source} does not fit this run:\n  - {listing}\n"
            "Pass the model and optimizer the checkpoint was saved with, or load_strict_model_weights=False to skip "
            "names missing on either side, or load_weights_only=True / load_ignore_keys to leave parts out."
        )


def _model_problems(saved: Any, state: State, *, strict: bool) -> list[str]:
    if saved is None:
        return []
    expected = model_weights_module(state.model).state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    problems = [
        f"model weight {name!r}: checkpoint has shape {_shape(saved[name])}, model has {_shape(value)}"
        for name, value in expected.items()
        if name in saved and _shape(saved[name]) != _shape(value)
    ]
    if strict:
        problems += [f"model weight {name!r} is missing from the checkpoint" for name in missing]
        problems += [f"model weight {name!r} is in the checkpoint but not in the model" for name in unexpected]
    elif missing or unexpected:
        log.warning(
            "loading model weights non-strictly: %d missing from the checkpoint %s, %d not in the model %s",
            len(missing),
            missing,
            len(unexpected),
            unexpected,
        )
    return problems


def _keyed_problems(kind: str, saved: Any, objects: Sequence[Any]) -> list[str]:
    if saved is None:
        return []
    have, had = class_keys(objects), list(saved)
    if have == had:
        return []
    return [f"{kind}: the checkpoint holds {had}, this run has {have}"]


def _optimizer_problems(key: str, saved: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> list[str]:
    groups = optimizer.param_groups
    saved_groups = saved.get("param_groups", [])
    if len(saved_groups) != len(groups):
        return [f"optimizer {key}: the checkpoint has {len(saved_groups)} parameter groups, this run {len(groups)}"]
    problems = []
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(saved_group.get("params", [])) != len(group["params"]):
            problems.append(
                f"optimizer {key} group {index}: the checkpoint has {len(saved_group['params'])} parameters, "
                f"this run {len(group['params'])}"
            )
    if problems:
        return problems
    parameters = [p for group in groups for p in group["params"]]
    saved_ids = [i for group in saved_groups for i in group["params"]]
    for parameter, saved_id in zip(parameters, saved_ids, strict=True):
        for name, value in saved.get("state", {}).get(saved_id, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                problems.append(
                    f"optimizer {key} state {name!r} of parameter {saved_id}: checkpoint shape "
                    f"{tuple(value.shape)}, parameter shape {tuple(parameter.shape)}"
                )
    return problems


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
