"""Checks on name templates, made when a saver is built: every name a run can make must be a safe, writable path."""

from __future__ import annotations

import os
import posixpath
import re
import string
import unicodedata
from typing import Any

from cairn.atomic import RETIRED_SUFFIX, TEMPORARY_NAME_EXTRA
from cairn.checkpoint.naming.templates import (
    FORMAT_VARIABLES,
    PROGRESS_VARIABLES,
    SAMPLE_RUN_NAME,
    PathTemplate,
    fill,
    fixed_prefix,
    sample_values,
)
from cairn.names import CHUNK_FOLDER, TEMP_MARKER
from cairn.storage.uri import is_uri, parse_uri

__all__ = [
    "bidi_controls",
    "check_folder",
    "check_format",
    "check_local_name",
    "check_names",
    "check_not_a_file",
    "check_remote_name",
    "control_characters",
]


_NAME_MAX = 255  # bytes in one path component on Linux, macOS and Windows filesystems alike


# A checkpoint is first written as ".<name>.cairn-tmp-<machine>-<pid>-<token>" beside its final name (cairn.atomic),
# and a replaced sharded folder is set aside as "<temporary>-old": a name must leave room for both.
_TEMPORARY_EXTRA = TEMPORARY_NAME_EXTRA + len(RETIRED_SUFFIX)


_REMOTE_MAX = 1024  # bytes in an object name for S3, GCS and OCI


_WIDEST_SPEC = _NAME_MAX  # a width or precision in a format spec beyond one component's bytes cannot fit anyway


_DIGITS_ONLY_SPEC = re.compile(r"(?:0[0-9]*)?d?\Z")  # "", "d", "06", "06d": progress numbers stay digits


# Characters that reorder how text is shown: a name with U+202E ("right-to-left override") lists backwards in `ls`.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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


def check_folder(template: PathTemplate, *, argument: str, run_name: str = SAMPLE_RUN_NAME) -> str:
    """A folder template (absolute, or relative to the working directory; ``..`` allowed) whose names the
    filesystem can hold, and whose fixed part is not a file (``os.makedirs`` would fail at the first save)."""
    text = check_format(template, argument=argument)
    for values in sample_values(run_name):
        _check_characters(text, fill(text, values, argument=argument), argument)
        _check_components(text, fill(text, values, argument=argument), argument, last_max=_NAME_MAX)
    check_not_a_file(text, fixed_prefix(text), argument=argument)
    return text


def check_local_name(template: PathTemplate, *, argument: str, run_name: str = SAMPLE_RUN_NAME) -> str:
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
        _refuse_the_chunk_folder(text, name, argument)
    return text


def _refuse_the_chunk_folder(text: str, name: str, argument: str) -> None:
    """Nothing but chunks may live in a chunk folder: collection ignores every other file there, so a checkpoint
    written into one would have its chunks collected from under it."""
    if CHUNK_FOLDER in name.split("/")[:-1]:
        raise ValueError(
            f"{argument}={text!r} puts files into {CHUNK_FOLDER!r}, the folder where incremental checkpoints keep "
            "their chunks; choose another name"
        )


def check_remote_name(template: PathTemplate, *, argument: str, run_name: str = SAMPLE_RUN_NAME) -> str:
    """An object name template in a store: relative to the bucket, written plainly, at most 1024 bytes."""
    text = check_format(template, argument=argument)
    for values in sample_values(run_name):
        name = fill(text, values, argument=argument)
        _check_inside(text, name, argument, where="bucket")
        _refuse_the_chunk_folder(text, name, argument)
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
    run_name: str = SAMPLE_RUN_NAME,
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
