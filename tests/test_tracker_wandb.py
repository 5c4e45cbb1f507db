"""WandBLogger (issue 21): logging for real in W&B's offline mode, read back from the run's transaction log; a run
SIGKILLed after a checkpoint and resumed by autoresume continues the same W&B run; and, against a stand-in for the
server (tests/store_servers/wandb_standin.py), checkpoints uploaded online as artifact versions by the SDK and read
back from W&B artifacts through ``load_object_store``.

Nothing here reaches api.wandb.ai: every test sets ``WANDB_MODE=offline`` or points ``WANDB_BASE_URL`` at the
stand-in, and no real key exists (the stand-in's is a test value).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("wandb")

from cairn import Trainer  # noqa: E402
from cairn.checkpoint.save.retention import read_record  # noqa: E402
from cairn.errors import CheckpointNotFoundError  # noqa: E402
from cairn.loggers.wandb import WandBLogger  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import ScriptedMetric, TinyNet, build_trainer, make_loader  # noqa: E402
from store_servers.wandb_standin import WandBStandIn, finished_log, history_steps, transaction_log  # noqa: E402

LOSS = "loss/train/total"
METRIC = "metrics/eval/score"
SCRIPT = os.path.join(os.path.dirname(__file__), "dist_scripts", "wandb_run.py")
FAKE_KEY = "local-" + "0" * 40  # what the stand-in is sent; no real key exists in these tests


def wandb_environment(root: str, **extra: str) -> dict[str, str]:
    """W&B's folders under ``root``, no key from the machine, no network beyond what ``extra`` allows."""
    env = {
        "WANDB_DIR": os.path.join(root, "wandb-dir"),
        "WANDB_DATA_DIR": os.path.join(root, "wandb-data"),
        "WANDB_CACHE_DIR": os.path.join(root, "wandb-cache"),
        "WANDB_CONFIG_DIR": os.path.join(root, "wandb-config"),
        "WANDB_ARTIFACT_DIR": os.path.join(root, "wandb-artifacts"),
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # a closed port: a mistake fails here, never reaches W&B
        **extra,
    }
    os.makedirs(env["WANDB_DIR"], exist_ok=True)
    return env


@pytest.fixture
def fresh_wandb():
    """W&B's process-wide setup made anew from this test's environment, and dropped after it: ``wandb.init`` reads
    ``WANDB_MODE`` and ``WANDB_BASE_URL`` once per process, so an earlier offline test would keep this one offline."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def offline(tmp_path, monkeypatch, fresh_wandb) -> str:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in wandb_environment(str(tmp_path), WANDB_MODE="offline").items():
        monkeypatch.setenv(name, value)
    return str(tmp_path)


def run_logs(root: str, run_id: str) -> list[str]:
    """The transaction logs (one per process) of the W&B run ``run_id``, oldest first."""
    return sorted(glob.glob(os.path.join(root, "wandb-dir", "wandb", f"offline-run-*-{run_id}", "*.wandb")))


def test_offline_run_records_config_metrics_by_batch_and_checkpoint_artifacts(offline, tmp_path) -> None:
    tracker = WandBLogger(project="cairn-test", log_artifacts=True)
    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(32),  # four batches an epoch
        max_duration="1ep",
        device="cpu",
        seed=3,
        progress_bar=False,
        loggers=[tracker],
        save_folder=str(tmp_path / "ck"),
        save_filename="ba{batch}.pt",
        save_interval="2ba",
    )
    trainer.fit()
    trainer.close()
    (log_file,) = run_logs(offline, tracker.run_id)
    records = finished_log(log_file)
    config = {
        update.key: json.loads(update.value_json)
        for record in records
        if record.WhichOneof("record_type") in ("run", "config")
        for update in (record.run.config if record.HasField("run") else record.config).update
    }
    assert config["seed"] == 3 and config["max_duration"] == "1ep"
    assert [step for step, _ in history_steps(records, LOSS)] == [1, 2, 3, 4]
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert [a.name for a in artifacts] == [f"model-{tracker.run_id}"] * 2 and {a.type for a in artifacts} == {"model"}
    for artifact, name in zip(artifacts, ["ba2.pt", "ba4.pt"], strict=True):
        assert "latest" in artifact.aliases
        assert [entry.path for entry in artifact.manifest.contents] == [name]
        metadata = json.loads(artifact.metadata)
        assert metadata["cairn_content_hash"] == read_record(str(tmp_path / "ck" / name)).content_hash
        assert metadata["cairn_content_hash"].startswith("xxh3-128:")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_and_autoresume_continue_one_wandb_run_without_a_gap(tmp_path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
        **wandb_environment(str(tmp_path), WANDB_MODE="offline", WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.1"),
    }
    command = [sys.executable, SCRIPT, "--folder", str(tmp_path / "ck"), "--epochs", "3"]
    killed = subprocess.run([*command, "--kill-at", "6"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-3000:]
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    run_id = killed.stdout.split("KILLED ")[1].split()[0]
    assert f"DONE {run_id}" in finished.stdout  # the same W&B run, continued
    first, second = run_logs(str(tmp_path), run_id)
    before, after = history_steps(first, LOSS), history_steps(finished_log(second), LOSS)
    assert [step for step, _ in before] == list(range(1, 7))
    assert [step for step, _ in after] == list(range(7, 13))  # rising, no gap, no restart at 0
    resumed = next(r.run for r in transaction_log(second) if r.WhichOneof("record_type") == "run")
    assert resumed.run_id == run_id


@pytest.fixture(scope="module")
def stand_in():
    server = WandBStandIn()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def online(tmp_path, monkeypatch, stand_in, fresh_wandb) -> WandBStandIn:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = wandb_environment(str(tmp_path), WANDB_BASE_URL=stand_in.endpoint, WANDB_API_KEY=FAKE_KEY)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for record in (stand_in.served, stand_in.unknown, stand_in.refused, stand_in.keys):
        record.clear()  # each test sees what it caused: the server is shared by the module
    return stand_in


def a_checkpoint(folder) -> tuple[str, dict[str, torch.Tensor]]:
    """A cairn checkpoint of a short run, and that run's weights."""
    model = Classifier(TinyNet())
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(16),
        max_duration="2ba",
        device="cpu",
        seed=5,
        progress_bar=False,
        save_folder=str(folder),
        save_filename="ba{batch}.pt",
        save_interval="2ba",
    )
    trainer.fit()
    trainer.close()
    return str(folder / "ba2.pt"), {k: v.clone() for k, v in model.state_dict().items()}


def test_load_path_names_a_wandb_artifact_downloaded_and_verified(online, tmp_path) -> None:
    path, weights = a_checkpoint(tmp_path / "made")
    with open(path, "rb") as file:
        online.add_artifact("cairn-test", "model-abc", {"ba2.pt": file.read()}, ["latest"], {})
    online.add_artifact("cairn-test", "model-abc", {"ba2.pt": b"not this one"}, [], {})  # v1, no alias
    model = Classifier(TinyNet())
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(16),
        max_duration="2ba",
        device="cpu",
        progress_bar=False,
        load_path="model-abc:latest",
        load_object_store=WandBLogger(project="cairn-test"),
        load_weights_only=True,
    )
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name])
    trainer.close()
    assert online.served == ["ba2.pt"] and not online.unknown


def test_a_missing_artifact_is_a_clear_checkpoint_error_without_the_key(online) -> None:
    with pytest.raises(CheckpointNotFoundError) as raised:
        Trainer(
            model=Classifier(TinyNet()),
            train_dataloader=make_loader(16),
            max_duration="1ba",
            device="cpu",
            progress_bar=False,
            load_path="cairn-team/cairn-test/model-none:v3",
            load_object_store=WandBLogger(),
        )
    assert "cairn-team/cairn-test/model-none:v3" in str(raised.value)
    assert FAKE_KEY not in str(raised.value) and not online.unknown


def test_without_wandb_the_import_error_names_the_extra_when_the_logger_is_built(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"pip install 'cairn\[wandb\]'"):
        WandBLogger(project="p")


def test_online_checkpoints_upload_as_artifact_versions_and_load_back(online, tmp_path, caplog, capfd) -> None:
    """Online, each checkpoint is uploaded through the SDK (run.log_artifact + wait) as a version of one artifact,
    with cairn's content hash in its metadata, ``latest`` on the newest and ``best`` on the best; the best loads
    back through ``load_object_store``, bit for bit, verified by cairn."""
    tracker = WandBLogger(project="cairn-test", log_artifacts=True)
    trainer = build_trainer(
        tmp_path,
        max_duration="3ep",
        train_dataloader=make_loader(16),  # two batches an epoch
        save_interval="1ep",
        save_filename="ep{epoch}.pt",
        save_keep_best=1,
        save_best_metric=METRIC,
        callbacks=[ScriptedMetric(METRIC, [0.3, 0.9, 0.5])],
        loggers=[tracker],
    )
    trainer.fit()
    trainer.close()
    assert not online.unknown and not online.refused

    versions = online.artifacts[(online.entity, "cairn-test", f"model-{tracker.run_id}")]
    assert [v.state for v in versions] == ["COMMITTED"] * 3 and {v.run for v in versions} == {tracker.run_id}
    assert [sorted(v.aliases) for v in versions] == [["v0"], ["best", "v1"], ["latest", "v2"]]
    for version, epoch in zip(versions, (1, 2, 3), strict=True):
        assert list(version.files) == list(version.manifest["contents"]) == [f"ep{epoch}.pt"]
        assert version.metadata["batch"] == 2 * epoch
        on_disk = tmp_path / "uploaded.pt"
        on_disk.write_bytes(version.files[f"ep{epoch}.pt"])
        assert version.metadata["cairn_content_hash"] == read_record(str(on_disk)).content_hash
    run = online.runs[(online.entity, "cairn-test", tracker.run_id)]
    assert [row["_step"] for row in run.history if LOSS in row] == list(range(1, 7))

    best = tmp_path / "ckpt" / "ep2.pt"  # kept by save_keep_best=1
    assert versions[1].files["ep2.pt"] == best.read_bytes()
    loaded = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(16),
        max_duration="3ep",
        device="cpu",
        progress_bar=False,
        load_path=f"model-{tracker.run_id}:best",
        load_object_store=WandBLogger(project="cairn-test"),
    )
    assert int(loaded.state.timestamp.batch) == 4
    store, name = WandBLogger(project="cairn-test").checkpoint_source(f"model-{tracker.run_id}:best")
    store.download_object(name, str(tmp_path / "downloaded.pt"))
    assert (tmp_path / "downloaded.pt").read_bytes() == best.read_bytes()
    loaded.close()
    store.close()
    assert not online.unknown and online.keys == {FAKE_KEY}  # the SDK sent the key: it must show nowhere else
    printed = capfd.readouterr()
    assert FAKE_KEY not in _everything_written(tmp_path, online) + caplog.text + printed.out + printed.err


def _everything_written(root, stand_in: WandBStandIn) -> str:
    """Every file under ``root`` (W&B's run folder and logs included) and everything the stand-in received but the
    key's own header, as text: where a leaked key would show."""
    texts = [path.read_bytes().decode("utf-8", "replace") for path in root.rglob("*") if path.is_file()]
    texts += [data.decode("utf-8", "replace") for data in stand_in.uploads.values()]
    texts += [json.dumps(run.__dict__, default=str) for run in stand_in.runs.values()]
    return "\n".join(texts)
