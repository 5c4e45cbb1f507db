"""Autoresume from an object store takes the newest object of the run's remote names, as a local folder does.

Runs against moto's S3 server (tests/store_servers/moto.py). Each test's first run saves ep1, ep2, ep3 to
``s3://<bucket>/run`` on one "machine" (working directory); the resumed run starts on another, with nothing local.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import boto3
import pytest

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.loggers import RemoteUploaderDownloader
from conftest import s3_run_trainer
from store_servers.moto import bucket_objects, new_s3_bucket

BATCHES_PER_EPOCH = 4  # 32 samples, batches of 8


def _trainer(bucket: str, max_duration: str, **kwargs: Any) -> Trainer:
    return s3_run_trainer(max_duration, save_folder=f"s3://{bucket}/run", save_filename="ep{epoch}.pt", **kwargs)


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _on_new_machine(tmp_path: Path, name: str) -> None:
    """Another machine (or a preempted node's replacement): an empty working directory, nothing local."""
    folder = tmp_path / name
    folder.mkdir()
    os.chdir(folder)


def _three_epochs_in_the_store(tmp_path: Path, bucket: str, **kwargs: Any) -> None:
    _on_new_machine(tmp_path, "machine-a")
    _trainer(bucket, "3ep", **kwargs).fit()
    _on_new_machine(tmp_path, "machine-b")


def _epoch_of(data: bytes, tmp_path: Path) -> int:
    path = tmp_path / "read.pt"
    path.write_bytes(data)
    return read_checkpoint(str(path))["state"]["timestamp"]["epoch"]


def _flip_a_weight_byte(data: bytes, tmp_path: Path) -> bytes:
    path = tmp_path / "flip.pt"
    path.write_bytes(data)
    weight = read_checkpoint(str(path))["state"]["model"]["layers.0.weight"]
    at = data.find(weight.numpy().tobytes())
    assert at >= 0
    damaged = bytearray(data)
    damaged[at + 5] ^= 0x40
    return bytes(damaged)


@pytest.mark.parametrize("pointer", ["moved back to ep1", "deleted"])
def test_autoresume_takes_the_newest_object_whatever_the_pointer_says(
    s3_env: str, s3_bucket: str, tmp_path: Path, pointer: str
) -> None:
    """A run killed after uploading ep3 but before the pointer moved (its disk gone with its node)."""
    _three_epochs_in_the_store(tmp_path, s3_bucket)
    client = _client(s3_env)
    if pointer == "deleted":
        client.delete_object(Bucket=s3_bucket, Key="run/latest-rank0.pt.symlink")
    else:
        client.put_object(Bucket=s3_bucket, Key="run/latest-rank0.pt.symlink", Body=b"run/ep1.pt")
    before = bucket_objects(s3_env, s3_bucket)

    resumed = _trainer(s3_bucket, "4ep", autoresume=True)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep3.pt"
    assert resumed.state.timestamp.batch == 3 * BATCHES_PER_EPOCH
    resumed.fit()  # no ObjectExistsError: epochs 1-3 are not trained, nor uploaded, again

    after = bucket_objects(s3_env, s3_bucket)
    assert {key: after[key] for key in ("run/ep1.pt", "run/ep2.pt", "run/ep3.pt")} == {
        key: before[key] for key in ("run/ep1.pt", "run/ep2.pt", "run/ep3.pt")
    }, "nothing replaced"
    assert _epoch_of(after["run/ep4.pt"], tmp_path) == 4
    assert after["run/latest-rank0.pt.symlink"] == b"run/ep4.pt"


def test_autoresume_without_a_pointer_resumes_from_the_newest_object(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _three_epochs_in_the_store(tmp_path, s3_bucket, save_latest_filename=None)
    assert not any(key.endswith(".symlink") for key in bucket_objects(s3_env, s3_bucket))

    resumed = _trainer(s3_bucket, "4ep", autoresume=True, save_latest_filename=None)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep3.pt"
    resumed.fit()
    assert _epoch_of(bucket_objects(s3_env, s3_bucket)["run/ep4.pt"], tmp_path) == 4


@pytest.mark.parametrize("damage", ["one flipped byte", "truncated"])
def test_a_damaged_newest_object_is_kept_aside_and_the_run_saves_past_it(
    s3_env: str, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    _three_epochs_in_the_store(tmp_path, s3_bucket)
    good = bucket_objects(s3_env, s3_bucket)
    if damage == "truncated":
        damaged = good["run/ep3.pt"][: len(good["run/ep3.pt"]) // 2]
    else:
        damaged = _flip_a_weight_byte(good["run/ep3.pt"], tmp_path)
    _client(s3_env).put_object(Bucket=s3_bucket, Key="run/ep3.pt", Body=damaged)

    with caplog.at_level(logging.WARNING, logger="cairn"):
        resumed = _trainer(s3_bucket, "4ep", autoresume=True)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep2.pt", "fell back to the one before"
    assert any("autoresume skips" in r.getMessage() and "run/ep3.pt" in r.getMessage() for r in caplog.records)
    kept = {
        key: data for key, data in bucket_objects(s3_env, s3_bucket).items() if key.startswith("run/ep3.pt.damaged-")
    }
    assert list(kept.values()) == [damaged], "the damaged bytes are kept, once, under a name that says so"
    assert any("kept a copy of the damaged checkpoint" in r.getMessage() for r in caplog.records)

    resumed.fit()  # epoch 3 again: its save replaces the damaged object instead of failing with ObjectExistsError
    after = bucket_objects(s3_env, s3_bucket)
    assert _epoch_of(after["run/ep3.pt"], tmp_path) == 3
    assert _epoch_of(after["run/ep4.pt"], tmp_path) == 4
    assert {key: after[key] for key in kept} == kept, "the copy stays"
    assert (after["run/ep1.pt"], after["run/ep2.pt"]) == (good["run/ep1.pt"], good["run/ep2.pt"])
    assert after["run/latest-rank0.pt.symlink"] == b"run/ep4.pt"

    _on_new_machine(tmp_path, "machine-c")
    again = _trainer(s3_bucket, "4ep", autoresume=True)
    assert again.state.resumed_from == f"s3://{s3_bucket}/run/ep4.pt"


def test_a_run_whose_only_object_is_damaged_starts_fresh_and_saves_past_it(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _on_new_machine(tmp_path, "machine-a")
    _trainer(s3_bucket, "1ep").fit()
    _client(s3_env).put_object(Bucket=s3_bucket, Key="run/ep1.pt", Body=b"not a checkpoint")
    _on_new_machine(tmp_path, "machine-b")

    fresh = _trainer(s3_bucket, "1ep", autoresume=True)
    assert fresh.state.resumed_from is None
    fresh.fit()  # neither the fit-start check nor the upload refuses: the damaged object was kept aside
    after = bucket_objects(s3_env, s3_bucket)
    assert _epoch_of(after["run/ep1.pt"], tmp_path) == 1
    assert [data for key, data in after.items() if ".damaged-" in key] == [b"not a checkpoint"]


def test_autoresume_never_takes_an_object_of_another_pattern_or_a_hostile_name(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _three_epochs_in_the_store(tmp_path, s3_bucket)
    client = _client(s3_env)
    client.delete_object(Bucket=s3_bucket, Key="run/latest-rank0.pt.symlink")  # the listing alone decides
    for key in ("run/ep9.pt.bak", "run/ep9.pt/../ep9.pt", "run/ep 9.pt", "run/ep-9.pt", "run/other/ep9.pt"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=b"not this run's checkpoint")

    resumed = _trainer(s3_bucket, "3ep", autoresume=True)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep3.pt"
    assert not list(Path(".").rglob("*")), "nothing written locally while looking"


def test_the_fit_start_refusal_suggests_autoresume_only_where_it_would_look(s3_env: str, s3_bucket: str) -> None:
    """Autoresume reads the first uploader's store; objects in another uploader's store are not its to resume."""
    _client(s3_env).put_object(Bucket=s3_bucket, Key="run/ep1.pt", Body=b"an earlier run's checkpoint")
    first = new_s3_bucket(s3_env)
    trainer = _trainer(
        s3_bucket, "1ep", autoresume=True, loggers=[RemoteUploaderDownloader(f"s3://{first}", use_procs=False)]
    )
    assert trainer.state.resumed_from is None
    with pytest.raises(FileExistsError, match=r"run/ep1\.pt.*autoresume reads only the first uploader") as excinfo:
        trainer.fit()
    assert "use autoresume=True" not in str(excinfo.value)


def test_a_node_back_with_an_old_local_folder_resumes_from_the_store_when_it_is_ahead(
    s3_env: str, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The local folder kept only ep1 (ep2 and ep3 were written elsewhere, or lost): resuming from ep1 would train
    epochs 2-3 again and, with save_overwrite=False, have its upload of ep2 refused at every restart."""
    _three_epochs_in_the_store(tmp_path, s3_bucket)
    os.chdir(tmp_path / "machine-a")
    for stale in ("run/ep2.pt", "run/ep3.pt", "run/latest-rank0.pt"):
        os.remove(stale)
    before = bucket_objects(s3_env, s3_bucket)

    with caplog.at_level(logging.WARNING, logger="cairn"):
        resumed = _trainer(s3_bucket, "4ep", autoresume=True)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep3.pt"
    assert "further along" in caplog.text
    resumed.fit()

    after = bucket_objects(s3_env, s3_bucket)
    assert {key: after[key] for key in before if key.endswith(".pt")} == {
        key: value for key, value in before.items() if key.endswith(".pt")
    }, "nothing replaced"
    assert _epoch_of(after["run/ep4.pt"], tmp_path) == 4


def test_a_local_folder_level_with_the_store_resumes_locally_without_downloading(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _three_epochs_in_the_store(tmp_path, s3_bucket)
    os.chdir(tmp_path / "machine-a")
    resumed = _trainer(s3_bucket, "4ep", autoresume=True)
    assert resumed.state.resumed_from == os.path.join("run", "ep3.pt")
