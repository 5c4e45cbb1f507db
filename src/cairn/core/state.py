"""Everything a training run knows, and the plain-data form of the part worth resuming."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cairn.core.callback import Algorithm, Callback
from cairn.core.model_state import (
    load_model_state,
    load_optimizer_state,
    model_state,
    model_weights_module,
    optimizer_state,
)
from cairn.core.time import Time, Timestamp

if TYPE_CHECKING:  # torchmetrics takes a second to import; cairn's command line needs none of it
    from torchmetrics import Metric

__all__ = ["State", "class_keys", "model_weights_module"]


class State:
    """The run's shared memory: the Trainer writes it, algorithms and callbacks read (and may change) it.

    Only the names in :attr:`serialized_attributes` go into a checkpoint; everything else (``max_duration``,
    ``precision``, the dataloaders) is what the new Trainer is given when a run resumes.
    """

    serialized_attributes: tuple[str, ...] = (
        "model",
        "optimizers",
        "schedulers",
        "algorithms",
        "callbacks",
        "scaler",
        "timestamp",
        "rank_zero_seed",
        "train_metrics",
        "eval_metrics",
        "run_name",
        "dataset_state",
    )

    def __init__(
        self,
        *,
        model: nn.Module,
        run_name: str,
        rank_zero_seed: int,
        max_duration: Time[Any],
        device: torch.device,
        precision: str = "fp32",
        optimizers: Sequence[torch.optim.Optimizer] = (),
        schedulers: Sequence[Any] = (),
        algorithms: Sequence[Algorithm] = (),
        callbacks: Sequence[Callback] = (),
        scaler: torch.amp.GradScaler | None = None,
        train_metrics: dict[str, Metric] | None = None,
        eval_metrics: dict[str, dict[str, Metric]] | None = None,
        device_train_microbatch_size: int | None = None,
    ) -> None:
        self.model = model
        self.run_name = run_name
        self.rank_zero_seed = rank_zero_seed
        self.max_duration = max_duration
        self.device = device
        self.precision = precision
        self.optimizers = list(optimizers)
        self.schedulers = list(schedulers)
        self.algorithms = list(algorithms)
        self.callbacks = list(callbacks)
        self.scaler = scaler
        self.train_metrics: dict[str, Metric] = dict(train_metrics or {})
        self.eval_metrics: dict[str, dict[str, Metric]] = dict(eval_metrics or {})
        self.device_train_microbatch_size = device_train_microbatch_size
        self.timestamp = Timestamp()
        self.previous_timestamp = Timestamp()
        self.dataset_state: dict[str, Any] = {}
        self.integrations: dict[str, Any] = {}
        self.train_dataloader: Iterable[Any] | None = None
        self.eval_dataloader: Iterable[Any] | None = None
        self.dataloader_len: int | None = None
        self.batch: Any = None
        self.outputs: Any = None
        self.loss: torch.Tensor | None = None
        self.eval_label: str | None = None
        self.resumed_from: str | None = None  # the checkpoint a resumed run's full state came from
        self.sharded_checkpoints = False  # FSDP with state_dict_type="sharded": checkpoints are DCP folders
        self._stop_requested = False

    # -- progress ---------------------------------------------------------------------------------------------

    def advance(self, timestamp: Timestamp) -> None:
        """Move the clock forward, remembering where it was so intervals can tell what was just crossed."""
        self.previous_timestamp = self.timestamp
        self.timestamp = timestamp

    def is_done(self) -> bool:
        if self._stop_requested:
            return True
        return self.timestamp.get(self.max_duration.unit) >= self.max_duration

    def is_epoch_exhausted(self) -> bool:
        """True once every batch of the current epoch has been trained (when the loader's length is known)."""
        return self.dataloader_len is not None and self.timestamp.batch_in_epoch >= self.dataloader_len

    def stop_training(self) -> None:
        """Ask the loop to end after the current batch, as if ``max_duration`` had been reached."""
        self._stop_requested = True

    # -- serialization ----------------------------------------------------------------------------------------

    def state_dict(self, *, tensors: bool = True) -> dict[str, Any]:
        """The serialized attributes (and ``integrations``) as plain data, in the order checkpoints store them.

        ``tensors=False`` leaves out the model and optimizers, for sharded checkpoints that store them as shards.
        """
        big = {
            "model": model_state(self.model),
            "optimizers": _keyed_by_class(self.optimizers, lambda o: optimizer_state(self.model, o)),
        }
        return {**(big if tensors else {}), **self._small_state_dict()}

    def _small_state_dict(self) -> dict[str, Any]:
        return {
            "schedulers": _keyed_by_class(self.schedulers, lambda s: s.state_dict()),
            "algorithms": _keyed_by_class(self.algorithms, lambda a: a.state_dict()),
            "callbacks": _keyed_by_class(self.callbacks, lambda c: c.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "timestamp": self.timestamp.state_dict(),
            "rank_zero_seed": self.rank_zero_seed,
            "train_metrics": {name: metric_state(m) for name, m in self.train_metrics.items()},
            "eval_metrics": {
                label: {name: metric_state(m) for name, m in metrics.items()}
                for label, metrics in self.eval_metrics.items()
            },
            "run_name": self.run_name,
            "dataset_state": dict(self.dataset_state),
            "integrations": dict(self.integrations),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore every serialized attribute present in ``state`` into the objects this run already holds."""
        if "model" in state:
            load_model_state(self.model, state["model"], strict=strict)
        saved_optimizers = state.get("optimizers") or {}
        for key, optimizer in zip(class_keys(self.optimizers), self.optimizers, strict=True):
            if key in saved_optimizers:
                load_optimizer_state(self.model, optimizer, saved_optimizers[key])
        _load_keyed_by_class(self.schedulers, state.get("schedulers"))
        _load_keyed_by_class(self.algorithms, state.get("algorithms"))
        _load_keyed_by_class(self.callbacks, state.get("callbacks"))
        if state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if "timestamp" in state:
            self.timestamp = Timestamp.from_state_dict(state["timestamp"])
            self.previous_timestamp = self.timestamp
        if "rank_zero_seed" in state:
            self.rank_zero_seed = int(state["rank_zero_seed"])
        for name, saved in (state.get("train_metrics") or {}).items():
            if name in self.train_metrics:
                load_metric_state(self.train_metrics[name], saved)
        for label, metrics in (state.get("eval_metrics") or {}).items():
            for name, saved in metrics.items():
                if name in self.eval_metrics.get(label, {}):
                    load_metric_state(self.eval_metrics[label][name], saved)
        if "run_name" in state:
            self.run_name = str(state["run_name"])
        if "dataset_state" in state:
            self.dataset_state = dict(state["dataset_state"])


def class_keys(objects: Sequence[Any]) -> list[str]:
    """Class names, made unique with ``#1``, ``#2`` when a run holds two of a kind (two AdamW optimizers)."""
    keys: list[str] = []
    for obj in objects:
        base = type(obj).__name__
        key, n = base, 0
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys.append(key)
    return keys


def _keyed_by_class(objects: Sequence[Any], to_state: Any) -> dict[str, Any]:
    return {key: to_state(obj) for key, obj in zip(class_keys(objects), objects, strict=True)}


def _load_keyed_by_class(objects: Sequence[Any], saved: dict[str, Any] | None) -> None:
    if not saved:
        return
    for key, obj in zip(class_keys(objects), objects, strict=True):
        if key in saved:
            obj.load_state_dict(saved[key])


def metric_state(metric: Metric) -> dict[str, Any]:
    """A metric's accumulated values as tensors (or lists of tensors), so a resumed epoch keeps counting."""
    state: dict[str, Any] = {}
    for name, value in metric.metric_state.items():
        state[name] = (
            [v.detach().cpu().clone() for v in value] if isinstance(value, list) else value.detach().cpu().clone()
        )
    state["_update_count"] = metric._update_count
    return state


def load_metric_state(metric: Metric, state: dict[str, Any]) -> None:
    device = metric.device
    for name in metric.metric_state:
        if name not in state:
            continue
        value = state[name]
        restored = [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
        setattr(metric, name, restored)
    metric._update_count = int(state.get("_update_count", 0))
    metric._computed = None
