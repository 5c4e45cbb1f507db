"""Checkpoint names: format strings filled from the run's progress, and read back from names on disk."""

from __future__ import annotations

import collections
import os
import posixpath
import re
import string
import unicodedata
from typing import Any

from cairn.checkpoint.commit import TEMPORARY_NAME_EXTRA
from cairn.core.state import State
from cairn.names import TEMP_MARKER
from cairn.storage.uri import is_uri, parse_uri

__all__ = [
    "FORMAT_VARIABLES",
    "PROGRESS_VARIABLES",
    "bidi_controls",
    "check_folder",
    "check_format",
    "check_local_name",
    "check_names",
    "check_not_a_file",
    "check_remote_name",
    "control_characters",
    "fields_of",
    "format_name",
    "name_pattern",
    "process_identity",
]

FORMAT_VARIABLES = (
    "run_name",
    "rank",
    "local_rank",
    "world_size",
    "local_world_size",
    "node_rank",
    "epoch",
    "batch",
    "batch_in_epoch",
    "sample",
    "sample_in_epoch",
    "token",
    "token_in_epoch",
    "total_wct",
    "epoch_wct",
    "batch_wct",
)
PROGRESS_VARIABLES = FORMAT_VARIABLES[6:]


_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows filesystems alike
# A checkpoint is first written as ".<name>.cairn-tmp-<pid>-<8 hex>" beside its final name (checkpoint.commit).
_TEMPORARY_EXTRA = TEMPORARY_NAME_EXTRA + len("-old")  # a replaced sharded folder is set aside as <temporary>-old
_REMOTE_MAX = 1024  # bytes in an object name for S3, GCS and OCI
_WIDEST_SPEC = _NAME_MAX  # a width or precision in a format spec beyond one component's bytes cannot fit anyway
_DIGITS_ONLY_SPEC = re.compile(r"(?:0[0-9]*)?d?\Z")  # "", "d", "06", "06d": progress numbers stay digits
_SAMPLE_RUN_NAME = "run"
# Characters that reorder how text is shown: a name with U+202E ("right-to-left override") lists backwards in `ls`.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_SAMPLES = (0, 10**12)  # the values at the start of a run, and far into a long one (names grow as it goes)

PathTemplate = str | os.PathLike[str]


def check_format(template: PathTemplate, *, argument: str) -> str:
    """A name template as ``str``, refused now when filling it in at a save would fail.

    Every field must be one known variable, with at most a format spec (``{batch:06d}``): no attribute or index
    access, no conversion, no nested field. The template is then filled with samples of every variable (ints at
    the start of a run and far into one, a run name), so a spec that does not suit an int (``{batch:s}``) is
    caught here rather than at the first save an hour into the run.
    """
    text = _as_text(template, argument)
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(text)]
    except ValueError as err:
        raise ValueError(
            f"{argument}={text!r} is not a valid format string ({err}); double any literal {{ or }}"
        ) from None
    for field, spec, conversion in fields:
        if field is not None:
            _check_field(text, field, spec or "", conversion, argument)
    for values in sample_values():
        fill(text, values, argument=argument)
    return text


def _as_text(template: object, argument: str) -> str:
    if isinstance(template, os.PathLike):
        template = os.fspath(template)
    if not isinstance(template, str):
        raise TypeError(
            f"{argument}={template!r} is a {type(template).__name__}; give a str (or a pathlib.Path) format string "
            "such as 'ep{{epoch}}.pt'"
        )
    if not template:
        raise ValueError(f"{argument}='' is empty; give a non-empty format string such as 'ep{{epoch}}.pt'")
    return template


def _check_field(template: str, field: str, spec: str, conversion: str | None, argument: str) -> None:
    known = ", ".join("{" + v + "}" for v in FORMAT_VARIABLES)
    if field not in FORMAT_VARIABLES:
        name = re.split(r"[.\[]", field, maxsplit=1)[0]
        if name in FORMAT_VARIABLES:
            raise ValueError(
                f"{argument}={template!r} reaches into {{{field}}}; use the plain variable {{{name}}}, with a format "
                f"spec if needed ({{{name}:06d}})"
            )
        raise ValueError(f"{argument}={template!r}: unknown variable {{{field}}}; use {known}")
    if conversion is not None:
        raise ValueError(
            f"{argument}={template!r} converts {{{field}!{conversion}}}; drop the !{conversion} and use a format spec "
            f"if needed ({{{field}:06d}})"
        )
    if "{" in spec or "}" in spec:
        raise ValueError(f"{argument}={template!r} nests a field in {{{field}:{spec}}}; write the spec out in full")
    if field in PROGRESS_VARIABLES and not _DIGITS_ONLY_SPEC.match(spec):
        raise ValueError(
            f"{argument}={template!r} writes {{{field}:{spec}}} with characters other than digits, so retention and "
            f"autoresume could not read the number back from names on disk; use {{{field}}} or {{{field}:06d}}"
        )
    widths = [int(digits) for digits in re.findall(r"[0-9]+", spec)]
    if any(width > _WIDEST_SPEC for width in widths):
        raise ValueError(
            f"{argument}={template!r} asks for {max(widths)} characters in {{{field}:{spec}}}, more than a file name "
            f"can hold ({_NAME_MAX} bytes); use a smaller width"
        )


def sample_values(run_name: str = _SAMPLE_RUN_NAME) -> list[dict[str, Any]]:
    """Values of every format variable a run can meet: each number (progress and ranks) at both ends of
    ``_SAMPLES``, with ``run_name``."""
    return [{**{name: number for name in FORMAT_VARIABLES}, "run_name": run_name} for number in _SAMPLES]


def fill(template: str, values: dict[str, Any], *, argument: str) -> str:
    """``template`` filled from ``values``; a failure is a ValueError naming the argument (checked templates
    never fail: :func:`check_format` tried them)."""
    try:
        return template.format(**values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as err:
        raise ValueError(
            f"{argument}={template!r} cannot be filled in ({type(err).__name__}: {err}); every variable but "
            "{run_name} is an int, so use int specs such as {batch:06d}"
        ) from None


def check_folder(template: PathTemplate, *, argument: str, run_name: str = _SAMPLE_RUN_NAME) -> str:
    """A folder template (absolute, or relative to the working directory; ``..`` allowed) whose names the
    filesystem can hold, and whose fixed part is not a file (``os.makedirs`` would fail at the first save)."""
    text = check_format(template, argument=argument)
    for values in sample_values(run_name):
        _check_characters(text, fill(text, values, argument=argument), argument)
        _check_components(text, fill(text, values, argument=argument), argument, last_max=_NAME_MAX)
    check_not_a_file(text, fixed_prefix(text), argument=argument)
    return text


def check_local_name(template: PathTemplate, *, argument: str, run_name: str = _SAMPLE_RUN_NAME) -> str:
    """A file name template inside the save folder: relative, written plainly (``a/b.pt``, not ``./a//b.pt``)
    so that retention and autoresume, which read names back from disk, recognise it, and never leading out."""
    text = check_format(template, argument=argument)
    for values in sample_values(run_name):
        name = fill(text, values, argument=argument)
        _check_inside(text, name, argument, where="save folder")
        _check_components(text, name, argument, last_max=_NAME_MAX - _TEMPORARY_EXTRA)
        if TEMP_MARKER in name:
            raise ValueError(
                f"{argument}={text!r} contains {TEMP_MARKER!r}, which marks unfinished files that the next run "
                "deletes; choose another name"
            )
    return text


def check_remote_name(template: PathTemplate, *, argument: str, run_name: str = _SAMPLE_RUN_NAME) -> str:
    """An object name template in a store: relative to the bucket, written plainly, at most 1024 bytes."""
    text = check_format(template, argument=argument)
    for values in sample_values(run_name):
        name = fill(text, values, argument=argument)
        _check_inside(text, name, argument, where="bucket")
        size = len(_encoded(text, name, argument))
        if size > _REMOTE_MAX:
            raise ValueError(
                f"{argument}={text!r} makes object names of {size} bytes (such as {name[:60]!r}...), over the "
                f"{_REMOTE_MAX} a store accepts; shorten it"
            )
    return text


def _check_inside(template: str, name: str, argument: str, *, where: str) -> None:
    _check_characters(template, name, argument)
    if name.startswith("/"):
        raise ValueError(
            f"{argument}={template!r} is absolute (it makes {name!r}), so it would land outside the {where}; "
            "give a name relative to it, such as 'ep{epoch}.pt'"
        )
    if ".." in name.split("/"):
        raise ValueError(
            f"{argument}={template!r} has a '..' part (it makes {name!r}), so it would land outside the {where}; "
            "give a name inside it, such as 'ep{epoch}.pt'"
        )
    if posixpath.normpath(name) != name:
        plain = posixpath.normpath(template)
        fix = f"write it as {plain!r}" if plain != template else "keep empty, '.' and trailing '/' parts out of it"
        raise ValueError(
            f"{argument}={template!r} makes {name!r}, which is not written plainly (empty, '.' or trailing '/' "
            f"parts), so names read back from disk would not match it; {fix}"
        )


def _check_characters(template: str, name: str, argument: str) -> None:
    bad = control_characters(name)
    if bad:
        raise ValueError(
            f"{argument}={template!r} makes names with the control character(s) {bad!r} (NUL cannot be in "
            "a file name at all); remove them"
        )
    bidi = bidi_controls(name)
    if bidi:
        raise ValueError(
            f"{argument}={template!r} makes names with the bidirectional control(s) {bidi!r}, which make a "
            "listing show the name reordered (a '.pt' file can pass for another); remove them"
        )


def control_characters(text: str) -> str:
    """The control characters (C0, DEL, C1) in ``text``, each once, sorted; empty when there are none."""
    return "".join(sorted({char for char in text if unicodedata.category(char) == "Cc"}))


def bidi_controls(text: str) -> str:
    """The bidirectional controls in ``text`` (embeddings, overrides, isolates and marks), each once, sorted."""
    return "".join(sorted(set(text) & _BIDI_CONTROLS))


def _encoded(template: str, name: str, argument: str) -> bytes:
    try:
        return os.fsencode(name)
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{argument}={template!r} makes {name!r}, which the filesystem's encoding cannot write ({err.reason}); "
            "remove the character"
        ) from None


def _check_components(template: str, name: str, argument: str, *, last_max: int) -> None:
    parts = _encoded(template, name, argument).split(b"/")
    for index, part in enumerate(parts):
        limit = last_max if index == len(parts) - 1 else _NAME_MAX
        if len(part) > limit:
            raise ValueError(
                f"{argument}={template!r} makes a name part of {len(part)} bytes ({os.fsdecode(part)[:40]!r}...), "
                f"over the {limit} allowed here (a file name holds {_NAME_MAX} bytes, including cairn's temporary "
                "suffix while writing); shorten it"
            )


def fields_of(template: str) -> list[str]:
    """The variables a (checked) template uses."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def fixed_prefix(template: str) -> str:
    """The folder part of ``template`` that no variable changes (all of it when it has no variables)."""
    literal = ""
    for text, field, _, _ in string.Formatter().parse(template):
        literal += text
        if field is not None:
            return literal.rsplit("/", 1)[0] if "/" in literal else ""
    return literal


def check_not_a_file(template: str, folder: str, *, argument: str) -> None:
    """Refuse ``folder`` when it, or the nearest of its parents that exists, is not a folder."""
    path = folder
    while path and not os.path.lexists(path):
        parent = os.path.dirname(path)
        path = "" if parent == path else parent
    if path and not os.path.isdir(path):
        what = "is a file" if os.path.isfile(path) else "is a broken link or not a folder"
        where = "" if os.path.normpath(path) == os.path.normpath(folder) else f", and {folder!r} would lie inside it"
        raise ValueError(
            f"{argument}={template!r}: {path!r} {what}{where}, so no checkpoint could be written there; choose "
            "another folder or move that file away"
        )


def check_names(
    folder: PathTemplate,
    filename: PathTemplate,
    latest_filename: PathTemplate | None,
    remote_file_name: PathTemplate | None,
    latest_remote_file_name: PathTemplate | None = None,
    *,
    prefix: str = "",
    run_name: str = _SAMPLE_RUN_NAME,
) -> tuple[str, str, str | None, str | None, str | None]:
    """A saver's name templates, each checked (see the ``check_*`` above) and returned as ``str``.

    ``prefix`` names the arguments as the caller knows them (``"save_"`` in the Trainer). A ``folder`` given as an
    ``s3://bucket/path`` URI is checked as the local folder ``path`` and as the store's name prefix ``path``.
    """
    if is_uri(folder):
        path = parse_uri(str(folder)).path  # staged locally under ``path``, uploaded under ``path/``
        check_folder(path or ".", argument=f"{prefix}folder", run_name=run_name)
        if path.rstrip("/"):
            check_remote_name(path.rstrip("/"), argument=f"{prefix}folder", run_name=run_name)
        checked_folder = str(folder)
    else:
        checked_folder = check_folder(folder, argument=f"{prefix}folder", run_name=run_name)

    def optional(template: PathTemplate | None, check: Any, name: str) -> str | None:
        return None if template is None else check(template, argument=f"{prefix}{name}", run_name=run_name)

    return (
        checked_folder,
        check_local_name(filename, argument=f"{prefix}filename", run_name=run_name),
        optional(latest_filename, check_local_name, "latest_filename"),
        optional(remote_file_name, check_remote_name, "remote_file_name"),
        optional(latest_remote_file_name, check_remote_name, "latest_remote_file_name"),
    )


def process_identity() -> dict[str, int]:
    """This process's place in a (torchrun-launched) job; a single process is rank 0 of 1."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", 1))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
    rank = int(env.get("RANK", 0))
    return {
        "rank": rank,
        "local_rank": int(env.get("LOCAL_RANK", 0)),
        "world_size": world_size,
        "local_world_size": local_world_size,
        "node_rank": int(env.get("GROUP_RANK", rank // max(local_world_size, 1))),
    }


def format_name(template: str, state: State, *, rank: int | None = None) -> str:
    """Fill ``template`` from the run; ``rank`` overrides this process's rank (rank-0 names in distributed runs)."""
    values = _variables(state)
    if rank is not None:
        values["rank"] = rank
    return template.format(**values)


def name_pattern(template: str, state: State, *, rank: int | None = None) -> re.Pattern[str]:
    """A regex matching every name ``template`` can produce in this run (progress variables left open)."""
    fixed = {k: v for k, v in _variables(state).items() if k not in PROGRESS_VARIABLES}
    if rank is not None:
        fixed["rank"] = rank
    pattern = ""
    for literal, field, spec, conversion in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field is None:
            continue
        name = re.split(r"[.\[!:]", field, maxsplit=1)[0]
        if name in fixed:
            piece = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            pattern += re.escape(piece.format(**fixed))
        elif f"(?P<{name}>" in pattern:
            pattern += r"\d+"
        else:
            pattern += rf"(?P<{name}>\d+)"
    return re.compile(pattern + r"\Z", re.ASCII)  # progress numbers are ASCII digits: "ep٩.pt" is no epoch


def _variables(state: State) -> dict[str, Any]:
    timestamp = state.timestamp
    return {
        "run_name": state.run_name,
        **process_identity(),
        "epoch": timestamp.epoch,
        "batch": timestamp.batch,
        "batch_in_epoch": timestamp.batch_in_epoch,
        "sample": timestamp.sample,
        "sample_in_epoch": timestamp.sample_in_epoch,
        "token": timestamp.token,
        "token_in_epoch": timestamp.token_in_epoch,
        "total_wct": int(timestamp.total_wct),
        "epoch_wct": int(timestamp.epoch_wct),
        "batch_wct": int(timestamp.batch_wct),
    }


# -- whether two templates can name the same path --------------------------------------------------------------------

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
