"""Destinations for metrics and files: progress bars, in-memory records, and object-store uploads."""

from cairn.core.logger import Logger, LoggerDestination
from cairn.loggers.in_memory import InMemoryLogger
from cairn.loggers.progress_bar import ProgressBarLogger
from cairn.loggers.remote_uploader_downloader import RemoteUploaderDownloader

__all__ = ["InMemoryLogger", "Logger", "LoggerDestination", "ProgressBarLogger", "RemoteUploaderDownloader"]
