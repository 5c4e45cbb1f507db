"""Keeps every logged number in memory: for notebooks, tests, and callbacks that look back."""

from __future__ import annotations

from typing import Any

from cairn.core.logger import LoggerDestination

__all__ = ["InMemoryLogger"]


class InMemoryLogger(LoggerDestination):
    """``data[name]`` is the list of ``(step, value)`` pairs logged under ``name``; ``latest[name]`` the last value."""

    def __init__(self) -> None:
        self.data: dict[str, list[tuple[int, float]]] = {}
        self.latest: dict[str, float] = {}
        self.hyperparameters: dict[str, Any] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            self.data.setdefault(name, []).append((step if step is not None else -1, float(value)))
            self.latest[name] = float(value)

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        self.hyperparameters.update(hyperparameters)
