"""Any classification network, made trainable with one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from cairn.models.base import Model

__all__ = ["Classifier"]


class Classifier(Model):
    """Wraps ``module`` so that batches ``(inputs, targets)`` train it with ``loss_fn``.

    With ``num_classes`` (or a ``module.num_classes`` attribute), accuracy is measured in training and evaluation.
    Checkpoints store ``module.state_dict()`` itself, so they load into the bare network with no prefix.
    """

    def __init__(
        self,
        module: nn.Module,
        num_classes: int | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"Classifier(module=...) needs an nn.Module, not {type(module).__name__}")
        self.module = module
        self.num_classes = num_classes if num_classes is not None else getattr(module, "num_classes", None)
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        inputs, _ = _split(batch)
        return self.module(inputs)

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        _, targets = _split(batch)
        return self.loss_fn(outputs, targets)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        del is_train
        if self.num_classes is None:
            return {}
        return {"MulticlassAccuracy": MulticlassAccuracy(num_classes=self.num_classes, average="micro")}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        _, targets = _split(batch)
        metric.update(outputs, targets)

    def weights_module(self) -> nn.Module:
        return self.module


def _split(batch: Any) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"Classifier expects each batch to be (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            + "; yield pairs from the dataloader or write a cairn.models.Model subclass"
        )
    return batch[0], batch[1]
