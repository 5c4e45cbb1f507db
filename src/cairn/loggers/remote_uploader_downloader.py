"""The run's uploader: a logger destination that hands files to :class:`~cairn.storage.transfer.Transfers`.

The transfers themselves (staging, workers, retries, verification, the ``latest`` pointer) live in
:mod:`cairn.storage.transfer`; this adapter ties them to the run's events, so that a background failure is raised
on the training thread at the next event, ``FIT_END`` waits for every upload, and ``close`` drains them.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import TYPE_CHECKING, Any

from cairn.core.event import Event
from cairn.core.logger import LoggerDestination
from cairn.storage.transfer import Transfers

if TYPE_CHECKING:
    from cairn.core.logger import Logger
    from cairn.core.state import State
    from cairn.storage.base import ObjectStore

__all__ = ["RemoteUploaderDownloader"]


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
        self._transfers.raise_failures()  # a background failure surfaces at the next event, on the training thread
        super().run_event(event, state, logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        self._transfers.probe()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._transfers.wait()

    def close(self, state: State, logger: Logger) -> None:
        self._transfers.close()
