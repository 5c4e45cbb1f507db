"""Ready-made callbacks. The base class lives in :mod:`cairn.core`; checkpoint saving joins here."""

from cairn.core.callback import Callback

__all__ = ["Callback"]
