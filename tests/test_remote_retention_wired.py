"""Store-side retention applied by the saver, in real runs against moto's S3: ``save_remote_num_checkpoints_to_keep``
with ``save_keep_best`` deletes exactly what no rule and no pointer keeps, and after a restart on another machine
the earlier run's checkpoints are ranked from the metric they recorded (read back from the store), so the best one
survives. The metric follows a script, so the objects that must remain are known exactly."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from cairn.cli.main import main as cairn_main
from conftest import scripted_store_trainer
from store_servers.moto import bucket_objects

METRIC = "metrics/eval/Scripted"
#: logged at the end of epochs 1..8: the best of the first six is epoch 4 (0.9), then 6 (0.8); epoch 8 beats all
SCRIPT = [0.1, 0.5, 0.3, 0.9, 0.2, 0.8, 0.4, 0.95]
POINTER = "run/latest-rank0.pt.symlink"
BEST = "run/best-rank0.pt.symlink"


def _fit(bucket: str, epochs: int, **kwargs: Any) -> None:
    trainer = scripted_store_trainer(bucket, epochs, METRIC, SCRIPT, **kwargs)
    trainer.fit()
    trainer.close()


def _on_a_new_machine(tmp_path: Path, name: str) -> None:
    """Work from an empty folder: nothing local, so whatever is known of earlier checkpoints comes from the store."""
    folder = tmp_path / name
    folder.mkdir()
    os.chdir(folder)


def test_the_store_keeps_the_recent_and_the_best_and_a_restart_ranks_from_the_store(
    s3_env: str, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 6, save_keep_best=1, save_remote_num_checkpoints_to_keep=2)
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [BEST, "run/ep4.pt", "run/ep5.pt", "run/ep6.pt", POINTER]  # best 0.9, the 2 newest
    assert objects[POINTER] == b"run/ep6.pt"
    assert objects[BEST] == b"run/ep4.pt"
    assert sorted(p.name for p in Path("run").glob("ep*.pt")) == [f"ep{e}.pt" for e in range(1, 7)], "disk: all"

    _on_a_new_machine(tmp_path, "machine-b")  # epochs 4..6 are known only from the store
    _fit(s3_bucket, 8, autoresume=True, save_keep_best=2, save_remote_num_checkpoints_to_keep=1)
    objects = bucket_objects(s3_env, s3_bucket)
    # the two best are epoch 8 (0.95) and epoch 4 (0.9, recorded in the first run's object): epoch 6 (0.8) goes
    assert sorted(objects) == [BEST, "run/ep4.pt", "run/ep8.pt", POINTER]
    assert objects[POINTER] == b"run/ep8.pt"
    assert objects[BEST] == b"run/ep8.pt"
    assert not [r for r in caplog.records if "store retention" in r.getMessage()], "no prune was skipped"
    assert not list(tmp_path.rglob("cairn-retention-*")), "the downloaded records leave nothing behind"


def test_without_remote_retention_the_store_keeps_everything(
    s3_env: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _fit(s3_bucket, 3, save_keep_best=1, save_num_checkpoints_to_keep=1)
    assert sorted(bucket_objects(s3_env, s3_bucket)) == [BEST, "run/ep1.pt", "run/ep2.pt", "run/ep3.pt", POINTER]

    # a store's listing reads no recorded value: what only best could keep is "?", never a verdict ("-")
    assert cairn_main(["ckpt", "ls", f"s3://{s3_bucket}/run/", "--keep", "1", "--keep-best", "1", "--json"]) == 0
    kept = {c["name"]: c["kept_by"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert kept == {"ep3.pt": ["latest", "recent 1/1"], "ep2.pt": ["best"], "ep1.pt": ["?"]}


def test_a_restart_that_trains_nothing_applies_its_rules_in_the_store(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 6, save_keep_best=1, save_remote_num_checkpoints_to_keep=2)
    assert sorted(bucket_objects(s3_env, s3_bucket)) == [BEST, "run/ep4.pt", "run/ep5.pt", "run/ep6.pt", POINTER]

    _on_a_new_machine(tmp_path, "machine-b")  # the end is reached already: nothing is trained or uploaded
    _fit(s3_bucket, 6, autoresume=True, save_keep_best=1, save_remote_num_checkpoints_to_keep=1)
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [BEST, "run/ep4.pt", "run/ep6.pt", POINTER], "epoch 5 left the store's newest 1"
    assert (objects[POINTER], objects[BEST]) == (b"run/ep6.pt", b"run/ep4.pt")
