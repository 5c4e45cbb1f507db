"""A store's pointers: the small objects ``<latest name>.symlink`` and ``<best name>.symlink`` whose content is
the name of the checkpoint object each stands for (stores have no links).

Everything about them lives here so that the saver that names them, the transfers that move ``latest``, autoresume
and ``cairn ckpt`` that follow it, and the listing that marks their targets all agree: how a default name is
formed, how a name is told to be one (the ``.symlink`` suffix, which no checkpoint name takes), how one is read
(never trusted: a listing or another run may have put anything there), how it is written, and why ``latest`` only
ever moves forward while ``best`` (:func:`point_at`) may name an older checkpoint.
"""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from collections.abc import Callable

from cairn.errors import CheckpointCorruptError, ObjectNotFoundError
from cairn.names import POINTER_SUFFIX
from cairn.storage.base import ObjectStore
from cairn.utils.text import printable

__all__ = [
    "POINTER_LIMIT",
    "ProgressOf",
    "is_pointer",
    "latest_name_of",
    "move_pointer_forward",
    "point_at",
    "pointer_beside",
    "pointer_of",
    "read_pointer",
    "write_pointer",
]

log = logging.getLogger(__name__)

#: The largest pointer read back, in bytes: a pointer holds one object name, and anything larger is not one.
POINTER_LIMIT = 4096

#: a checkpoint's progress read from its name in the store (comparable tuples), or None for a name it cannot order
ProgressOf = Callable[[str], "tuple[float, ...] | None"]

#: uploads a local file as an object and verifies it: ``(store, local file, object name)``
Upload = Callable[[ObjectStore, str, str], None]


def pointer_beside(checkpoint_name: str, latest_filename: str) -> str:
    """A pointer's default name: ``latest_filename`` (or the ``best`` link's file name) in the folder of
    ``checkpoint_name``, plus ``.symlink``.

    Works on filled names and on their format strings alike, so that the saver's clash check at construction
    sees the very name its saves will write.
    """
    return pointer_of(posixpath.join(posixpath.dirname(checkpoint_name), latest_filename))


def pointer_of(latest_name: str) -> str:
    """The pointer that stands for ``latest_name`` (``run/latest-rank0.pt.symlink`` for ``run/latest-rank0.pt``)."""
    return latest_name + POINTER_SUFFIX


def is_pointer(name: str) -> bool:
    """Whether ``name`` is a pointer's name (``latest`` or ``best``): never a checkpoint's."""
    return name.endswith(POINTER_SUFFIX)


def latest_name_of(pointer: str) -> str:
    """The latest name a pointer stands for: its name without ``.symlink``."""
    return pointer[: -len(POINTER_SUFFIX)]


def read_pointer(store: ObjectStore, pointer: str) -> str | None:
    """The object name a pointer (``latest`` or ``best``) names, or None when the store has no pointer yet."""
    with tempfile.TemporaryDirectory(prefix="cairn-pointer-") as folder:
        local = os.path.join(folder, "pointer")
        try:
            if store.get_object_size(pointer) > POINTER_LIMIT:
                raise CheckpointCorruptError(f"{store.get_uri(pointer)} is too large to be a pointer")
            store.download_object(pointer, local)
        except ObjectNotFoundError:
            return None
        with open(local, encoding="utf-8", errors="replace") as file:
            target = file.read().strip()
    if not target or target.startswith("/") or ".." in target.split("/") or "\n" in target:
        raise CheckpointCorruptError(f"{store.get_uri(pointer)} does not hold an object name: {target[:100]!r}")
    return target


def write_pointer(store: ObjectStore, pointer: str, target: str, upload: Upload) -> None:
    """Point ``pointer`` at ``target``. ``upload`` is the transfers' upload-and-verify: a pointer is checked like
    any object it stands beside, and its retries are the transfers' too."""
    with tempfile.NamedTemporaryFile("w", suffix=POINTER_SUFFIX, delete=False) as file:
        file.write(target)
    try:
        upload(store, file.name, pointer)
    finally:
        os.remove(file.name)


def point_at(store: ObjectStore, pointer: str, target: str) -> bool:
    """Point ``pointer`` at ``target`` now, on the calling thread, unless it names it already; return whether it
    was written.

    For the ``best`` pointer, which may move back in time (an older checkpoint can be the best); the caller
    passes only a checkpoint verified in the store. Written as :func:`write_pointer` writes ``latest``: one whole
    object replacing the one before (a reader sees the old name or the new, never a mix), then verified; the
    store's own retries apply. A pointer that holds no object name is replaced (said in the log).
    """
    try:
        current = read_pointer(store, pointer)
    except CheckpointCorruptError as err:
        log.warning("replacing the store's pointer %s: %s", store.get_uri(pointer), err)
        current = None
    if current == target:
        return False
    write_pointer(store, pointer, target, _upload_and_verify)
    log.info("the store's pointer %s now names %s", store.get_uri(pointer), printable(target))
    return True


def _upload_and_verify(store: ObjectStore, filename: str, name: str) -> None:
    store.upload_object(name, filename, overwrite=True)
    store.verify_upload(name, filename)


def move_pointer_forward(
    store: ObjectStore, pointer: str, target: str, progress: ProgressOf | None, upload: Upload
) -> None:
    """Point ``pointer`` at ``target`` unless (with ``progress``) it names an existing object further along.

    Between reading the pointer and writing it, another run may move it: two runs that share a pointer at the
    same time can still leave it behind (with save_overwrite=False the second one refuses to start).
    """
    if progress is not None and _names_newer(store, pointer, target, progress):
        return
    write_pointer(store, pointer, target, upload)


def _names_newer(store: ObjectStore, pointer: str, target: str, progress: ProgressOf) -> bool:
    try:
        current = read_pointer(store, pointer)
    except CheckpointCorruptError as err:
        log.warning("replacing the store's pointer %s: %s", store.get_uri(pointer), err)
        return False
    if current is None or current == target:
        return False
    ahead, behind = progress(current), progress(target)
    if ahead is None or behind is None or ahead <= behind:
        return False
    try:
        store.get_object_size(current)
    except ObjectNotFoundError:
        return False  # the pointer names a deleted object: it must not hold the pointer back
    log.warning(
        "the store's pointer %s stays at %s, which is further along than %s",
        store.get_uri(pointer),
        printable(current),
        printable(target),
    )
    return True
