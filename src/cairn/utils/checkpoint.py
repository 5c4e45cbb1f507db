"""Saving and loading checkpoints by hand, outside a Trainer's schedule, under the reference's names.

``save_checkpoint(state, "ep{epoch}-ba{batch}-rank{rank}.pt")`` fills the name from the run as a saver does, writes
through the same atomic path, and returns the path it wrote. ``load_checkpoint(path, state)`` reads a local file or
an ``s3://``, ``gs://``, ``oci://`` or ``libcloud://`` URI (downloaded, verified and deleted, as the Trainer's
``load_path`` is), checks it fits, and restores it.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Sequence
from typing import Any

from cairn.checkpoint.keys import check_ignore_keys
from cairn.checkpoint.load.loader import apply_checkpoint
from cairn.checkpoint.naming.checks import check_folder, check_format, check_local_name
from cairn.checkpoint.naming.templates import format_name
from cairn.checkpoint.resume import opened_load_path  # the Trainer's own load_path reader
from cairn.checkpoint.save import saver
from cairn.core.state import State
from cairn.storage.uri import is_uri
from cairn.utils.arguments import check_flag

__all__ = ["load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

IgnoreKeys = Sequence[str] | Callable[[dict[str, Any]], Any] | None


def save_checkpoint(
    state: State,
    path: str | os.PathLike[str],
    *,
    weights_only: bool = False,
    ignore_keys: Sequence[str] = (),
    overwrite: bool = True,
) -> str:
    """Write a checkpoint of ``state`` to ``path``, its ``{epoch}``-style fields filled from the run (rank 0's
    name, as savers name files), and return the path written.

    ``path`` is checked as a saver checks its ``folder`` and ``filename``, before anything is gathered or written.
    Every rank of a distributed run must call it; rank 0 alone writes.
    """
    template = _check_path(path, run_name=state.run_name)
    target = format_name(template, state, rank=0)
    return saver.save_checkpoint(
        state,
        target,
        weights_only=check_flag(weights_only, argument="weights_only"),
        ignore_keys=ignore_keys,
        overwrite=check_flag(overwrite, argument="overwrite"),
    )


def _check_path(path: str | os.PathLike[str], *, run_name: str) -> str:
    """``path`` as a checked template: its folder as a saver's ``folder``, its last part as a saver's ``filename``."""
    if is_uri(path):
        raise ValueError(
            f"path={path!r} is a URI, but save_checkpoint writes local files; save locally, then upload the file "
            "with an ObjectStore (or let the Trainer upload with save_folder='s3://...')"
        )
    template = check_format(path, argument="path")
    folder, name = posixpath.split(template.replace(os.sep, "/"))
    if folder:
        check_folder(folder, argument="path", run_name=run_name)
    check_local_name(name, argument="path", run_name=run_name)
    return template


def load_checkpoint(
    path: str | os.PathLike[str],
    state: State,
    *,
    weights_only: bool = False,
    strict_model_weights: bool = True,
    ignore_keys: IgnoreKeys = None,
    progress: bool = True,
    strict: bool | None = None,
) -> dict[str, Any]:
    """Read, verify and restore the checkpoint at ``path`` (a local path or a URI) into ``state``; return what
    was read.

    The keywords mean what the Trainer's ``load_*`` arguments mean: ``ignore_keys`` is a list of paths (globs
    allowed) or a callable that edits the loaded dict in place. ``strict`` is the older name of
    ``strict_model_weights``. Arguments are checked before anything is downloaded.
    """
    location = os.fspath(path)
    strictness = _strictness(strict_model_weights, strict)
    ignore = check_ignore_keys(ignore_keys, argument="ignore_keys", loading=True)
    weights_only = check_flag(weights_only, argument="weights_only")
    progress = check_flag(progress, argument="progress")
    opened = opened_load_path(location, None, progress=progress, for_resume=not weights_only)  # applied whole
    with opened as (checkpoint, local):
        apply_checkpoint(
            checkpoint,
            state,
            source=location,
            weights_only=weights_only,
            strict=strictness,
            ignore_keys=ignore,
            shards_at=local,
        )
    log.info("loaded checkpoint %s at %s", location, checkpoint["state"].get("timestamp", {}))
    return checkpoint


def _strictness(strict_model_weights: object, strict: object) -> bool:
    """One answer from the reference's keyword and cairn's older ``strict``; both given and different is refused."""
    chosen = check_flag(strict_model_weights, argument="strict_model_weights")
    if strict is None:
        return chosen
    older = check_flag(strict, argument="strict")
    if not chosen and older:
        raise TypeError(
            "strict=True and strict_model_weights=False disagree (strict is the older name of the same switch); "
            "give strict_model_weights alone"
        )
    return older
