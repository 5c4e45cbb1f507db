"""Whether two name templates can ever name the same path (a latest link must never take a checkpoint's name)."""

from __future__ import annotations

import collections
import posixpath
import re
import string

from cairn.checkpoint.naming.templates import FORMAT_VARIABLES

__all__ = ["template_clash"]


_RUN_NAME = "\ue000"  # one private-use character stands for {run_name}: the same text in both names of one run


_CHAR, _DIGITS, _ANYTHING = "char", "digits", "anything"


_PLAIN_NUMBER_SPEC = re.compile(r"0?\d*d?\Z")  # {epoch:03d} still writes digits only


def template_clash(first: str, second: str, *, nested: bool = True) -> str | None:
    """A path both templates can name (with ``nested``, also one inside a folder the other names), or None.

    A number (``{epoch}``, ``{rank}``, ...) stands for any digits, so ``ep{epoch}.pt`` meets ``ep3.pt``;
    ``{run_name}`` is the same unknown text in both (a clash needing one particular run name is left to the writer's
    own check); any other formatted variable stands for anything. Letters compare case-insensitively (macOS and
    Windows folders do), and ``./`` or ``a/../`` are resolved first. The example returned shows ``{run_name}``.
    """
    a, b = _tokens(first), _tokens(second)
    pairs = [(a, b)]
    if nested:
        inside = [(_CHAR, "/"), (_ANYTHING, "")]
        pairs += [(a + inside, b), (a, b + inside)]
    for left, right in pairs:
        example = _common_name(left, right)
        if example is not None:
            return example.replace(_RUN_NAME, "{run_name}")
    return None


def _tokens(template: str) -> list[tuple[str, str]]:
    """The template as a sequence of single characters and repeatable character classes (digits, anything)."""
    tokens: list[tuple[str, str]] = []
    for literal, field, spec, conversion in string.Formatter().parse(posixpath.normpath(template)):
        tokens += [(_CHAR, char) for char in literal.casefold()]
        if field is None:
            continue
        if field == "run_name" and not spec and not conversion:
            tokens.append((_CHAR, _RUN_NAME))
        elif field in FORMAT_VARIABLES and not conversion and _PLAIN_NUMBER_SPEC.match(spec or ""):
            tokens.append((_DIGITS, ""))
        else:
            tokens.append((_ANYTHING, ""))
    return tokens


def _common_name(first: list[tuple[str, str]], second: list[tuple[str, str]]) -> str | None:
    """The shortest name both token sequences match: a breadth-first walk over pairs of positions in them."""
    start, end = (0, 0), (len(first), len(second))
    came_from: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = collections.deque([start])
    while queue:
        here = queue.popleft()
        if here == end:
            return _spell(came_from, end)
        for token_a, next_a in _steps(first, here[0]):
            for token_b, next_b in _steps(second, here[1]):
                char = _shared_char(token_a, token_b)
                if char is not None and (next_a, next_b) not in came_from:
                    came_from[(next_a, next_b)] = (here, char)
                    queue.append((next_a, next_b))
    return None


def _steps(tokens: list[tuple[str, str]], position: int) -> list[tuple[tuple[str, str], int]]:
    """From ``position``: read the next token, or one more character of the repeatable token just read."""
    steps = [(tokens[position], position + 1)] if position < len(tokens) else []
    if position > 0 and tokens[position - 1][0] != _CHAR:
        steps.append((tokens[position - 1], position))
    return steps


def _shared_char(a: tuple[str, str], b: tuple[str, str]) -> str | None:
    """A character both tokens accept, or None."""
    if a[0] == _CHAR and b[0] == _CHAR:
        return a[1] if a[1] == b[1] else None
    if a[0] == _CHAR or b[0] == _CHAR:
        (_, char), (kind, _) = (a, b) if a[0] == _CHAR else (b, a)
        return char if kind == _ANYTHING or char in string.digits else None
    return "0"


def _spell(came_from: dict[tuple[int, int], tuple[tuple[int, int], str] | None], end: tuple[int, int]) -> str:
    chars = []
    step = came_from[end]
    while step is not None:
        here, char = step
        chars.append(char)
        step = came_from[here]
    return "".join(reversed(chars))
