"""Retention on the local disk, in real runs: the K best by a logged metric, every Nth epoch, the N most recent, and
the ``latest``/``best`` links, rebuilt from the files after a restart. The eval metric follows a script (a callback
logs it through the run's Logger at each epoch's end, before the epoch's checkpoint), so the expected files are
known exactly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Trainer
from cairn.callbacks import CheckpointSaver
from cairn.core.logger import Logger
from cairn.core.state import State
from cairn.loggers import InMemoryLogger
from cairn.models import Classifier
from conftest import ScriptedMetric, TinyNet, make_loader
from conftest import build_trainer as build
from conftest import refused_at_construction as refused

METRIC = "metrics/eval/Scripted"
#: the metric logged at the end of epochs 1..12: best are epoch 8 (0.95), then 4 (0.9), then 12 (0.85)
SCRIPT = [0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.4, 0.95, 0.6, 0.7, 0.3, 0.85]


def _run(tmp_path: Path, epochs: int, **kwargs: Any) -> Trainer:
    trainer = build(
        tmp_path,
        max_duration=f"{epochs}ep",
        train_dataloader=make_loader(16),  # two batches an epoch
        callbacks=[ScriptedMetric(METRIC, SCRIPT)],
        save_best_metric=METRIC,
        **kwargs,
    )
    trainer.fit()
    trainer.close()
    return trainer


def _files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "ckpt"
    return sorted((p.name for p in folder.iterdir() if not p.is_symlink()), key=lambda n: int(n[2:].split("-")[0]))


def _link(tmp_path: Path, name: str) -> str | None:
    link = tmp_path / "ckpt" / name
    return os.readlink(link) if link.is_symlink() else None


def _name(epoch: int) -> str:
    return f"ep{epoch}-ba{2 * epoch}-rank0.pt"


def test_twelve_epochs_keep_the_two_best_every_third_and_the_newest(tmp_path: Path):
    _run(tmp_path, 12, save_keep_best=2, save_num_checkpoints_to_keep=1, save_keep_every="3ep")
    assert _files(tmp_path) == [_name(e) for e in (3, 4, 6, 8, 9, 12)]
    assert _link(tmp_path, "best-rank0.pt") == _name(8)  # the true best: 0.95
    assert _link(tmp_path, "latest-rank0.pt") == _name(12)


def test_each_checkpoint_records_the_value_logged_before_it(tmp_path: Path):
    _run(tmp_path, 3, save_keep_best=1)
    for epoch in (1, 2, 3):
        metadata = torch.load(tmp_path / "ckpt" / _name(epoch), weights_only=True)["state"]["metadata"]
        assert metadata["metrics"] == {METRIC: pytest.approx(SCRIPT[epoch - 1])}
        assert metadata["progress"]["epoch"] == epoch
        assert metadata["progress"]["batch_in_epoch"] == 0


def test_a_restart_with_another_keep_best_ranks_from_the_files(tmp_path: Path):
    _run(tmp_path, 6, save_keep_best=3, save_num_checkpoints_to_keep=1)
    assert _files(tmp_path) == [_name(e) for e in (2, 4, 6)]  # 0.5, 0.9 and 0.8: the three best so far
    assert _link(tmp_path, "best-rank0.pt") == _name(4)
    # A new process: nothing is remembered but what the files record. Epoch 4's 0.9 is known only from its file.
    _run(tmp_path, 12, save_keep_best=2, save_num_checkpoints_to_keep=1, autoresume=True)
    assert _files(tmp_path) == [_name(e) for e in (4, 8, 12)]
    assert _link(tmp_path, "best-rank0.pt") == _name(8)


def test_a_restart_that_trains_nothing_still_applies_its_own_rules(tmp_path: Path):
    _run(tmp_path, 6, save_keep_best=3, save_num_checkpoints_to_keep=1)
    assert _files(tmp_path) == [_name(e) for e in (2, 4, 6)]
    # the run's end was reached already: nothing is trained or saved, yet keep_best=1 now lets epoch 2 go
    _run(tmp_path, 6, save_keep_best=1, save_num_checkpoints_to_keep=1, autoresume=True)
    assert _files(tmp_path) == [_name(4), _name(6)]
    assert _link(tmp_path, "best-rank0.pt") == _name(4)
    assert _link(tmp_path, "latest-rank0.pt") == _name(6)


def test_the_forced_final_save_never_evicts_the_best(tmp_path: Path):
    # saved at epochs 2 and 4 by the interval, and at 5 because the run ends there; keep=1 would have kept only 5
    _run(tmp_path, 5, save_keep_best=1, save_num_checkpoints_to_keep=1, save_interval="2ep")
    assert _files(tmp_path) == [_name(4), _name(5)]  # 0.9 at epoch 4 is the best; 5 is the newest
    assert _link(tmp_path, "best-rank0.pt") == _name(4)


def test_a_checkpoint_saved_before_the_metric_exists_ranks_last(tmp_path: Path):
    class LateMetric(ScriptedMetric):
        def epoch_end(self, state: State, logger: Logger) -> None:
            if state.timestamp.epoch >= 3:
                super().epoch_end(state, logger)

    trainer = build(
        tmp_path,
        max_duration="4ep",
        train_dataloader=make_loader(16),
        callbacks=[LateMetric(METRIC, SCRIPT)],
        save_best_metric=METRIC,
        save_keep_best=2,
        save_num_checkpoints_to_keep=1,
    )
    trainer.fit()
    trainer.close()
    assert _files(tmp_path) == [_name(3), _name(4)]  # epochs 1 and 2 recorded nothing, so they were not best
    assert _link(tmp_path, "best-rank0.pt") == _name(4)


def test_no_best_link_when_its_name_is_none_and_async_saves_record_too(tmp_path: Path):
    _run(tmp_path, 4, save_keep_best=1, save_num_checkpoints_to_keep=1, save_best_filename=None, save_async=True)
    assert _files(tmp_path) == [_name(4)]  # the best (0.9 at epoch 4) is also the newest
    assert not (tmp_path / "ckpt" / "best-rank0.pt").exists()
    metadata = torch.load(tmp_path / "ckpt" / _name(4), weights_only=True)["state"]["metadata"]
    assert metadata["metrics"] == {METRIC: pytest.approx(0.9)}


def test_a_real_eval_metric_is_recorded_under_its_logged_name(tmp_path: Path):
    memory = InMemoryLogger()
    trainer = build(
        tmp_path,
        max_duration="2ep",
        eval_dataloader=make_loader(16),
        loggers=[memory],
        save_keep_best=1,
        save_best_metric="metrics/eval/MulticlassAccuracy",
        save_num_checkpoints_to_keep=1,
    )
    trainer.fit()
    trainer.close()
    assert "metrics/eval/MulticlassAccuracy" in memory.latest, sorted(memory.latest)
    recorded = {
        name: torch.load(tmp_path / "ckpt" / name, weights_only=True)["state"]["metadata"]["metrics"]
        for name in _files(tmp_path)
    }
    best = os.readlink(tmp_path / "ckpt" / "best-rank0.pt")
    assert best in recorded
    values = [value["metrics/eval/MulticlassAccuracy"] for value in recorded.values()]
    assert recorded[best]["metrics/eval/MulticlassAccuracy"] == max(values)


def test_a_weights_only_run_keeps_its_boundaries(tmp_path: Path):
    trainer = build(
        tmp_path,
        max_duration="4ep",
        train_dataloader=make_loader(16),
        save_weights_only=True,
        save_keep_every="2ep",
        save_num_checkpoints_to_keep=1,
    )
    trainer.fit()
    trainer.close()
    assert _files(tmp_path) == [_name(2), _name(4)]


# -- arguments refused at construction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "value", "error", "words", "extra"),
    [
        ("save_keep_best", 2, ValueError, "save_best_metric is None", {}),
        ("save_keep_best", "2", ValueError, "use an int", {"save_best_metric": METRIC}),
        ("save_keep_best", True, ValueError, "use an int", {"save_best_metric": METRIC}),
        ("save_keep_best", -1, ValueError, "use an int", {"save_best_metric": METRIC}),
        ("save_best_mode", "maximum", ValueError, "'max'", {}),
        ("save_best_metric", "", ValueError, "logged metric", {}),
        ("save_keep_every", "10 epochs", ValueError, "cannot read", {}),
        ("save_keep_every", "30m", ValueError, "epochs, batches", {}),
        ("save_keep_every", "0ep", ValueError, "1 or more", {}),
        ("save_best_filename", "../best.pt", ValueError, "outside the save folder", {}),
        ("save_best_filename", "latest-rank{rank}.pt", ValueError, "best link would replace", {"save_keep_best": 1}),
        ("save_best_filename", "ep{epoch}.pt", ValueError, "best link would replace", {"save_keep_best": 1}),
        ("save_remote_num_checkpoints_to_keep", -2, ValueError, "-1", {}),
        ("save_remote_num_checkpoints_to_keep", 1.0, ValueError, "use an int", {}),
    ],
)
def test_retention_arguments_that_cannot_work_are_refused(
    tmp_path: Path, argument: str, value: Any, error: type[Exception], words: str, extra: dict[str, Any]
):
    if extra.get("save_keep_best"):
        extra = {"save_best_metric": METRIC, **extra}
    if argument == "save_best_filename" and value == "ep{epoch}.pt":
        extra = {**extra, "save_filename": "ep{epoch}.pt"}
    message = refused(tmp_path, error, argument, value, **extra)
    assert words in message, message


def test_the_saver_names_its_own_arguments():
    with pytest.raises(ValueError, match=r"^keep_best=1 ranks checkpoints by a metric, and best_metric is None"):
        CheckpointSaver(keep_best=1)
    saver = CheckpointSaver(keep_best=2, best_metric=METRIC, best_mode="min", keep_every="5ba")
    assert saver.retention.best == 2 and saver.retention.mode == "min" and saver.remote_retention is None
    assert CheckpointSaver(remote_num_checkpoints_to_keep=3).remote_retention.recent == 3


def test_a_best_filename_clashing_only_with_keep_best_zero_is_accepted(tmp_path: Path):
    # keep_best=0 makes no best link: its default name must not refuse a saver that worked before
    CheckpointSaver(filename="{run_name}-rank{rank}.pt", keep_best=0)
    Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(),
        max_duration="1ba",
        progress_bar=False,
        save_folder=str(tmp_path / "ckpt"),
        save_filename="{run_name}-rank{rank}.pt",
    ).close()


def test_keep_zero_deletes_uploaded_copies_but_the_best(s3_env: str, s3_bucket: str):
    from store_servers.moto import bucket_objects

    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(16),
        max_duration="3ep",
        progress_bar=False,
        callbacks=[ScriptedMetric(METRIC, SCRIPT)],
        save_folder=f"s3://{s3_bucket}/checkpoints",
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,
        save_keep_best=1,
        save_best_metric=METRIC,
    )
    trainer.fit()
    trainer.close()
    local = Path("checkpoints")
    assert sorted(p.name for p in local.iterdir()) == ["best-rank0.pt", "ep2.pt"]  # 0.5 at epoch 2 is the best
    assert os.readlink(local / "best-rank0.pt") == "ep2.pt"  # the latest link went with epoch 3's copy
    assert {"checkpoints/ep1.pt", "checkpoints/ep2.pt", "checkpoints/ep3.pt"} <= set(bucket_objects(s3_env, s3_bucket))


# -- cairn ckpt ls ---------------------------------------------------------------------------------------------------


def test_ls_shows_each_recorded_value_and_why_the_rules_keep_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    import json

    from cairn.cli.main import main

    _run(tmp_path, 12, save_keep_best=3, save_num_checkpoints_to_keep=2, save_keep_every="4ep")
    folder = str(tmp_path / "ckpt")
    assert main(["ckpt", "ls", "--json", folder]) == 0
    plain = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["name"], c["metrics"], c["kept_by"]) for c in plain] == [
        (_name(12), {METRIC: pytest.approx(0.85)}, None),
        (_name(11), {METRIC: pytest.approx(0.3)}, None),
        (_name(8), {METRIC: pytest.approx(0.95)}, None),
        (_name(4), {METRIC: pytest.approx(0.9)}, None),
    ]
    assert main(["ckpt", "ls", "--json", "--keep", "2", "--keep-best", "3", "--keep-every", "4ep", folder]) == 0
    kept = {c["name"]: c["kept_by"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert kept == {  # what the run's own saver kept, and why
        _name(12): ["latest", "best 3/3", "every 4ep", "recent 1/2"],
        _name(11): ["recent 2/2"],
        _name(8): ["best", "best 1/3", "every 4ep"],
        _name(4): ["best 2/3", "every 4ep"],
    }
    assert main(["ckpt", "ls", "--keep", "1", "--keep-best", "1", folder]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["CREATED", "SIZE", "EPOCH", "BATCH", "SCRIPTED", "KEPT", "BY", "KIND", "NAME"]
    assert table[1].startswith("*") and "latest, recent 1/1" in table[1] and "0.85" in table[1]
    assert table[2].split()[-3:] == ["-", "full", _name(11)]  # a save under these rules would delete it
    assert not table[3].startswith("*") and "best, best 1/1" in table[3]  # the best link is not starred


def test_ls_refuses_a_keep_every_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from cairn.cli.main import main

    assert main(["ckpt", "ls", "--keep-every", "often", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cairn ckpt ls: ") and "--keep-every='often'" in err and err.count("\n") == 1


# -- reading what the files record ---------------------------------------------------------------------------------


def test_a_sharded_folder_is_read_from_its_cairn_pt_and_a_damaged_file_records_nothing(tmp_path: Path):
    import re

    from cairn.checkpoint.save.retention import RetentionRules, candidates_in, prune

    folder = tmp_path / "ckpt"
    (folder / "ep1").mkdir(parents=True)
    metadata = {"progress": {"epoch": 1, "batch_in_epoch": 0}, "metrics": {METRIC: 0.7}}
    torch.save({"state": {"metadata": metadata}}, folder / "ep1" / "cairn.pt")
    (folder / "ep1" / "__0_0.distcp").write_bytes(b"shard")
    (folder / "ep2").write_bytes(b"not a checkpoint")  # damaged: nothing known but its name
    torch.save({"state": {"metadata": {"metrics": {METRIC: 0.1}}, "timestamp": {"epoch": 3}}}, folder / "ep3")
    found = candidates_in(str(folder), re.compile(r"ep(?P<epoch>\d+)\Z"), metric=METRIC)
    assert [(Path(c.name).name, c.value, c.progress.get("epoch")) for c in found] == [
        ("ep1", pytest.approx(0.7), 1),
        ("ep2", None, 2),  # from its name
        ("ep3", pytest.approx(0.1), 3),  # an older file: from its timestamp
    ]
    removed = prune(found, RetentionRules(recent=1, best=0), protect=())
    assert sorted(Path(p).name for p in removed) == ["ep1", "ep2"]
    assert sorted(p.name for p in folder.iterdir()) == ["ep3"]  # the sharded folder went whole
