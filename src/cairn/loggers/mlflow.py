"""MLflow as the run's experiment tracker: hyperparameters, metrics, and (``log_artifacts=True``) checkpoints as
artifacts of the run, which a later run can load back with ``load_path="runs:/<run_id>/checkpoints/<file name>"``.

Only MLflow's client API is used (``MlflowClient``), so ``pip install 'cairn[mlflow]'`` (``mlflow-skinny``) is
enough; ``mlflow`` is imported on first use. Who does what:

* The MLflow run is started lazily, at the first thing logged (the Trainer's hyperparameters, after its checkpoint
  restore) or at ``FIT_START``: a run resumed by autoresume finds the run id in the checkpoint (this logger's
  ``state_dict``) and continues that MLflow run, so its curves go on where they stopped.
* Metrics are queued and sent by one background thread (``cairn-mlflow``) in batches, so a slow tracking server
  does not slow training; every metric logged so far is sent before a checkpoint is announced complete (the saver
  calls :meth:`MLFlowLogger.log_checkpoint`), so a run killed after a checkpoint has its curve up to that
  checkpoint.
* Checkpoints go up on another thread (``cairn-mlflow-upload``) through :class:`MLflowArtifactStore`, an
  :class:`~cairn.storage.base.ObjectStore` over the run's artifacts (the same upload, size check and retries as any
  store); then the run's tags record cairn's content hash (``cairn.content_hash.<artifact path>``) and the aliases
  (``cairn.checkpoint.latest``, ``cairn.checkpoint.best``: the artifact path they name).
* A background failure is raised on the training thread at the next event. With several ranks only rank 0 logs,
  so a failure is instead raised on every rank together at ``FIT_END`` (raising on rank 0 alone would leave the
  others waiting in their next collective).

The tracking URI may carry credentials (``https://user:token@host``): it is never written to a log, a message, a
checkpoint or a tag; messages name the server with its user information removed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import posixpath
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cairn.core.logger import LoggerDestination, SavedCheckpoint
from cairn.errors import CheckpointNotFoundError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore
from cairn.storage.mlflow_artifacts import MLflowArtifactStore, import_mlflow, is_missing, redacted, scrubbed
from cairn.utils.dist import get_rank, is_distributed, raise_first_failure_everywhere

if TYPE_CHECKING:
    from cairn.core.event import Event
    from cairn.core.logger import Logger
    from cairn.core.state import State

__all__ = ["MLFlowLogger", "MLflowArtifactStore"]

log = logging.getLogger(__name__)

#: The artifact folder checkpoints go into, inside the run's artifacts.
CHECKPOINT_FOLDER = "checkpoints"
#: Run tags: ``<ALIAS_TAG>.latest`` names the artifact path of the newest checkpoint, ``.best`` the best one.
ALIAS_TAG = "cairn.checkpoint"
#: Run tag ``<HASH_TAG>.<artifact path>``: cairn's content hash of that checkpoint (``xxh3-128:...``).
HASH_TAG = "cairn.content_hash"

# MLflow's limits (mlflow.utils.validation): kept here so the client's own check never refuses what we send.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_NOT_IN_A_NAME = re.compile(r"[^/\w.\- :]")
_RUNS_URI = re.compile(r"runs:/(?P<run_id>[A-Za-z0-9][\w\-]*)/(?P<path>.+)")


class MLFlowLogger(LoggerDestination):
    """Logs the run to MLflow; with ``log_artifacts=True``, each checkpoint too, as the artifact
    ``checkpoints/<file name>``. Pass it as ``load_object_store`` to load ``load_path="runs:/<run_id>/<path>"``.

    ``tracking_uri``: the tracking server (``http://host:5000``, ``databricks``, ``sqlite:///mlflow.db``); None
    for MLflow's default (``MLFLOW_TRACKING_URI``). ``experiment_name``: made if missing; None for MLflow's
    ``Default``. ``run_name``: the MLflow run's name; None for cairn's run name. ``run_id``: continue this MLflow
    run instead of starting one (a run resumed from a checkpoint continues its own without it). ``tags``: set on
    the run when it starts. Only rank 0 logs anything in a multi-process run.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        run_name: str | None = None,
        log_artifacts: bool = False,
        *,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        import_mlflow()  # a missing client fails here, at construction, with the extra to install
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.log_artifacts = bool(log_artifacts)
        self.tags = {str(key): str(value) for key, value in (tags or {}).items()}
        self._run_id = run_id
        self._started = False
        self._cairn_run_name: str | None = None
        self._client_instance: Any = None
        self._lock = threading.Lock()
        self._pending: list[Any] = []  # metrics not yet handed to the sender
        self._send_queued = False  # a send task is queued and will take what is pending
        self._sender: cf.ThreadPoolExecutor | None = None
        self._uploader: cf.ThreadPoolExecutor | None = None
        self._uploads: list[cf.Future[str]] = []
        self._failures: list[ObjectStoreError] = []
        self._raised = False  # a failure was raised on the training thread
        self._names: dict[str, str] = {}  # a checkpoint's file name -> the first saver name that had it

    # -- the run --------------------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run this logger writes to (None until it started one, or was resumed into one)."""
        return self._run_id

    def _client(self) -> Any:
        if self._client_instance is None:
            mlflow = import_mlflow()
            with self._server_errors("open the MLflow tracking store"):
                self._client_instance = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client_instance

    def _ensure_run(self) -> str:
        """The run's id, starting (or continuing) the MLflow run at the first call."""
        if self._started and self._run_id is not None:
            return self._run_id
        client = self._client()
        with self._server_errors("start the MLflow run"):
            if self._run_id is not None and self._continued(client, self._run_id):
                client.update_run(self._run_id, status="RUNNING")
            else:
                experiment_id = self._experiment_id(client)
                name = self.run_name or self._cairn_run_name
                run = client.create_run(experiment_id, run_name=name, tags=self.tags or None)
                self._run_id = run.info.run_id
        self._started = True
        assert self._run_id is not None
        return self._run_id

    def _continued(self, client: Any, run_id: str) -> bool:
        """Whether ``run_id`` exists on this tracking server (else a new run starts, and the log says why)."""
        try:
            client.get_run(run_id)
        except Exception as err:
            if not is_missing(err):
                raise
            log.warning(
                "the checkpoint names the MLflow run %s, which %s does not hold; starting a new run",
                run_id,
                redacted(self.tracking_uri),
            )
            return False
        return True

    def _experiment_id(self, client: Any) -> str:
        name = self.experiment_name or "Default"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        try:
            return str(client.create_experiment(name))
        except Exception as err:  # another process made it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise err from None
            return str(experiment.experiment_id)

    @contextlib.contextmanager
    def _server_errors(self, what: str) -> Iterator[None]:
        """The client's errors as :class:`ObjectStoreError`, with no credentials in the message or the chain."""
        try:
            yield
        except (ObjectStoreError, CheckpointNotFoundError):
            raise
        except Exception as err:
            raise ObjectStoreError(
                f"could not {what} on {redacted(self.tracking_uri)} ({scrubbed(str(err))}): check tracking_uri, "
                "the server and its credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_TOKEN)"
            ) from None

    # -- what the run logs ----------------------------------------------------------------------------------------

    def log_hyperparameters(self, hyperparameters: dict[str, Any]) -> None:
        """Each hyperparameter as a param, nested ones flattened to ``a/b``; a param the run already holds with
        another value (a resumed run whose settings changed) is left as it was, since MLflow params never change."""
        if get_rank() != 0:
            return
        run_id = self._ensure_run()
        params = flattened(hyperparameters)
        mlflow = import_mlflow()
        with self._server_errors("log the hyperparameters"):
            held = self._client().get_run(run_id).data.params
            changed = sorted(key for key, value in params.items() if key in held and held[key] != value)
            if changed:
                log.warning("MLflow params never change: %s keep the values this run logged first", changed)
            new = [mlflow.entities.Param(key, value) for key, value in params.items() if key not in held]
            for start in range(0, len(new), _PARAMS_PER_BATCH):
                self._client().log_batch(run_id, params=new[start : start + _PARAMS_PER_BATCH], synchronous=True)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if get_rank() != 0:
            return
        run_id = self._ensure_run()
        now = int(time.time() * 1000)
        metric = import_mlflow().entities.Metric
        entries = [metric(_key(name), number, now, int(step or 0)) for name, number in _numbers(metrics)]
        if not entries:
            return
        with self._lock:
            self._pending.extend(entries)
            if self._send_queued:
                return  # the queued send takes these too
            self._send_queued = True
        self._sending().submit(self._send_pending, run_id)

    def _send_pending(self, run_id: str) -> None:
        with self._lock:
            batch, self._pending, self._send_queued = self._pending, [], False
        try:
            for start in range(0, len(batch), _METRICS_PER_BATCH):
                self._client().log_batch(run_id, metrics=batch[start : start + _METRICS_PER_BATCH], synchronous=True)
        except Exception as err:  # noqa: BLE001 - kept, and raised on the training thread
            self._fail(
                ObjectStoreError(
                    f"sending {len(batch)} metrics to MLflow run {run_id} on {redacted(self.tracking_uri)} failed "
                    f"({scrubbed(str(err))}): check the tracking server; the run goes on only once it answers"
                )
            )

    def flush(self) -> None:
        """Block until every metric logged so far has been sent (or its failure recorded)."""
        if self._sender is not None:
            self._sender.submit(lambda: None).result()

    def _sending(self) -> cf.ThreadPoolExecutor:
        if self._sender is None:
            self._sender = cf.ThreadPoolExecutor(1, thread_name_prefix="cairn-mlflow")
        return self._sender

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def log_checkpoint(self, checkpoint: SavedCheckpoint) -> cf.Future[str] | None:
        """Send every metric logged so far (a run killed after this checkpoint has its curve up to it), then, with
        ``log_artifacts``, upload the checkpoint as ``checkpoints/<file name>`` in the background and tag it."""
        if get_rank() != 0:
            return None
        run_id = self._ensure_run()
        self.flush()
        if not self.log_artifacts:
            return None
        if self._uploader is None:
            self._uploader = cf.ThreadPoolExecutor(1, thread_name_prefix="cairn-mlflow-upload")
        future = self._uploader.submit(self._store_checkpoint, run_id, checkpoint)
        with self._lock:
            self._uploads.append(future)
        return future

    def _artifact_path(self, name: str) -> str:
        """``checkpoints/<file name>``: the MLflow run already stands for the cairn run, so the saver's folders
        (``<run_name>/checkpoints/...``) are left out, unless two checkpoints of this run share a file name."""
        base = posixpath.basename(name)
        with self._lock:
            first = self._names.setdefault(base, name)
        return posixpath.join(CHECKPOINT_FOLDER, base if first == name else name)

    def _store_checkpoint(self, run_id: str, checkpoint: SavedCheckpoint) -> str:
        artifact = self._artifact_path(checkpoint.name)
        store = MLflowArtifactStore(self._client(), run_id)
        try:
            store.upload_object(artifact, checkpoint.path, overwrite=True)
            store.verify_upload(artifact, checkpoint.path)
            tags = [(f"{ALIAS_TAG}.{alias}", artifact) for alias in checkpoint.aliases]
            if checkpoint.content_hash is not None:
                tags.append((_key(f"{HASH_TAG}.{artifact}"), checkpoint.content_hash))
            run_tag = import_mlflow().entities.RunTag
            entries = [run_tag(key, value[:_MAX_TAG_VALUE]) for key, value in tags]
            self._client().log_batch(run_id, tags=entries, synchronous=True)
        except Exception as err:
            failure = ObjectStoreError(
                f"logging {checkpoint.path!r} to MLflow as {store.get_uri(artifact)} failed "
                f"({scrubbed(str(err))}). The local file is kept: check the tracking server, then resume from it"
            )
            self._fail(failure)
            raise failure from None
        return artifact

    def wait(self) -> None:
        """Block until every metric and checkpoint so far is sent; raise the first failure."""
        self._drain()
        self._raise_failures()

    def _drain(self) -> None:
        self.flush()
        with self._lock:
            uploads = list(self._uploads)
        cf.wait(uploads)
        with self._lock:
            self._uploads = [future for future in self._uploads if not future.done()]

    def _fail(self, failure: ObjectStoreError) -> None:
        with self._lock:
            self._failures.append(failure)
        if is_distributed():  # raised on every rank at FIT_END: say it now, where it happened
            log.error("%s", failure)

    def _take_failure(self) -> ObjectStoreError | None:
        with self._lock:
            failures, self._failures = self._failures, []
        return failures[0] if failures else None

    def _raise_failures(self) -> None:
        failure = self._take_failure()
        if failure is not None:
            self._raised = True
            raise failure

    # -- loading --------------------------------------------------------------------------------------------------

    def checkpoint_source(self, name: str) -> tuple[ObjectStore, str]:
        """The store over the run's artifacts that ``name`` (``runs:/<run_id>/<artifact path>``) names, once the
        run and the artifact are known to exist: a mistake is a :class:`CheckpointNotFoundError` that says which."""
        match = _RUNS_URI.fullmatch(name)
        if match is None:
            raise ValueError(
                f"load_path={name!r}: with an MLFlowLogger as load_object_store, name the artifact as "
                "runs:/<run_id>/<artifact path>, e.g. runs:/<run_id>/checkpoints/ep2-ba16-rank0.pt"
            )
        run_id, path = match.group("run_id"), match.group("path")
        client = self._client()
        with self._server_errors(f"read MLflow run {run_id}"):
            try:
                client.get_run(run_id)
            except Exception as err:
                if not is_missing(err):
                    raise
                raise CheckpointNotFoundError(
                    f"load_path={name!r}: {redacted(self.tracking_uri)} holds no MLflow run {run_id}; check the run "
                    "id (the run's page in the MLflow UI shows it) and the logger's tracking_uri"
                ) from None
        store = MLflowArtifactStore(client, run_id)
        self._check_artifact(store, name, path)
        return store, path

    def _check_artifact(self, store: MLflowArtifactStore, name: str, path: str) -> None:
        try:
            store.get_object_size(path)
            return
        except ObjectNotFoundError:
            pass
        try:
            store.get_object_size(posixpath.join(path, "cairn.pt"))  # a sharded folder
            return
        except ObjectNotFoundError:
            pass
        held = [entry for entry in store.list_objects(CHECKPOINT_FOLDER + "/") if not entry.endswith("/cairn.pt")]
        shown = ", ".join(held[-5:]) if held else "none"
        raise CheckpointNotFoundError(
            f"load_path={name!r}: MLflow run {store.run_id} has no artifact {path!r} (its checkpoints: {shown}); "
            "name one the run holds"
        )

    # -- events ---------------------------------------------------------------------------------------------------

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if not is_distributed():  # with several ranks, every rank raises it together at FIT_END
            self._raise_failures()
        super().run_event(event, state, logger)

    def init(self, state: State, logger: Logger) -> None:
        self._cairn_run_name = state.run_name

    def fit_start(self, state: State, logger: Logger) -> None:
        self._cairn_run_name = state.run_name  # (restored by now, when the run resumed)
        if get_rank() == 0:
            self._ensure_run()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._drain()
        failure = self._take_failure()
        if is_distributed():
            try:
                raise_first_failure_everywhere(failure, (ObjectStoreError,))
            except ObjectStoreError:
                self._raised = True  # reported: close() does not raise it again
                raise
        elif failure is not None:
            self._raised = True
            raise failure
        if get_rank() == 0 and self._started and self._run_id is not None:
            with self._server_errors("end the MLflow run"):
                self._end_run(self._run_id)
            self._started = False  # a later fit marks it running again

    def _end_run(self, run_id: str) -> None:
        """Mark the run finished. ``set_terminated`` prints the run's URL, built from the tracking URI, to stdout:
        where that URI holds user information, only the status is set (MLflow then shows no end time)."""
        if "@" in urlsplit(self.tracking_uri or "").netloc:
            self._client().update_run(run_id, status="FINISHED")
        else:
            self._client().set_terminated(run_id, status="FINISHED")

    def close(self, state: State, logger: Logger) -> None:
        """Send what is left and release the threads; raise a failure, unless one was raised already (the run
        stopped on it, and those after it, against the same run, would only repeat it: they are logged)."""
        try:
            self._drain()
            failure = self._take_failure()
            if failure is not None and not self._raised:
                self._raised = True
                raise failure
            if failure is not None:
                log.warning("after the MLflow failure raised before: %s", failure)
        finally:
            for pool in (self._sender, self._uploader):
                if pool is not None:
                    pool.shutdown(wait=True)
            self._sender = self._uploader = None

    def state_dict(self) -> dict[str, Any]:
        """The MLflow run's id (never the tracking URI): a resumed run continues the same MLflow run."""
        return {"run_id": self._run_id} if self._run_id is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run_id = state.get("run_id")
        if isinstance(run_id, str) and run_id and run_id != self._run_id:
            self._run_id, self._started = run_id, False


def flattened(hyperparameters: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings flattened to ``outer/inner`` keys, values as text within MLflow's limits."""
    flat: dict[str, str] = {}
    for name, value in hyperparameters.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flattened(value, f"{key}/"))
        else:
            flat[_key(key)] = str(value)[:_MAX_PARAM_VALUE]
    return flat


def _key(name: str) -> str:
    """``name`` as MLflow takes a param, metric or tag key: its characters, no empty or dot segments, 250 at most."""
    segments = [segment for segment in _NOT_IN_A_NAME.sub("_", str(name)).split("/") if segment not in ("", ".", "..")]
    return ("/".join(segments) or "_")[:_MAX_KEY].rstrip("/")


def _numbers(metrics: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The metrics that are numbers (Python, NumPy, one-element tensors), as floats; the rest are skipped."""
    for name, value in metrics.items():
        if isinstance(value, bool):
            continue
        try:
            yield name, float(value)
        except (TypeError, ValueError):
            continue
