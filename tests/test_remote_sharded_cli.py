"""A sharded checkpoint folder in an object store is read as one checkpoint: ``cairn ckpt show / verify / diff /
convert`` accept its URI (the prefix holding ``cairn.pt`` and its shard files), against the real moto server.

The folder is uploaded object by object here, as a store holds it: ``<name>/cairn.pt``, ``<name>/.metadata`` and
``<name>/__0_0.distcp``. Downloads fetch ``cairn.pt`` first and then only the files it records, under their recorded
names, so a tampered ``cairn.pt`` cannot choose where a file lands and a missing shard is named.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.save.commit import write_checkpoint
from cairn.checkpoint.save.content import seal
from cairn.cli.main import main as cairn_main
from cairn.storage.s3 import S3ObjectStore
from conftest import upload_folder


def _ckpt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cairn_main(["ckpt", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_show_verify_and_diff_read_a_sharded_folder_in_a_store(
    sharded_folder: Path, s3_env: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    upload_folder(sharded_folder, store, "run/ep1")
    uri = f"s3://{s3_bucket}/run/ep1"

    code, out = _ckpt(capsys, "show", "--json", uri)
    assert code == 0, out
    shown = json.loads(out)
    assert shown["kind"] == "sharded"
    assert shown["timestamp"]["epoch"] == 1
    assert shown["hash"]["shard_files"] == 2  # .metadata and the one rank's shards, each digest checked
    assert shown["parameters"] > 0  # the model's sizes come from the downloaded shard index

    code, out = _ckpt(capsys, "verify", uri)
    assert code == 0, out

    code, out = _ckpt(capsys, "diff", str(sharded_folder), uri)
    assert code == 0, out  # the same weights, bit for bit


def test_convert_a_sharded_folder_in_a_store_to_one_file(
    sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    upload_folder(sharded_folder, store, "run/ep1")
    out = tmp_path / "whole.pt"

    code, said = _ckpt(capsys, "convert", "--to", "single-file", f"s3://{s3_bucket}/run/ep1", str(out))

    assert code == 0, said
    whole = read_checkpoint(str(out))["state"]["model"]
    original = read_checkpoint(str(tmp_path / "saved" / "ep1.pt"))["state"]["model"]
    assert whole.keys() == original.keys()
    assert all(torch.equal(whole[k], original[k]) for k in whole)


def test_a_missing_shard_is_named(
    sharded_folder: Path, s3_env: str, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    for file in ("cairn.pt", ".metadata"):
        store.upload_object(f"run/ep1/{file}", str(sharded_folder / file))

    code, out = _ckpt(capsys, "show", f"s3://{s3_bucket}/run/ep1")

    assert code != 0
    assert "missing its shard '__0_0.distcp'" in out
    assert "Traceback" not in out


def test_a_shard_name_that_is_a_path_is_refused_before_any_download(
    sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tampered ``cairn.pt`` (its hash recomputed, as an attacker would) records ``../escaped`` as a shard: the
    name is refused, and nothing is written outside the download folder."""
    rest = read_checkpoint(str(sharded_folder / "cairn.pt"))
    rest["state"]["metadata"]["shards"]["../escaped"] = "xxh3-128:0"
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    write_checkpoint(seal(rest), str(tampered / "cairn.pt"))
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    store.upload_object("run/ep1/cairn.pt", str(tampered / "cairn.pt"))
    store.upload_object("run/escaped", str(tampered / "cairn.pt"))

    code, out = _ckpt(capsys, "show", f"s3://{s3_bucket}/run/ep1")

    assert code != 0
    assert "not a plain file name" in out
    assert not any(Path(os.path.realpath("/tmp")).glob("escaped"))


def test_ls_lists_a_sharded_folder_in_a_store_as_one_checkpoint(
    sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    upload_folder(sharded_folder, store, "run/ep1-ba4")
    store.upload_object("run/ep0-ba2.pt", str(tmp_path / "saved" / "ep1.pt"))
    folder_bytes = sum(os.path.getsize(sharded_folder / file) for file in os.listdir(sharded_folder))

    code, out = _ckpt(capsys, "ls", "--json", f"s3://{s3_bucket}/run")
    assert code == 0, out
    listing = json.loads(out)
    by_name = {entry["name"]: entry for entry in listing["checkpoints"]}
    assert list(by_name) == ["ep1-ba4", "ep0-ba2.pt"]  # newest first
    assert (by_name["ep1-ba4"]["kind"], by_name["ep1-ba4"]["size_bytes"]) == ("sharded", folder_bytes)
    assert by_name["ep1-ba4"]["location"] == f"s3://{s3_bucket}/run/ep1-ba4"
    assert listing["notes"] == []  # the folder's files are its own, not "other objects"

    code, out = _ckpt(capsys, "ls", "--json", f"s3://{s3_bucket}/run/ep1-ba4")
    assert code == 0, out
    assert [(e["name"], e["kind"]) for e in json.loads(out)["checkpoints"]] == [("ep1-ba4", "sharded")]
