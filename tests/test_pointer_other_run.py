"""A store's ``latest`` pointer made to name another run's checkpoint is never followed by autoresume (issue 16).

Two runs share a bucket. This run (``mine``) saved two epochs; the other run's checkpoints are further along
(epoch 9). Whoever can write the bucket rewrites this run's pointer to name one of the other run's objects, in
every shape a name can take: the other run's prefix with this run's file-name shape, a ``..`` climb out of this
run's prefix, an absolute name or another bucket's URI, a sharded folder's prefix, and, through a
``RemoteUploaderDownloader`` with a ``file_path_format_string``, a name outside that string's literal text. A
fresh machine (an empty local folder) then resumes: from this run's own newest checkpoint, with a warning naming
the pointer, or, for a pointer that holds no object name at all (``..``, an absolute name), with an error saying
the pointer is damaged. Never from the other run's bytes.

Runs against moto's S3 server (tests/store_servers/moto.py); the other run's objects are copies of this run's
checkpoint under its names (what is in them does not matter: the question is whether autoresume goes there).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import boto3
import pytest

from cairn.errors import CheckpointCorruptError
from cairn.loggers import RemoteUploaderDownloader
from conftest import s3_run_trainer

_OWN = "mine/checkpoints/ep2-ba8-rank0.pt"  # this run's newest checkpoint, as the default names put it in the store
_POINTER = "mine/checkpoints/latest-rank0.pt.symlink"


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _trainer(bucket: str, max_duration: str, *, format_string: str = "{remote_file_name}", **kwargs: Any) -> Any:
    """This run: a local save folder, uploaded to ``bucket`` under the default remote names."""
    uploader = RemoteUploaderDownloader(f"s3://{bucket}", use_procs=False, file_path_format_string=format_string)
    return s3_run_trainer(max_duration, run_name="mine", save_folder="checkpoints", loggers=[uploader], **kwargs)


def _two_epochs_in_the_store(tmp_path: Path, bucket: str, format_string: str = "{remote_file_name}") -> None:
    os.chdir(tmp_path / "first-machine")
    trainer = _trainer(bucket, "2ep", format_string=format_string)
    trainer.fit()
    trainer.close()


def _copy(client: Any, bucket: str, source: str, keys: list[str], *, to_bucket: str | None = None) -> None:
    for key in keys:
        client.copy_object(Bucket=to_bucket or bucket, Key=key, CopySource={"Bucket": bucket, "Key": source})


def _resume_on_a_fresh_machine(tmp_path: Path, bucket: str, format_string: str = "{remote_file_name}") -> Any:
    os.chdir(tmp_path / "fresh-machine")
    return _trainer(bucket, "3ep", format_string=format_string, autoresume=True)


@pytest.fixture
def machines(tmp_path: Path, s3_env: str) -> Path:
    (tmp_path / "first-machine").mkdir()
    (tmp_path / "fresh-machine").mkdir()
    return tmp_path


# A target autoresume must ignore (with a warning), or refuse (CheckpointCorruptError: the pointer holds no object
# name); never follow.
IGNORED, REFUSED = "ignored", "refused"

_OTHER_FILE = "otherrun/checkpoints/ep9-ba99-rank0.pt"


@pytest.mark.parametrize(
    ("target", "outcome"),
    [
        (_OTHER_FILE, IGNORED),  # another run's prefix, this run's file-name shape
        ("mine/checkpoints/../../otherrun/checkpoints/ep9-ba99-rank0.pt", REFUSED),  # a climb out of this prefix
        ("../otherrun/checkpoints/ep9-ba99-rank0.pt", REFUSED),
        ("/otherrun/checkpoints/ep9-ba99-rank0.pt", REFUSED),  # an absolute name
        ("s3://other-bucket/mine/checkpoints/ep9-ba99-rank0.pt", IGNORED),  # another bucket: never a store name here
        ("otherrun/ep9-ba99-rank0.pt", IGNORED),  # another run's sharded folder (a prefix holding cairn.pt)
        ("mine/checkpoints/ep9-ba99-rank0.pt/cairn.pt", IGNORED),  # a file inside a folder of this run's shape
        ("mine/checkpoints/sub/ep9-ba99-rank0.pt", IGNORED),  # deeper than this run's names go
        ("mine/checkpoints/ep9-ba99-rank1.pt", IGNORED),  # another rank's file: never rank 0's latest
    ],
)
def test_autoresume_never_follows_a_pointer_to_another_runs_objects(
    machines: Path, s3_env: str, s3_bucket: str, caplog: pytest.LogCaptureFixture, target: str, outcome: str
) -> None:
    _two_epochs_in_the_store(machines, s3_bucket)
    client = _client(s3_env)
    assert client.get_object(Bucket=s3_bucket, Key=_POINTER)["Body"].read() == _OWN.encode()
    client.create_bucket(Bucket="other-bucket")
    _copy(client, s3_bucket, _OWN, ["mine/checkpoints/ep9-ba99-rank0.pt"], to_bucket="other-bucket")
    _copy(
        client,
        s3_bucket,
        _OWN,
        [
            _OTHER_FILE,
            "otherrun/ep9-ba99-rank0.pt/cairn.pt",
            "mine/checkpoints/ep9-ba99-rank0.pt/cairn.pt",
            "mine/checkpoints/sub/ep9-ba99-rank0.pt",
            "mine/checkpoints/ep9-ba99-rank1.pt",
        ],
    )
    if target.startswith("s3://"):  # the same bytes also under the URI as a key of this bucket
        _copy(client, s3_bucket, _OWN, [target])
    client.put_object(Bucket=s3_bucket, Key=_POINTER, Body=target.encode())

    with caplog.at_level(logging.WARNING, logger="cairn"):
        if outcome == REFUSED:
            with pytest.raises(CheckpointCorruptError, match="does not hold an object name"):
                _resume_on_a_fresh_machine(machines, s3_bucket)
            return
        resumed = _resume_on_a_fresh_machine(machines, s3_bucket)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/{_OWN}"
    assert any("ignores the latest pointer" in r.getMessage() for r in caplog.records), caplog.text
    resumed.close()


@pytest.mark.parametrize(
    "target",
    [
        "other-prefix/mine/checkpoints/ep9-ba99-rank0.pt",  # another uploader's format string
        "mine/checkpoints/ep9-ba99-rank0.pt",  # the bare name, as an uploader without the format string writes it
        "team/otherrun/checkpoints/ep9-ba99-rank0.pt.bak",  # inside the format string, another run and suffix
        "team/otherrun/checkpoints/ep9-ba99-rank0.pt",  # inside the format string, another run's prefix
    ],
)
def test_a_format_string_uploaders_pointer_is_followed_only_inside_its_own_names(
    machines: Path, s3_env: str, s3_bucket: str, caplog: pytest.LogCaptureFixture, target: str
) -> None:
    """``file_path_format_string="team/{remote_file_name}"``: this run's objects are ``team/mine/checkpoints/...``
    and so is its pointer; a pointer naming anything else is ignored."""
    format_string = "team/{remote_file_name}"
    _two_epochs_in_the_store(machines, s3_bucket, format_string)
    client = _client(s3_env)
    own, pointer = f"team/{_OWN}", f"team/{_POINTER}"
    assert client.get_object(Bucket=s3_bucket, Key=pointer)["Body"].read() == own.encode()
    _copy(client, s3_bucket, own, [target])
    client.put_object(Bucket=s3_bucket, Key=pointer, Body=target.encode())

    with caplog.at_level(logging.WARNING, logger="cairn"):
        resumed = _resume_on_a_fresh_machine(machines, s3_bucket, format_string)
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/{own}"
    assert any("ignores the latest pointer" in r.getMessage() for r in caplog.records), caplog.text
    resumed.close()
