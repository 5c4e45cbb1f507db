"""How the ``cairn`` command writes: colours only for a person at a terminal, sizes and times as people read them.

Colour follows https://no-color.org: ANSI codes are written only when stdout is a terminal and ``NO_COLOR`` is
unset (or empty), so piped output (``cairn ckpt ls runs | grep``) and logs stay plain text.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from cairn.utils.text import human_size, printable

__all__ = ["Style", "fail", "human_size", "local_time", "printable", "table"]

_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


class Style:
    """Paints text for one stream, or leaves it alone when that stream should stay plain."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: TextIO) -> Style:
        is_terminal = hasattr(stream, "isatty") and stream.isatty()
        return cls(is_terminal and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles or not text:
            return text
        codes = ";".join(_CODES[style] for style in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"


def fail(command: str, error: BaseException | str, *, code: int = 1) -> int:
    """One line on stderr, ``cairn ckpt <command>: <message>``; returns the exit code to use. Messages quote names
    and values from files, so control characters in them are shown escaped, never obeyed."""
    message = printable(" ".join(str(error).split()))  # an error's own line breaks would split the one line
    print(f"cairn ckpt {command}: {message}", file=sys.stderr)
    return code


def local_time(seconds: float | None) -> str:
    """``2025-11-27 03:54:15`` in the local time zone; ``-`` when unknown."""
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def table(
    rows: Sequence[Sequence[str]], *, right: Sequence[int] = (), widths_from: Sequence[Sequence[str]] = ()
) -> list[str]:
    """Rows as aligned columns separated by two spaces; columns in ``right`` are right-aligned (numbers).

    Widths come from ``widths_from`` (the plain text) when the rows carry colour codes, which take no room on a
    terminal; otherwise from the rows themselves.
    """
    plain = widths_from or rows
    if not plain:
        return []
    widths = [max(len(row[i]) for row in plain) for i in range(len(plain[0]))]
    lines = []
    for row, text in zip(rows, plain, strict=True):
        cells = []
        for i, cell in enumerate(row):
            padding = " " * (widths[i] - len(text[i]))
            cells.append(padding + cell if i in right else cell + padding)
        lines.append("  ".join(cells).rstrip())
    return lines
