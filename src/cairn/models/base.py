"""The interface a model offers the Trainer: how to run a batch, score it, and measure it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import Metric

__all__ = ["Model"]


class Model(nn.Module):
    """Base class for models that know their own loss and metrics.

    Subclasses implement ``forward(batch)`` and ``loss(outputs, batch)``. The Trainer never looks inside a batch:
    the model decides what its parts mean. A plain ``nn.Module`` whose ``forward(batch)`` returns the loss works
    too, but has no metrics.
    """

    def forward(self, batch: Any) -> Any:  # noqa: D102 - documented on the class
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch)")

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The training loss; a dict of losses is summed (and each is logged)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(outputs, batch)")

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        """Fresh metric objects, by name; the Trainer owns and resets them."""
        del is_train
        return {}

    def eval_forward(self, batch: Any, outputs: Any | None = None) -> Any:
        """The outputs evaluation metrics are computed on; by default, ``forward(batch)``."""
        return outputs if outputs is not None else self(batch)

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        raise NotImplementedError(f"{type(self).__name__} has metrics, so it must implement update_metric()")

    def weights_module(self) -> nn.Module:
        """The module whose ``state_dict()`` checkpoints store; a wrapper answers the network it wraps."""
        return self
