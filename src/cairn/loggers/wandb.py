"""Weights & Biases: a run's hyperparameters and metrics, and its checkpoints as W&B artifacts to resume from.

The W&B run starts lazily, at the first thing logged (or at ``FIT_START``): by then the Trainer has restored any
checkpoint, whose callback state holds the run id this logger saved (:meth:`WandBLogger.state_dict`), so a run
resumed by autoresume continues the same W&B run (``resume="allow"``) and its curves go on from the restored batch.

Metrics of one step are gathered here and sent to W&B when the step is over (the next step's first metric, a
checkpoint, the end of fit), each step once, committed: W&B refuses a second write to a step it has closed, and a
row still open when the process is killed would be lost.

With ``log_artifacts=True`` each complete checkpoint becomes a version of one artifact (type ``"model"``), on one
background thread; :meth:`WandBLogger.log_checkpoint`'s future ends when W&B has stored it (in offline mode: once it
is staged in W&B's run folder, for ``wandb sync`` to upload later). A failure is raised on the training thread at the
next event, and ``FIT_END`` waits for every artifact.

As a ``load_object_store``, ``load_path`` names an artifact (``"<name>:latest"``, ``"<name>:v3"``,
``"entity/project/<name>:alias"``); its file is downloaded through :class:`WandBArtifactStore`, checked against the
digest W&B records, and then read and verified by cairn like any download. ``wandb`` is imported only when used.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import secrets
import string
import threading
from typing import TYPE_CHECKING, Any

from cairn.core.logger import LoggerDestination, SavedCheckpoint
from cairn.errors import ObjectStoreError
from cairn.storage.base import ObjectStore
from cairn.storage.wandb_artifacts import WandBArtifactStore, import_wandb, short_error
from cairn.utils.dist import get_rank, is_distributed, raise_first_failure_everywhere

if TYPE_CHECKING:
    from cairn.core.logger import Logger
    from cairn.core.state import State

__all__ = ["WandBArtifactStore", "WandBLogger"]

log = logging.getLogger(__name__)

_ID_LETTERS = string.ascii_lowercase + string.digits


def new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as W&B makes them), chosen here so the first checkpoint can
    record it before W&B is ever contacted."""
    return "".join(secrets.choice(_ID_LETTERS) for _ in range(8))


class WandBLogger(LoggerDestination):
    """Logs hyperparameters (the run's config) and metrics (step = the run's batch) to a W&B run, and with
    ``log_artifacts`` each checkpoint as a version of the artifact ``artifact_name`` (default ``model-<run id>``).

    Only rank 0 logs in a multi-process run. ``init_kwargs`` go to ``wandb.init`` (``project``, ``entity``, ``name``,
    ``id`` and ``resume`` are set from this logger's own arguments and its saved run id unless given there).
    """

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        log_artifacts: bool = False,
        *,
        artifact_name: str | None = None,
        rank_zero_only: bool = True,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import_wandb()  # a missing package fails here, when the Trainer's arguments are built, not mid-run
        self.project, self.entity, self.name = project, entity, name
        self.log_artifacts = bool(log_artifacts)
        self.rank_zero_only = rank_zero_only
        self.init_kwargs = dict(init_kwargs or {})
        self._artifact_name = artifact_name
        self._run_id: str = str(self.init_kwargs.get("id") or new_run_id())
        self._run: Any = None
        self._step: int | None = None  # the step whose metrics are gathered in _row, not yet sent
        self._row: dict[str, Any] = {}
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: list[cf.Future[str]] = []
        self._lock = threading.Lock()
        self._store: WandBArtifactStore | None = None

    # -- the run ------------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The W&B run's id: saved in every checkpoint, so that a resumed run continues this W&B run."""
        return self._run_id

    @property
    def artifact_name(self) -> str:
        return self._artifact_name or f"model-{self._run_id}"

    @property
    def run(self) -> Any:
        """The W&B run, started at the first call that needs it; None on ranks that do not log."""
        if self._run is None:
            self._start()
        return self._run

    def _start(self, config: dict[str, Any] | None = None) -> None:
        """Start (or, with the saved id, resume) the W&B run, on ranks that log."""
        if not self._logs_here():
            return
        wandb = import_wandb()
        kwargs: dict[str, Any] = {"project": self.project, "entity": self.entity, "name": self.name}
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        kwargs.update({"id": self._run_id, "resume": "allow", "reinit": "create_new"})
        kwargs.update(self.init_kwargs)
        if config is not None:
            kwargs["config"] = {**kwargs.get("config", {}), **config}
            kwargs.setdefault("allow_val_change", True)
        self._run = wandb.init(**kwargs)
        self._run_id = self._run.id

    def _logs_here(self) -> bool:
        return not self.rank_zero_only or get_rank() == 0

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self._run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("run_id") if isinstance(state, dict) else None
        if not isinstance(saved, str) or not saved:
            return
        if self._run is not None and saved != self._run_id:
            log.warning(
                "the checkpoint's W&B run %s is not continued: this logger's run %s had started", saved, self._run_id
            )
            return
        if "id" not in self.init_kwargs:
            self._run_id = saved

    # -- what is logged -----------------------------------------------------------------------------------------

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        if self._run is None:  # the usual case (the Trainer's first call): the run starts with them as its config
            self._start(config=hyperparameters)
        elif self._logs_here():
            self._run.config.update(hyperparameters, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self._logs_here():
            return
        if step is not None and self._step is not None and step != self._step:
            self._send_row()
        if step is not None:
            self._step = step
        self._row.update({key: _plain(value) for key, value in metrics.items()})
        if step is None:
            self._send_row()

    def _send_row(self) -> None:
        """Send the gathered step to W&B, committed (see the module's docstring)."""
        if not self._row:
            return
        row, step = self._row, self._step
        self._row = {}
        run = self.run
        if step is None:
            run.log(row, commit=True)
        else:
            run.log(row, step=step, commit=True)

    def log_checkpoint(self, checkpoint: SavedCheckpoint) -> cf.Future[str] | None:
        if not self._logs_here():
            return None
        self._send_row()  # the checkpoint's batch reaches W&B now: a run killed later resumes right after it
        if not self.log_artifacts:
            return None
        run = self.run
        wandb = import_wandb()
        metadata = {
            "cairn_content_hash": checkpoint.content_hash,
            "cairn_name": checkpoint.name,
            "batch": checkpoint.batch,
        }
        artifact = wandb.Artifact(self.artifact_name, type="model", metadata=metadata)
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-wandb")
        future = self._pool.submit(_store_artifact, run, artifact, checkpoint, _is_offline(run))
        with self._lock:
            self._pending.append(future)
        return future

    def raise_failures(self) -> None:
        """Raise the first artifact that failed to be stored, once, naming it (on the training thread)."""
        failure = self._take_failure()
        if failure is not None:
            raise failure

    def _take_failure(self) -> BaseException | None:
        """The first failure among the finished artifacts (forgetting those), or None."""
        with self._lock:
            failed = [future for future in self._pending if future.done() and future.exception() is not None]
            self._pending = [future for future in self._pending if not future.done()]
        return failed[0].exception() if failed else None

    def wait(self) -> None:
        """Block until every checkpoint handed over is stored by W&B; raise the first failure."""
        with self._lock:
            pending = list(self._pending)
        cf.wait(pending)
        self.raise_failures()

    # -- events -------------------------------------------------------------------------------------------------

    def run_event(self, event: Any, state: State, logger: Logger) -> None:
        if not is_distributed():  # with several ranks, every rank raises it together at FIT_END
            self.raise_failures()
        super().run_event(event, state, logger)

    def fit_start(self, state: State, logger: Logger) -> None:
        del state, logger
        _ = self.run  # the run starts now at the latest (after any restore: it continues the saved run)

    def fit_end(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._logs_here() and self._run is not None:
            self._send_row()
        if not is_distributed():
            self.wait()
            return
        with self._lock:
            pending = list(self._pending)
        cf.wait(pending)
        raise_first_failure_everywhere(self._take_failure(), (ObjectStoreError,))  # only rank 0 stores artifacts

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        try:
            if self._run is not None:
                self._send_row()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        finally:
            if self._run is not None:
                self._run.finish()
                self._run = None
            if self._store is not None:
                self._store.close()

    # -- as load_object_store -----------------------------------------------------------------------------------

    def checkpoint_source(self, name: str) -> tuple[ObjectStore, str]:
        """The artifact ``name`` (``"<name>:alias"``, ``"project/<name>:alias"`` or
        ``"entity/project/<name>:alias"``) as an object of :class:`WandBArtifactStore`."""
        if self._store is None:
            self._store = WandBArtifactStore(entity=self.entity, project=self.project)
        return self._store, name


def _is_offline(run: Any) -> bool:
    return str(getattr(run.settings, "mode", "")) in ("offline", "dryrun")


def _store_artifact(run: Any, artifact: Any, checkpoint: SavedCheckpoint, offline: bool) -> str:
    """On the logger's worker: log the checkpoint as a version of ``artifact`` and wait until W&B has stored it;
    its versioned name. Offline, W&B copies the file into its staging folder (the saver may delete it once this
    returns, long before ``wandb sync``); online the upload reads the file in place, which the saver keeps until
    this returns."""
    policy = "mutable" if offline else "immutable"
    try:
        artifact.add_file(checkpoint.path, name=os.path.basename(checkpoint.name), policy=policy)
        logged = run.log_artifact(artifact, aliases=list(checkpoint.aliases))
        if offline:  # W&B cannot wait in offline mode: the file is staged in its run folder for `wandb sync`
            return f"{artifact.name} (offline)"
        logged.wait()
    except Exception as err:  # noqa: BLE001 - whatever the SDK raises, the user needs the checkpoint named
        raise ObjectStoreError(
            f"logging the checkpoint {checkpoint.path!r} to W&B as a version of {artifact.name!r} failed "
            f"({type(err).__name__}: {short_error(err)}); the local file is kept: check the W&B run and log it again"
        ) from None
    return str(logged.qualified_name)


def _plain(value: Any) -> Any:
    """A number W&B records as one (a one-element tensor or NumPy scalar becomes a float); anything else as given."""
    if isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


