"""Destinations for metrics and files: progress bars, in-memory records, object-store uploads, and experiment
trackers (MLflow, Weights & Biases: their SDKs are imported only when a tracker is used)."""

from cairn.core.logger import Logger, LoggerDestination
from cairn.loggers.in_memory import InMemoryLogger
from cairn.loggers.mlflow import MLFlowLogger
from cairn.loggers.progress_bar import ProgressBarLogger
from cairn.loggers.remote_uploader_downloader import RemoteUploaderDownloader
from cairn.loggers.wandb import WandBLogger

__all__ = [
    "InMemoryLogger",
    "Logger",
    "LoggerDestination",
    "MLFlowLogger",
    "ProgressBarLogger",
    "RemoteUploaderDownloader",
    "WandBLogger",
]
