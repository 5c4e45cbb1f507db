"""Showing names that come from outside (object stores, files) without letting them steer a terminal."""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]

# Control characters (C0, C1, DEL), format characters (U+202E, which turns text right to left, and other bidi
# controls), unassigned and private code points, and the line and paragraph separators some terminals break on.
_UNSAFE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def printable(name: object) -> str:
    """Text safe to print: control characters (a terminal escape sequence hidden in an object name, a carriage
    return that overwrites the line, a right-to-left override that reverses it) are shown escaped, as Python writes
    them in a string literal, instead of being obeyed. Anything not a string is shown as ``str`` shows it."""
    text = name if isinstance(name, str) else str(name)
    if all(unicodedata.category(ch) not in _UNSAFE for ch in text):
        return text
    return "".join(ascii(ch)[1:-1] if unicodedata.category(ch) in _UNSAFE else ch for ch in text)
