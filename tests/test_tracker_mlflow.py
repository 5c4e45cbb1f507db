"""MLFlowLogger against a real ``mlflow server`` on 127.0.0.1 (one for the module): what it logs is read back with
MLflow's own client, checkpoints go up as artifacts and load back through ``runs:/`` URIs, and a run killed and
resumed by autoresume continues the same MLflow run with an unbroken loss curve."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from cairn import Callback, Trainer
from cairn.checkpoint.save.retention import read_record
from cairn.errors import CheckpointNotFoundError, ObjectStoreError
from cairn.loggers.mlflow import MLflowArtifactStore, MLFlowLogger, flattened, redacted
from cairn.models import Classifier
from conftest import TinyNet, make_loader
from store_servers.mlflow_server import mlflow_server_fixture  # noqa: F401 - the fixture mlflow_server

SCRIPT = Path(__file__).parent / "dist_scripts" / "tracker_run.py"
LOSS = "loss/train/total"
_experiments = itertools.count()


def _experiment() -> str:
    return f"cairn-test-{os.getpid()}-{next(_experiments)}"


def _only_run(client, experiment_name: str):
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [run.info.run_id for run in runs]
    return runs[0]


def _trainer(tmp_path: Path, logger: MLFlowLogger, **kwargs) -> Trainer:
    arguments = {
        "model": Classifier(TinyNet()),
        "train_dataloader": make_loader(n=32, batch_size=8),
        "max_duration": "2ep",
        "progress_bar": False,
        "loggers": [logger],
        "save_folder": str(tmp_path / "checkpoints"),
        "save_interval": "1ep",
        **kwargs,
    }
    return Trainer(**arguments)


def test_params_metrics_artifacts_and_aliases(mlflow_server: str, tmp_path: Path) -> None:
    """Hyperparameters as params, the loss at every batch as the step, each checkpoint as an artifact with its
    content hash, ``latest`` naming the newest and ``best`` the best by ``save_best_metric``."""
    name = _experiment()
    logger = MLFlowLogger(mlflow_server, experiment_name=name, log_artifacts=True)
    trainer = _trainer(
        tmp_path, logger, run_name="params-run", save_keep_best=1, save_best_metric=LOSS, save_best_mode="min"
    )
    trainer.fit()
    trainer.close()

    client = mlflow.MlflowClient(mlflow_server)
    run = _only_run(client, name)
    assert run.info.run_id == logger.run_id and run.info.run_name == "params-run"
    assert run.info.status == "FINISHED"
    assert run.data.params["run_name"] == "params-run" and run.data.params["max_duration"] == "2ep"
    assert [point.step for point in client.get_metric_history(run.info.run_id, LOSS)] == list(range(1, 9))

    artifacts = sorted(entry.path for entry in client.list_artifacts(run.info.run_id, "checkpoints"))
    assert artifacts == ["checkpoints/ep1-ba4-rank0.pt", "checkpoints/ep2-ba8-rank0.pt"]
    tags = run.data.tags
    assert tags["cairn.checkpoint.latest"] == "checkpoints/ep2-ba8-rank0.pt"
    losses = {point.step: point.value for point in client.get_metric_history(run.info.run_id, LOSS)}
    best = "checkpoints/ep1-ba4-rank0.pt" if losses[4] < losses[8] else "checkpoints/ep2-ba8-rank0.pt"
    assert tags["cairn.checkpoint.best"] == best
    for artifact in artifacts:
        local = client.download_artifacts(run.info.run_id, artifact, str(tmp_path))
        recorded = read_record(local).content_hash
        assert recorded is not None and tags[f"cairn.content_hash.{artifact}"] == recorded


def test_load_path_runs_uri_and_refusals(mlflow_server: str, tmp_path: Path) -> None:
    """A run's artifact loads back as ``runs:/<id>/checkpoints/<name>`` (verified as any download); a missing
    artifact or run is a CheckpointNotFoundError that says which."""
    name = _experiment()
    logger = MLFlowLogger(mlflow_server, experiment_name=name, log_artifacts=True)
    trainer = _trainer(tmp_path / "first", logger, max_duration="1ep")
    trainer.fit()
    trainer.close()
    weights = {key: value.clone() for key, value in trainer.state.model.state_dict().items()}
    run_id = logger.run_id

    source = MLFlowLogger(mlflow_server)
    loaded = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(n=32, batch_size=8),
        max_duration="1ep",
        progress_bar=False,
        load_path=f"runs:/{run_id}/checkpoints/ep1-ba4-rank0.pt",
        load_object_store=source,
    )
    for key, value in loaded.state.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert int(loaded.state.timestamp.batch) == 4
    loaded.close()

    with pytest.raises(CheckpointNotFoundError, match=r"has no artifact 'checkpoints/ep9\.pt'.*ep1-ba4-rank0\.pt"):
        source.checkpoint_source(f"runs:/{run_id}/checkpoints/ep9.pt")
    with pytest.raises(CheckpointNotFoundError, match="holds no MLflow run 0123456789abcdef"):
        source.checkpoint_source("runs:/0123456789abcdef/checkpoints/ep1-ba4-rank0.pt")
    with pytest.raises(ValueError, match=r"runs:/<run_id>/<artifact path>"):
        source.checkpoint_source("checkpoints/ep1-ba4-rank0.pt")


def test_artifact_store_speaks_the_store_protocol(mlflow_server: str, tmp_path: Path) -> None:
    """The artifact store uploads under any name (not only the file's own), lists with sizes, and refuses names
    that leave the run's folder."""
    client = mlflow.MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(_experiment())
    run_id = client.create_run(experiment_id).info.run_id
    store = MLflowArtifactStore(client, run_id)
    local = tmp_path / "local.bin"
    local.write_bytes(b"x" * 1000)
    store.upload_object("folder/deep/renamed.bin", str(local))
    store.verify_upload("folder/deep/renamed.bin", str(local))
    assert store.list_objects_with_sizes("folder/") == [("folder/deep/renamed.bin", 1000)]
    assert store.get_uri("folder/deep/renamed.bin") == f"runs:/{run_id}/folder/deep/renamed.bin"
    store.download_object("folder/deep/renamed.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == local.read_bytes()
    assert [path.name for path in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".cairn-*"))
    with pytest.raises(FileNotFoundError):
        store.get_object_size("folder/missing.bin")
    with pytest.raises(ValueError, match="leads outside"):
        store.get_object_size("../escape.bin")


def test_credentials_stay_out_of_messages_and_checkpoints(
    mlflow_server: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A tracking URI's user information never reaches the output, the log, an error message or the checkpoint."""
    caplog.set_level(logging.DEBUG, logger="cairn")
    secret_uri = mlflow_server.replace("http://", "http://someone:hunter2-secret@")
    assert redacted(secret_uri) == mlflow_server
    logger = MLFlowLogger(secret_uri, experiment_name=_experiment())
    trainer = _trainer(tmp_path, logger, max_duration="1ep")
    trainer.fit()
    trainer.close()
    saved = (tmp_path / "checkpoints" / "ep1-ba4-rank0.pt").read_bytes()
    assert b"hunter2" not in saved and logger.run_id is not None
    with pytest.raises(CheckpointNotFoundError) as caught:
        logger.checkpoint_source("runs:/0123456789abcdef/checkpoints/x.pt")
    assert "hunter2" not in str(caught.value)
    printed = capfd.readouterr()
    assert "hunter2" not in printed.out + printed.err + caplog.text


class DeleteRunAt(Callback):
    """Deletes the MLflow run at the end of a batch, as someone cleaning up the UI might: what the run logs next
    is refused by the server."""

    def __init__(self, logger: MLFlowLogger, tracking_uri: str, batch: int) -> None:
        self.logger, self.tracking_uri, self.batch = logger, tracking_uri, batch

    def batch_end(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.batch:
            mlflow.MlflowClient(self.tracking_uri).delete_run(self.logger.run_id)


def test_refused_metrics_stop_the_run_with_a_clean_message(mlflow_server: str) -> None:
    """Metrics the server refuses (sent in the background) are raised on the training thread, by FIT_END at the
    latest, naming the run, never the URI's password."""
    secret_uri = mlflow_server.replace("http://", "http://someone:hunter2-secret@")
    logger = MLFlowLogger(secret_uri, experiment_name=_experiment())
    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(n=32, batch_size=8),
        max_duration="1ep",
        progress_bar=False,
        loggers=[logger],
        callbacks=[DeleteRunAt(logger, mlflow_server, batch=1)],
    )
    with pytest.raises(ObjectStoreError, match=f"metrics to MLflow run {logger.run_id} on {mlflow_server}") as caught:
        trainer.fit()
    trainer.close()
    assert "hunter2" not in str(caught.value) and caught.value.__cause__ is None


def test_a_missing_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets where it is not installed
    with pytest.raises(ImportError, match=r"pip install 'cairn\[mlflow\]'"):
        MLFlowLogger("http://127.0.0.1:1")


def test_flattened_params_fit_mlflow() -> None:
    params = flattened({"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "bad key?": "x" * 7000, "empty": {}})
    assert params == {"optim/lr": "0.1", "optim/betas": "[0.9, 0.99]", "bad key_": "x" * 6000, "empty": "{}"}


def test_killed_and_resumed_run_continues_one_curve(mlflow_server: str, tmp_path: Path) -> None:
    """SIGKILL right after the checkpoint of batch 4 (in a subprocess), then autoresume (here): one MLflow run, its
    loss at steps 1..16 with no gap and no restart at 0, and the resumed run's checkpoints as its artifacts."""
    name, folder = _experiment(), str(tmp_path / "checkpoints")
    command = [sys.executable, str(SCRIPT), "--tracking-uri", mlflow_server, "--experiment", name]
    command += ["--save-folder", folder, "--kill-at", "4"]
    killed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = _script().tracked_trainer(mlflow_server, name, folder)
    assert int(resumed.state.timestamp.batch) == 4
    resumed.fit()
    resumed.close()

    client = mlflow.MlflowClient(mlflow_server)
    run = _only_run(client, name)
    steps = [point.step for point in client.get_metric_history(run.info.run_id, LOSS)]
    assert sorted(steps) == list(range(1, 17)), steps
    assert run.info.status == "FINISHED"
    artifacts = {entry.path for entry in client.list_artifacts(run.info.run_id, "checkpoints")}
    resumed_saves = {"checkpoints/ep0-ba8-rank0.pt", "checkpoints/ep1-ba12-rank0.pt", "checkpoints/ep1-ba16-rank0.pt"}
    assert resumed_saves <= artifacts, artifacts  # (ep0-ba4's upload may have been cut short by the kill)
    assert run.data.tags["cairn.checkpoint.latest"] == "checkpoints/ep1-ba16-rank0.pt"


def _script():
    """tests/dist_scripts/tracker_run.py as a module: the test resumes the very run the script builds."""
    spec = importlib.util.spec_from_file_location("tracker_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
