"""The saver's checks of the names in the run's object stores, at fit start: the latest pointer never moves back to
an older checkpoint (across runs too), and ``save_overwrite=False`` never replaces another run's objects.

Save-side code: it lists stores but never downloads, so that checkpoint/save/ needs nothing from checkpoint/load/.
Autoresume lists the store the same way (:func:`store_checkpoints`), so that both agree on what the run's
checkpoints in a store are.
"""

from __future__ import annotations

import functools
import re
import string
from typing import TYPE_CHECKING

from cairn.checkpoint.naming.templates import format_name, name_pattern, progress_in_name
from cairn.core.logger import transfers_among
from cairn.errors import ObjectStoreError
from cairn.names import METADATA_FILE
from cairn.utils.dist import broadcast_object, get_rank, share_rank_zero_failure
from cairn.utils.text import printable

if TYPE_CHECKING:
    from cairn.core.logger import Logger
    from cairn.core.state import State
    from cairn.storage.transfer import Transfers

__all__ = ["guard_store_names", "listing_prefix", "store_checkpoints"]


def guard_store_names(
    logger: Logger, state: State, remote_template: str, pointer_name: str | None, *, refuse_existing: bool
) -> None:
    """At fit start, for each uploader of the run: keep the store's latest pointer from moving back to a checkpoint
    older than the one it names (across runs too), and with ``refuse_existing`` raise ``FileExistsError`` when the
    store already holds objects of this saver's remote name pattern, as the local folder check does.

    ``remote_template`` is the saver's format string for remote file names; progress in names is compared as
    retention compares local files (epoch, then batch, sample, token, ...).
    """
    stores = transfers_among(logger.destinations)
    for transfers in stores:
        template = transfers.remote_template(remote_template)
        pattern = name_pattern(template, state, rank=0)
        if pointer_name is not None:
            transfers.order_pointer(pointer_name, functools.partial(progress_in_name, pattern))
        if refuse_existing:
            _refuse_existing_objects(transfers, remote_template, state, autoresume_reads=transfers is stores[0])


def store_checkpoints(transfers: Transfers, remote_template: str, state: State) -> list[str]:
    """The names in ``transfers``' store that the saver's ``remote_template`` can produce in this run, newest first.

    Newest by the progress numbers in the names (epoch first), as retention orders local files; equal ones in
    reverse name order. Only the template's fixed prefix is listed, never the whole bucket (unless the template
    starts with a progress field). Names are store names: a listing may hold anything, so callers never make a
    local path of one.
    """
    template = transfers.remote_template(remote_template)
    pattern = name_pattern(template, state, rank=0)
    listed = transfers.store.list_objects(listing_prefix(template, pattern, state))
    names = {_checkpoint_of(name) for name in listed}
    names = [name for name in names if pattern.match(name)]
    return sorted(names, key=lambda name: (progress_in_name(pattern, name) or (), name), reverse=True)


def _checkpoint_of(name: str) -> str:
    """The checkpoint an object is: itself, or the sharded folder whose ``cairn.pt`` it is (uploaded last, so
    only complete folders are named; their other files are never checkpoints of their own)."""
    suffix = f"/{METADATA_FILE}"
    return name[: -len(suffix)] if name.endswith(suffix) else name


def _refuse_existing_objects(
    transfers: Transfers, remote_template: str, state: State, *, autoresume_reads: bool
) -> None:
    """Rank 0 lists the store; every rank raises if it holds names of this run's pattern (other than damaged ones
    that autoresume kept a copy of, which this run replaces)."""
    found: list[str] = []
    failure: BaseException | None = None
    if get_rank() == 0:
        try:
            found = [
                name
                for name in store_checkpoints(transfers, remote_template, state)
                if not transfers.is_replaceable(name)
            ]
        except ObjectStoreError as err:
            failure = ObjectStoreError(f"{transfers.bucket_uri} cannot be used: {err}")
        except Exception as err:  # shared below, so that the other ranks do not wait forever for rank 0
            failure = err
    share_rank_zero_failure(failure, f"list {transfers.bucket_uri}")
    existing = broadcast_object(found)
    if existing:
        resume = (
            "use autoresume=True to continue that run from the newest of them, pass"
            if autoresume_reads  # autoresume lists this store as this check does (resume.find_remote_latest)
            else "autoresume reads only the first uploader of the run's loggers, so pass"
        )
        raise FileExistsError(
            f"{transfers.store.get_uri(printable(existing[0]))} and {len(existing) - 1} more objects of this run's "
            f"name pattern are already in the store, and save_overwrite=False never replaces one: {resume} "
            "save_overwrite=True to replace them, or choose another run_name or remote name"
        )


def listing_prefix(template: str, pattern: re.Pattern[str], state: State) -> str:
    """The start of every name ``template`` makes in this run: its text up to the first progress field (the fields
    ``pattern`` leaves open), with the fixed fields (run name, rank, ...) filled in. Listing under it, not the
    whole bucket, keeps the check quick. (Not :func:`~cairn.checkpoint.naming.templates.fixed_prefix`, which stops
    at a template's last fixed folder, before any field.)"""
    fixed = ""
    for literal, field, spec, conversion in string.Formatter().parse(template):
        fixed += literal.replace("{", "{{").replace("}", "}}")
        if field is None:
            continue
        if re.split(r"[.\[!:]", field, maxsplit=1)[0] in pattern.groupindex:
            break
        fixed += "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
    return format_name(fixed, state, rank=0)
