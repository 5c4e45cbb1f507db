"""One calling convention for the two kinds of model the Trainer accepts.

A :class:`cairn.models.Model` knows its loss and metrics. A plain ``nn.Module`` returns its loss from
``forward(batch)`` (a tensor, a dict with ``"loss"``, or an object with ``.loss``, as Hugging Face models do); its
evaluation reports the mean loss. The Trainer only talks to this adapter, so it has no branches for either kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric

from cairn.models.base import Model
from cairn.trainer.batching import count_samples, count_tokens

__all__ = ["ModelAdapter"]


class ModelAdapter:
    def __init__(self, model: nn.Module, forward_module: nn.Module | None = None) -> None:
        """``forward_module`` is what the training step calls (a DDP wrapper, which syncs gradients); the rest
        (loss, metrics, evaluation) talks to ``model`` itself."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (or cairn.models.Model), not {type(model).__name__}")
        self.model = model
        self.forward_module = forward_module or model
        self.is_cairn_model = isinstance(model, Model)

    def forward(self, batch: Any) -> Any:
        return self.forward_module(batch)

    def loss(self, outputs: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss to back-propagate, and its named parts for logging."""
        raw = self.model.loss(outputs, batch) if self.is_cairn_model else _loss_of_output(outputs)
        if isinstance(raw, Mapping):
            parts = {str(k): v for k, v in raw.items()}
            total = torch.stack([v.float() for v in parts.values()]).sum()
            return total, parts
        if not isinstance(raw, torch.Tensor) or raw.numel() != 1:
            raise ValueError(_LOSS_SHAPE_HELP.format(got=_describe(raw)))
        return raw.reshape(()), {}

    def metrics(self, is_train: bool) -> dict[str, Metric]:
        if self.is_cairn_model:
            return dict(self.model.get_metrics(is_train=is_train))
        return {} if is_train else {"loss": MeanMetric()}

    def eval_outputs(self, batch: Any) -> Any:
        return self.model.eval_forward(batch) if self.is_cairn_model else self.model(batch)

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        if self.is_cairn_model:
            self.model.update_metric(batch, outputs, metric)
        else:
            metric.update(_loss_of_output(outputs).detach().float(), count_samples(batch))

    def count_samples(self, batch: Any) -> int:
        custom = getattr(self.model, "num_samples", None)
        return int(custom(batch)) if callable(custom) else count_samples(batch)

    def count_tokens(self, batch: Any) -> int:
        custom = getattr(self.model, "num_tokens", None)
        return int(custom(batch)) if callable(custom) else count_tokens(batch)


_LOSS_SHAPE_HELP = (
    "the model's loss must be a single-number tensor, got {got}; a plain nn.Module's forward(batch) must return "
    "its loss (or a dict / object holding 'loss'), and a cairn.models.Model's loss() must return one"
)


def _loss_of_output(outputs: Any) -> Any:
    if isinstance(outputs, Mapping) and "loss" in outputs:
        return outputs["loss"]
    if not isinstance(outputs, torch.Tensor) and hasattr(outputs, "loss"):
        return outputs.loss
    return outputs


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
