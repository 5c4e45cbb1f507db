"""Showing names that come from outside (object stores, files) without letting them steer a terminal."""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]


def printable(name: str) -> str:
    """A name safe to print: control characters (a terminal escape sequence hidden in an object name) are shown
    escaped instead of being obeyed."""
    if all(unicodedata.category(ch)[0] != "C" for ch in name):
        return name
    return "".join(ch if unicodedata.category(ch)[0] != "C" else ascii(ch)[1:-1] for ch in name)
