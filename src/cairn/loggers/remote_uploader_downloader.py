"""The run's uploader: a logger destination that hands files to :class:`~cairn.storage.transfer.Transfers`.

The transfers themselves (staging, workers, retries, verification, the ``latest`` pointer) live in
:mod:`cairn.storage.transfer`; this adapter ties them to the run's events, so that a background failure is raised
on the training thread at the next event, ``FIT_END`` waits for every upload, and ``close`` drains them.

In a distributed run an upload fails on one rank alone (its shard of a sharded folder, rank 0's single file). Raised
there alone, it would stop that rank while the others wait for it in their next collective until the process
group's timeout. So with several ranks the failure is not raised at the next event: the Trainer's agreement
(:mod:`cairn.trainer.agreement`) finds it at the next checkpoint event (:func:`upload_slots`) and every rank raises
it together (:func:`raise_upload_failure_on_every_rank`), and ``FIT_END``, once every upload has finished, gathers
every rank's failure and raises the first on every rank. Every rank must therefore be given the same uploaders.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cairn.core.event import Event
from cairn.core.logger import LoggerDestination
from cairn.errors import ObjectExistsError, ObjectStoreError
from cairn.storage.transfer import Transfers
from cairn.utils.dist import is_distributed, raise_first_failure_everywhere

if TYPE_CHECKING:
    from cairn.core.logger import Logger
    from cairn.core.state import State
    from cairn.storage.base import ObjectStore

__all__ = ["RemoteUploaderDownloader", "raise_upload_failure_on_every_rank", "upload_slots"]


class RemoteUploaderDownloader(LoggerDestination):
    """Uploads files (checkpoints above all) to ``bucket_uri`` in the background, and downloads them back.

    ``bucket_uri`` is ``s3://bucket``, ``gs://bucket``, ``oci://bucket`` or ``libcloud://container``, optionally
    with a path that prefixes every name. ``backend_kwargs`` go to the store's constructor (for libcloud:
    ``provider``, ``container``, ``provider_kwargs``). Each file is staged before :meth:`upload_file` returns, by
    hard link where the staging folder is on the file's filesystem (else by copy), so training may delete the file,
    or rename a new one over its name, straight away. The staging folder is ``upload_staging_folder`` when given,
    else a hidden one beside the file, on its own filesystem (see
    :meth:`cairn.storage.transfer.Transfers.staging_folder_for`), removed on close; a file rewritten in place
    before its upload is verified fails that upload (see :func:`cairn.storage.transfer.stage_file`).
    """

    def __init__(
        self,
        bucket_uri: str,
        backend_kwargs: dict[str, Any] | None = None,
        num_concurrent_uploads: int = 1,
        upload_staging_folder: str | None = None,
        use_procs: bool = True,
        num_attempts: int = 3,
        file_path_format_string: str = "{remote_file_name}",
    ) -> None:
        self._transfers = Transfers(
            bucket_uri,
            backend_kwargs,
            num_concurrent_uploads=num_concurrent_uploads,
            upload_staging_folder=upload_staging_folder,
            use_procs=use_procs,
            num_attempts=num_attempts,
            file_path_format_string=file_path_format_string,
        )

    @property
    def transfers(self) -> Transfers:
        return self._transfers

    @property
    def store(self) -> ObjectStore:
        return self._transfers.store

    def download_file(
        self, remote_file_name: str, destination: str, overwrite: bool = False, progress: bool = True
    ) -> None:
        """Download ``remote_file_name`` to ``destination`` (atomically), with a progress bar for large files."""
        self._transfers.download(remote_file_name, destination, overwrite=overwrite, progress=progress)

    def upload_file(
        self,
        remote_file_name: str,
        file_path: str,
        overwrite: bool = False,
        pointer_name: str | None = None,
        *,
        pointer_target: str | None = None,
    ) -> cf.Future[str]:
        """Stage ``file_path`` and upload it in the background (see :meth:`Transfers.upload`); a failure is raised
        at the next event."""
        return self._transfers.upload(
            remote_file_name, file_path, overwrite=overwrite, pointer_name=pointer_name, pointer_target=pointer_target
        )

    def wait(self) -> None:
        """Block until every upload (and pointer move) so far has finished; raise the first failure, naming the file."""
        self._transfers.wait()

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if not is_distributed():  # with several ranks, every rank raises it together (see the module's docstring)
            self._transfers.raise_failures()  # a background failure surfaces at the next event, on this thread
        super().run_event(event, state, logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._transfers.probe()

    def fit_end(self, state: State, logger: Logger) -> None:
        if not is_distributed():
            self._transfers.wait()
            return
        self._transfers.drain()  # every rank, then every rank raises the first rank's failure, if any
        raise_upload_failure_on_every_rank([self._transfers])

    def close(self, state: State, logger: Logger) -> None:
        self._transfers.close()


def upload_slots(transfers: Sequence[Transfers]) -> list[int]:
    """This rank's two integers for the agreement's ``all_reduce(MAX)``: 1 where an upload of ``transfers`` is still
    in flight (its failure may yet come), and 1 where one failed and nobody has raised it yet."""
    return [int(any(each.busy for each in transfers)), int(any(each.has_failure for each in transfers))]


def raise_upload_failure_on_every_rank(transfers: Sequence[Transfers]) -> None:
    """Every rank, at the same moment (a collective): take this rank's first upload failure and raise the first
    failed rank's on every rank, naming the rank (an ``ObjectExistsError`` stays one); return when no rank has one."""
    mine = None
    for each in transfers:
        mine = each.take_failure()
        if mine is not None:
            break
    raise_first_failure_everywhere(mine, (ObjectExistsError, ObjectStoreError))
