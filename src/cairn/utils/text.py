"""Showing names that come from outside (object stores, files) without letting them steer a terminal."""

from __future__ import annotations

import math
import unicodedata

__all__ = ["human_size", "printable"]

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


def human_size(size: int | None) -> str:
    """``38 KiB``, ``1.4 GiB``: binary units, like ``du -h`` and ``ls -lh``, with three significant figures."""
    if size is None:
        return "-"
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    exponent = min(int(math.log(size, 1024)) if size > 0 else 0, len(units) - 1)
    value = size / 1024**exponent
    if exponent == 0:
        return f"{size} B"
    return f"{value:.3g} {units[exponent]}" if value < 1000 else f"{value:.0f} {units[exponent]}"
