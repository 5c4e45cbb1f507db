"""The store's ``best`` pointer, in real runs against moto's S3: with ``save_keep_best`` and a ``save_best_filename``,
rank 0 keeps ``<best name>.symlink`` beside the run's checkpoints in the store, naming the best checkpoint verified
there by the metric each recorded. It may name an older checkpoint than ``latest`` does, survives the store's prune
with what it names, is ranked across runs from the store, and autoresume never follows it. The metric follows a
script whose best comes early, so the checkpoint the pointer must name is known exactly."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from cairn import Trainer
from cairn.checkpoint.save.saver import CheckpointSaver
from cairn.checkpoint.save.store_names import store_checkpoints
from cairn.core.logger import transfers_among
from conftest import scripted_store_trainer
from store_servers.moto import bucket_objects

METRIC = "metrics/eval/Scripted"
#: logged at the end of epochs 1..6: the best (max) is epoch 2, the worst epoch 4; epochs 5, 6 beat neither
SCRIPT = [0.3, 0.9, 0.5, 0.2, 0.6, 0.4]
LATEST = "run/latest-rank0.pt.symlink"
BEST = "run/best-rank0.pt.symlink"


def _trainer(bucket: str, epochs: int, **kwargs: Any) -> Trainer:
    return scripted_store_trainer(bucket, epochs, METRIC, SCRIPT, **kwargs)


def _fit(bucket: str, epochs: int, **kwargs: Any) -> Trainer:
    trainer = _trainer(bucket, epochs, **kwargs)
    trainer.fit()
    trainer.close()
    return trainer


def _on_a_new_machine(tmp_path: Path, name: str) -> None:
    """Work from an empty folder: nothing local, so whatever is known of earlier checkpoints comes from the store."""
    folder = tmp_path / name
    folder.mkdir()
    os.chdir(folder)


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    return caplog


def _no_warning_about_the_store(caplog: pytest.LogCaptureFixture) -> None:
    said = [r.getMessage() for r in caplog.records if "best pointer" in r.getMessage() or "retention" in r.getMessage()]
    assert not said, said


def test_the_best_pointer_names_the_early_best_while_latest_moves_on(
    s3_env: str, s3_bucket: str, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 6, save_keep_best=1)
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [BEST, *(f"run/ep{e}.pt" for e in range(1, 7)), LATEST], "the store keeps all"
    assert objects[BEST] == b"run/ep2.pt"
    assert objects[LATEST] == b"run/ep6.pt"
    assert os.readlink("run/best-rank0.pt") in {"ep2.pt", os.path.abspath("run/ep2.pt")}, "the local link agrees"
    _no_warning_about_the_store(warnings)


def test_the_best_survives_the_store_prune_and_the_pointer_names_it(
    s3_env: str, s3_bucket: str, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 6, save_keep_best=1, save_remote_num_checkpoints_to_keep=1)
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [BEST, "run/ep2.pt", "run/ep6.pt", LATEST]
    assert objects[BEST] == b"run/ep2.pt"
    assert objects[LATEST] == b"run/ep6.pt"
    _no_warning_about_the_store(warnings)


def test_without_keep_best_there_is_no_best_pointer(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 3, save_remote_num_checkpoints_to_keep=1)
    assert sorted(bucket_objects(s3_env, s3_bucket)) == ["run/ep3.pt", LATEST]


def test_with_best_filename_none_there_is_no_best_pointer(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 3, save_keep_best=1, save_best_filename=None)
    assert BEST not in bucket_objects(s3_env, s3_bucket)


def test_a_restart_keeps_the_earlier_runs_best_from_the_store_and_resumes_from_latest(
    s3_env: str, s3_bucket: str, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    """Without store retention the store is not ranked whole: the pointer's own target (epoch 2, 0.9, known only
    from its object in the store) competes with the new run's uploads, none of which beats it."""
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 4, save_keep_best=1)
    assert bucket_objects(s3_env, s3_bucket)[BEST] == b"run/ep2.pt"

    _on_a_new_machine(tmp_path, "machine-b")
    trainer = _fit(s3_bucket, 6, autoresume=True, save_keep_best=1)
    assert trainer.state.resumed_from is not None and trainer.state.resumed_from.endswith("run/ep4.pt"), (
        "autoresume follows latest (epoch 4), never the best pointer (epoch 2)"
    )
    objects = bucket_objects(s3_env, s3_bucket)
    assert objects[LATEST] == b"run/ep6.pt"
    assert objects[BEST] == b"run/ep2.pt", "epoch 5 (0.6) does not beat the earlier run's best"
    assert not list(tmp_path.rglob("cairn-retention-*")), "the downloaded record leaves nothing behind"
    _no_warning_about_the_store(warnings)


def test_the_best_pointer_moves_back_to_an_older_checkpoint_ranked_from_the_store(
    s3_env: str, s3_bucket: str, tmp_path: Path, warnings: pytest.LogCaptureFixture
) -> None:
    """With store retention the store's checkpoints are ranked together: the restart ranks by the lowest value,
    and the best is then epoch 4 (0.2), an earlier run's checkpoint older than the one the pointer named."""
    _on_a_new_machine(tmp_path, "machine-a")
    _fit(s3_bucket, 4, save_keep_best=1, save_remote_num_checkpoints_to_keep=10)
    assert bucket_objects(s3_env, s3_bucket)[BEST] == b"run/ep2.pt"

    _on_a_new_machine(tmp_path, "machine-b")
    _fit(s3_bucket, 6, autoresume=True, save_keep_best=1, save_best_mode="min", save_remote_num_checkpoints_to_keep=1)
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [BEST, "run/ep4.pt", "run/ep6.pt", LATEST]
    assert objects[BEST] == b"run/ep4.pt"
    assert objects[LATEST] == b"run/ep6.pt"
    _no_warning_about_the_store(warnings)


def test_the_store_listing_never_takes_the_best_pointer_for_a_checkpoint(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _on_a_new_machine(tmp_path, "machine-a")
    trainer = _fit(s3_bucket, 2, save_keep_best=1)
    saver = next(c for c in trainer.state.callbacks if isinstance(c, CheckpointSaver))
    assert saver.remote_best_pointer(trainer.state) == "run/best-rank0.pt.symlink"  # beside the remote names
    transfers = transfers_among(trainer.logger.destinations)[0]
    assert transfers.remote_name(saver.remote_best_pointer(trainer.state)) == BEST
    assert BEST in bucket_objects(s3_env, s3_bucket)
    listed = store_checkpoints(transfers, saver.remote_template(), trainer.state)
    assert sorted(listed) == ["run/ep1.pt", "run/ep2.pt"]


def test_a_best_pointer_that_could_take_a_checkpoints_name_is_refused() -> None:
    with pytest.raises(ValueError, match="best pointer"):
        CheckpointSaver(
            filename="ep{epoch}.pt",
            remote_file_name="run/{epoch}.symlink",
            keep_best=1,
            best_metric=METRIC,
            best_filename="7",
        )
    with pytest.raises(ValueError, match="the latest pointer"):
        CheckpointSaver(
            keep_best=1, best_metric=METRIC, latest_remote_file_name="{run_name}/checkpoints/best-rank{rank}.pt.symlink"
        )
