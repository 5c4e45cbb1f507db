"""A terminal progress bar per epoch: epoch, batches done, speed, loss, and the last evaluation."""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Any

from tqdm import tqdm

from cairn.core.logger import LoggerDestination

if TYPE_CHECKING:
    from cairn.core.logger import Logger
    from cairn.core.state import State

__all__ = ["ProgressBarLogger"]


class ProgressBarLogger(LoggerDestination):
    """Draws one tqdm bar per training epoch; evaluation results join its postfix when they are ready.

    The Trainer adds it when ``progress_bar=True``. Bars go to ``stream`` (stderr by default), so printed
    results on stdout stay clean when redirected.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self._train_bar: Any = None
        self._postfix: dict[str, str] = {}

    def epoch_start(self, state: State, logger: Logger) -> None:
        self._postfix = {}
        self._train_bar = tqdm(
            desc=f"epoch {state.timestamp.epoch + 1}{_of_max_epochs(state)}",
            total=_batches_this_epoch(state),
            unit="ba",
            dynamic_ncols=True,
            file=self.stream or sys.stderr,
        )
        self._train_bar.update(state.timestamp.batch_in_epoch)  # a resumed epoch starts part-way

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._train_bar is None:
            return
        timestamp = state.timestamp
        if timestamp.epoch_wct > 0:
            self._postfix["sp/s"] = f"{timestamp.sample_in_epoch / timestamp.epoch_wct:.0f}"
        self._train_bar.set_postfix(self._postfix, refresh=False)
        self._train_bar.update(1)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            if name == "loss/train/total":
                self._postfix["loss"] = f"{value:.4f}"
            elif name.startswith("metrics/eval/"):
                self._postfix["eval " + name.removeprefix("metrics/eval/")] = f"{value:.4f}"

    def eval_end(self, state: State, logger: Logger) -> None:
        if self._train_bar is not None:
            self._train_bar.set_postfix(self._postfix)

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._close_train_bar()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._close_train_bar()

    def close(self, state: State, logger: Logger) -> None:
        self.fit_end(state, logger)

    def _close_train_bar(self) -> None:
        if self._train_bar is not None:
            self._train_bar.set_postfix(self._postfix, refresh=False)
            self._train_bar.close()
            self._train_bar = None


def _of_max_epochs(state: State) -> str:
    return f"/{state.max_duration.value}" if state.max_duration.unit.value == "ep" else ""


def _batches_this_epoch(state: State) -> int | None:
    """The bar's total: the dataloader's length, or fewer when ``max_duration`` ends the run inside this epoch."""
    total = state.dataloader_len
    if state.max_duration.unit.value == "ba":
        left = int(state.max_duration.value) - state.timestamp.batch + state.timestamp.batch_in_epoch
        total = left if total is None else min(total, left)
    return total
