"""``save_ignore_keys`` / ``load_ignore_keys``: parts of a checkpoint left out, checked when the Trainer is built.

A checkpoint is a nested dict (``{"state": {...}, "rng": [...]}``); a part is named by its ``/``-joined path
(``state/optimizers``, ``rng``) and patterns are ``fnmatch`` globs over those paths (``*`` also crosses ``/``).
Loading may instead take a callable that edits the checkpoint dict in place before it is applied, as in the
reference. Patterns that would take ``state`` itself or its ``metadata`` are refused: the file (or the load) would
then lack what tells cairn how to read it.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cairn.checkpoint.tree import child_path

__all__ = ["IgnoreKeys", "check_ignore_keys", "drop"]

log = logging.getLogger(__name__)

IgnoreKeys = tuple[str, ...] | Callable[[dict[str, Any]], Any]

# every path starts with one of these (docs/checkpointing.md, "What a checkpoint file holds")
_TOP_LEVEL = ("state", "rng")
_METADATA_KEYS = (  # what checkpoint.content writes into state/metadata, and the loader reads back
    "format_version",
    "cairn_version",
    "torch_version",
    "world_size",
    "created_at",
    "weights_only",
    "sharded",
    "parameter_names",
    "content_hash",
    "progress",
    "metrics",
)
_ALWAYS_KEPT = ("state", "state/metadata", *(f"state/metadata/{key}" for key in _METADATA_KEYS))
_KEPT_WHEN_SAVING = ("state/model",)  # a file without its model is refused by every reader
_WILDCARDS = "*?["
_EXAMPLE = "['state/optimizers', 'rng']"


def check_ignore_keys(value: object, *, argument: str, loading: bool) -> IgnoreKeys:
    """``value`` as a tuple of glob patterns (or, when ``loading``, a callable), refused now if it could never do
    what was meant: a bare string (its letters would be taken one by one), a non-str item, a path that starts
    nowhere in a checkpoint, or a pattern that takes the checkpoint's ``state`` or ``metadata``."""
    if value is None:
        return ()
    if callable(value) and not isinstance(value, (str, bytes)):
        if loading:
            return value  # type: ignore[return-value]
        raise TypeError(
            f"{argument}={value!r} is a callable, which only load_ignore_keys accepts; give a list of paths such as "
            f"{_EXAMPLE}"
        )
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{argument}={value!r} is a single {type(value).__name__}, which would be read letter by letter; wrap it "
            f"in a list: {argument}=[{value!r}]"
        )
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        kind = _with_article(type(value).__name__)
        raise TypeError(f"{argument}={value!r} is {kind}; give a list of paths such as {_EXAMPLE}")
    patterns = tuple(value)
    for pattern in patterns:
        _check_pattern(pattern, argument, patterns, loading=loading)
    return patterns


def _check_pattern(pattern: object, argument: str, patterns: tuple[Any, ...], *, loading: bool) -> None:
    if not isinstance(pattern, str) or not pattern:
        kind = "an empty str" if pattern == "" else _with_article(type(pattern).__name__)
        raise TypeError(
            f"{argument}={list(patterns)!r} holds {pattern!r}, {kind}; every item must be a non-empty str path such "
            "as 'state/optimizers'"
        )
    first = pattern.split("/", 1)[0]
    if not any(char in first for char in _WILDCARDS) and first not in _TOP_LEVEL:
        raise ValueError(
            f"{argument}={list(patterns)!r} holds {pattern!r}, which matches nothing: paths start at the top of the "
            f"checkpoint, with 'state' or 'rng'; write 'state/{pattern}' or another full path"
        )
    kept = _ALWAYS_KEPT if loading else (*_ALWAYS_KEPT, *_KEPT_WHEN_SAVING)
    taken = next((path for path in kept if fnmatch.fnmatchcase(path, pattern)), None)
    if taken is not None:
        why = "the checkpoint's model" if taken == "state/model" else "what makes the checkpoint readable"
        raise ValueError(
            f"{argument}={list(patterns)!r} holds {pattern!r}, which would take {taken!r}, {why}; name the parts to "
            "leave out more narrowly, such as 'state/optimizers' or 'rng'"
        )


def _with_article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def drop(checkpoint: dict[str, Any], ignore: IgnoreKeys | Iterable[str]) -> dict[str, Any]:
    """``checkpoint`` without the parts ``ignore`` names: a copy without the entries whose path matches a pattern,
    or the dict itself after a callable edited it in place."""
    if callable(ignore) and not isinstance(ignore, (str, bytes)):
        return _edited(checkpoint, ignore)
    patterns = check_ignore_keys(ignore, argument="ignore_keys", loading=True)
    if not patterns:
        return checkpoint
    return _without(checkpoint, "", patterns)  # type: ignore[arg-type]


def _edited(checkpoint: dict[str, Any], edit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    returned = edit(checkpoint)
    if returned is not None and returned is not checkpoint:
        log.warning("load_ignore_keys returned a value, which is ignored: edit the dict it is given in place")
    state = checkpoint.get("state")
    if not isinstance(state, dict) or not isinstance(state.get("metadata"), dict):
        raise ValueError(
            f"load_ignore_keys={edit!r} removed the checkpoint's 'state' or its 'state/metadata', which loading "
            "needs; delete only parts of it, such as checkpoint['state']['optimizers']"
        )
    return checkpoint


def _without(node: Any, path: str, patterns: tuple[str, ...]) -> Any:
    if not isinstance(node, dict):
        return node
    kept = {}
    for key, item in node.items():
        child = child_path(path, str(key))
        if any(fnmatch.fnmatchcase(child, pattern) for pattern in patterns):
            continue
        kept[key] = _without(item, child, patterns)
    return kept
