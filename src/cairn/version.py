"""cairn's version, in a leaf module: checkpoints record it, and reading it must not import the rest of cairn."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("cairn")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
