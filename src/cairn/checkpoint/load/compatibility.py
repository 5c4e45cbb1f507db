"""Does a checkpoint fit the objects it is about to be loaded into? Every mismatch is named before anything changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cairn.core.state import State, class_keys, model_weights_module
from cairn.errors import CheckpointIncompatibleError

__all__ = ["check_compatible", "model_name_problems", "model_shape_problems"]

log = logging.getLogger(__name__)

Shape = tuple[int, ...] | str  # a tensor's shape, or the type name of a value that is not a tensor


def check_compatible(saved: Mapping[str, Any], state: State, *, weights_only: bool, strict: bool, source: str) -> None:
    """Raise :class:`CheckpointIncompatibleError` listing every problem; warn about names skipped when not strict."""
    problems = _model_problems(saved.get("model"), state, strict=strict)
    if not weights_only:
        problems += _keyed_problems("optimizers", saved.get("optimizers"), state.optimizers)
        problems += _keyed_problems("schedulers", saved.get("schedulers"), state.schedulers)
        for key, optimizer in zip(class_keys(state.optimizers), state.optimizers, strict=True):
            if isinstance(saved.get("optimizers"), Mapping) and key in saved["optimizers"]:
                problems += _optimizer_problems(key, saved["optimizers"][key], optimizer)
        problems += _metric_problems(saved, state)
    if problems:
        listing = "\n  - ".join(problems)
        raise CheckpointIncompatibleError(
            f"checkpoint {source} does not fit this run:\n  - {listing}\n"
            "Pass the model and optimizer the checkpoint was saved with (same shapes and dtypes), or "
            "load_strict_model_weights=False to skip names missing on either side, or load_weights_only=True / "
            "load_ignore_keys to leave parts out."
        )


def _model_problems(saved: Any, state: State, *, strict: bool) -> list[str]:
    if saved is None:
        return []
    expected = model_weights_module(state.model).state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    problems = model_shape_problems(
        {name: _shape(saved[name]) for name in expected if name in saved},
        {name: _shape(value) for name, value in expected.items()},
    )
    problems += [
        f"model weight {name!r}: checkpoint has dtype {saved[name].dtype}, model has {value.dtype}, which would "
        "change its values"
        for name, value in expected.items()
        if name in saved
        and isinstance(saved[name], torch.Tensor)
        and isinstance(value, torch.Tensor)
        and _shape(saved[name]) == _shape(value)
        and not _holds_exactly(value.dtype, saved[name].dtype)
    ]
    if strict:
        problems += model_name_problems(missing, unexpected)
    elif missing or unexpected:
        log.warning(
            "loading model weights non-strictly: %d missing from the checkpoint %s, %d not in the model %s",
            len(missing),
            missing,
            len(unexpected),
            unexpected,
        )
    return problems


def model_shape_problems(saved: Mapping[str, Shape], expected: Mapping[str, Shape]) -> list[str]:
    """Each model weight present on both sides whose shapes differ, named with both shapes. Shared by single-file
    checkpoints (shapes of the saved tensors) and sharded ones (shapes from the shards' index, before any read)."""
    return [
        f"model weight {name!r}: checkpoint has shape {saved[name]}, model has {shape}"
        for name, shape in expected.items()
        if name in saved and saved[name] != shape
    ]


def model_name_problems(missing: Sequence[str], unexpected: Sequence[str]) -> list[str]:
    """What a strict load refuses: weights of the model missing from the checkpoint, and weights it has in excess."""
    return [f"model weight {name!r} is missing from the checkpoint" for name in missing] + [
        f"model weight {name!r} is in the checkpoint but not in the model" for name in unexpected
    ]


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
        problems += [
            f"optimizer {key} group {index} {name!r}: the checkpoint holds {_kind(saved_group[name])}, "
            f"this run {_kind(value)}"
            for name, value in group.items()
            if name != "params" and name in saved_group and not _same_kind(saved_group[name], value)
        ]
    if problems:
        return problems
    parameters = [p for group in groups for p in group["params"]]
    saved_ids = [i for group in saved_groups for i in group["params"]]
    saved_state = saved.get("state", {})
    for parameter, saved_id in zip(parameters, saved_ids, strict=True):
        live_state = optimizer.state.get(parameter, {})
        known = isinstance(saved_state, Mapping) and isinstance(saved_id, (int, str))  # ids come from the file
        saved_entry = saved_state.get(saved_id, {}) if known else {}
        for name, value in saved_entry.items() if isinstance(saved_entry, Mapping) else ():
            if not isinstance(value, torch.Tensor):
                continue
            live = live_state.get(name)
            problem = (
                _against_live_state(value, live)
                if isinstance(live, torch.Tensor)
                else _against_parameter(name, value, parameter)
            )
            if problem:
                problems.append(f"optimizer {key} state {name!r} of parameter {saved_id}: {problem}")
    return problems


def _against_live_state(value: torch.Tensor, live: torch.Tensor) -> str | None:
    """An optimizer that has already stepped shows what it holds: the saved tensor must have that shape and a dtype
    that holds it exactly."""
    if value.shape != live.shape:
        return f"checkpoint shape {tuple(value.shape)}, this optimizer holds {tuple(live.shape)}"
    if not _holds_exactly(live.dtype, value.dtype):
        return f"checkpoint dtype {value.dtype}, this optimizer holds {live.dtype}"
    return None


def _against_parameter(name: str, value: torch.Tensor, parameter: torch.Tensor) -> str | None:
    """A fresh optimizer (the usual resume) holds nothing yet, so the saved tensor is judged by its parameter.

    Its shape is the parameter's, a scalar (``step``), or the parameter's with some sizes 1: Adafactor keeps factored
    second moments of shape (rows, 1) and (1, columns). Its dtype matters where torch's ``load_state_dict`` casts it
    to the parameter's, which it does for every floating-point state but ``step``; that cast must not round.
    """
    if value.dim() > 0 and not _factors_of(value.shape, parameter.shape):
        return f"checkpoint shape {tuple(value.shape)}, parameter shape {tuple(parameter.shape)}"
    casts = name != "step" and value.is_floating_point() and parameter.is_floating_point()
    if casts and not _holds_exactly(parameter.dtype, value.dtype):
        return f"checkpoint dtype {value.dtype}, parameter dtype {parameter.dtype}, which would change its values"
    return None


def _factors_of(shape: torch.Size, parameter_shape: torch.Size) -> bool:
    """Whether ``shape`` is the parameter's shape with some sizes reduced to 1 (statistics over rows or columns)."""
    return len(shape) == len(parameter_shape) and all(s in (p, 1) for s, p in zip(shape, parameter_shape, strict=True))


def _holds_exactly(live: torch.dtype, saved: torch.dtype) -> bool:
    """Whether every value of dtype ``saved`` survives a cast to ``live``: the same dtype, or a wider one of the same
    kind (float16 into float32 is exact; float64 into float32, or float16 into bfloat16, rounds)."""
    if live == saved:
        return True
    try:
        if live.is_floating_point and saved.is_floating_point:
            wide, narrow = torch.finfo(live), torch.finfo(saved)
            return wide.eps <= narrow.eps and wide.max >= narrow.max and wide.smallest_normal <= narrow.smallest_normal
        if live.is_floating_point or saved.is_floating_point or live.is_complex != saved.is_complex:
            return False
        return torch.promote_types(live, saved) == live
    except (TypeError, RuntimeError):  # a dtype torch cannot describe or promote: only the same one is safe
        return False


def _metric_problems(saved: Mapping[str, Any], state: State) -> list[str]:
    """A metric's saved values must be what the live metric accumulates: a list where it gathers, a tensor of the
    same shape where it sums (torchmetrics would only fail at the next ``update``)."""
    pairs = [(f"train metric {n}", state.train_metrics.get(n), v) for n, v in saved.get("train_metrics", {}).items()]
    for label, metrics in saved.get("eval_metrics", {}).items():
        live = state.eval_metrics.get(label, {})
        pairs += [(f"eval metric {label}/{n}", live.get(n), v) for n, v in metrics.items()]
    problems = []
    for what, metric, values in pairs:
        for name, live_value in (metric.metric_state if metric is not None else {}).items():
            if (
                name in values
                and _shape(values[name]) != _shape(live_value)
                and not (isinstance(values[name], list) and isinstance(live_value, list))
            ):
                problems.append(
                    f"{what} {name!r}: checkpoint has {_shape(values[name])}, this run {_shape(live_value)}"
                )
    return problems


def _kind(value: Any) -> str:
    """What a hyperparameter holds, as far as an optimizer cares: a 0-d tensor may stand for a number."""
    if isinstance(value, bool) or value is None:
        return "a flag" if isinstance(value, bool) else "None"
    if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return "a number"
    if isinstance(value, (tuple, list)):
        return "a sequence"
    return f"a {type(value).__name__}"


def _same_kind(saved: Any, live: Any) -> bool:
    """Whether ``saved`` can stand where the optimizer now holds ``live``; None and flags stand for each other
    (``foreach=None`` means "let torch choose")."""
    kinds = {_kind(saved), _kind(live)}
    if kinds <= {"None", "a flag"} or (len(kinds) == 1 and kinds != {"a sequence"}):
        return True
    return (
        kinds == {"a sequence"}
        and len(saved) == len(live)
        and all(_same_kind(a, b) for a, b in zip(saved, live, strict=True))
    )


def _shape(value: Any) -> tuple[int, ...] | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
