"""A sharded folder in an object store, loaded into a model: each rank fetches only the shard files its own load
plan reads, each checked against the digest ``cairn.pt`` recorded, against the real moto server.

Up front only ``cairn.pt`` and the shard index (``.metadata``) are downloaded and verified; the shard files come in
the storage reader's ``prepare_local_plan``, which DCP runs on every rank before its global plan step, so a shard
that fails its digest (or a byte entry that is not plain data) stops the load on every rank before any tensor of the
model changes. Every rank logs what it fetched: ``rank r fetched shard files [...] of folder <uri>; its load plan
reads nothing from [...]``.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.tools.convert import convert
from cairn.errors import CheckpointCorruptError, UnsafeCheckpointError
from cairn.models import Classifier
from cairn.storage.s3 import S3ObjectStore
from cairn.utils.checkpoint import load_checkpoint
from conftest import TinyNet, build_trainer, make_loader, params_of, upload_folder
from store_servers.moto import bucket_objects
from test_poison_paths import CreatesAFile, _plant_byte_entry

_FETCHED = re.compile(
    r"rank (\d+) fetched shard files (\[.*?\]) of folder (\S+); its load plan reads nothing from (\[.*\])"
)


def _fetches(lines: list[str]) -> list[tuple[int, list[str], str, list[str]]]:
    """Each ``fetched shard files`` line: the rank, what it fetched, the folder, what it left in the store."""
    found = []
    for line in lines:
        match = _FETCHED.search(line)
        if match:
            rank, fetched, folder, unread = match.groups()
            found.append((int(rank), ast.literal_eval(fetched), folder, ast.literal_eval(unread)))
    return found


def _fresh_model() -> Classifier:
    torch.manual_seed(1)
    return Classifier(TinyNet(), num_classes=3)


def _load(uri: str, model: Classifier) -> Trainer:
    return Trainer(  # other data than the ranks' runs: a mid-epoch position cannot carry over, the next epoch starts
        model=model,
        train_dataloader=make_loader(),
        max_duration="2ep",
        load_path=uri,
        load_at_epoch_boundary=True,
        progress_bar=False,
    )


def _refused_leaving_the_model_alone(uri: str, error: type[Exception]) -> str:
    """``Trainer(load_path=uri)`` raises ``error``; the model it was given is exactly as before; the message."""
    model = _fresh_model()
    before = params_of(model)
    with pytest.raises(error) as info:
        _load(uri, model)
    after = params_of(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed the weights"
    return str(info.value)


def test_one_process_fetches_the_index_first_and_then_the_shard_files_its_plan_reads(
    sharded_folder: Path, s3_env: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    upload_folder(sharded_folder, store, "run/ep1")
    uri = f"s3://{s3_bucket}/run/ep1"

    with caplog.at_level(logging.INFO, logger="cairn"):
        trainer = _load(uri, _fresh_model())

    assert _fetches([r.getMessage() for r in caplog.records]) == [(0, ["__0_0.distcp"], uri, [])]
    saved = read_checkpoint(str(sharded_folder / ".." / "saved" / "ep1.pt"))["state"]["model"]
    loaded = trainer.state.model.module.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved), "bit for bit"
    assert trainer.state.timestamp.epoch == 1


def test_a_shard_replaced_in_the_store_is_refused_before_any_weight_changes(
    sharded_folder: Path, s3_env: str, s3_bucket: str
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    upload_folder(sharded_folder, store, "run/ep1")
    shard = bytearray((sharded_folder / "__0_0.distcp").read_bytes())
    shard[-10] ^= 0x10  # inside the last tensor's bytes: the same size, so only the digest can tell
    replaced = sharded_folder.parent / "replaced.distcp"
    replaced.write_bytes(bytes(shard))
    store.upload_object("run/ep1/__0_0.distcp", str(replaced), overwrite=True)

    message = _refused_leaving_the_model_alone(f"s3://{s3_bucket}/run/ep1", CheckpointCorruptError)

    assert f"s3://{s3_bucket}/run/ep1/__0_0.distcp fails its digest" in message
    assert "load an earlier checkpoint" in message


def test_a_replaced_index_or_a_missing_shard_is_refused_before_any_shard_is_fetched(
    sharded_folder: Path, s3_env: str, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    upload_folder(sharded_folder, store, "run/ep1")
    store.upload_object("run/ep1/.metadata", str(sharded_folder / "__0_0.distcp"), overwrite=True)
    for file in ("cairn.pt", ".metadata"):  # a folder whose shard never reached the store
        store.upload_object(f"run/ep2/{file}", str(sharded_folder / file))

    with caplog.at_level(logging.INFO, logger="cairn"):
        replaced = _refused_leaving_the_model_alone(f"s3://{s3_bucket}/run/ep1", CheckpointCorruptError)
        missing = _refused_leaving_the_model_alone(f"s3://{s3_bucket}/run/ep2", CheckpointCorruptError)

    assert f"s3://{s3_bucket}/run/ep1/.metadata fails its digest" in replaced
    assert "missing its shard '__0_0.distcp'" in missing
    assert _fetches([r.getMessage() for r in caplog.records]) == [], "no shard file was fetched"


def test_a_byte_entry_that_would_run_code_is_refused_once_fetched_and_nothing_runs(
    sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    """The byte entries (an optimizer's lr, betas) are checked once their shard file is fetched, before DCP's
    global plan step: digests catch damage, not an attacker who re-seals ``cairn.pt``, so this check must hold
    without them."""
    marker = tmp_path / "ran"
    key = _plant_byte_entry(sharded_folder, CreatesAFile(marker))
    upload_folder(sharded_folder, S3ObjectStore(s3_bucket, endpoint_url=s3_env), "run/ep1")
    trainer = build_trainer(tmp_path, save_folder=None)
    before = params_of(trainer.state.model)

    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(f"s3://{s3_bucket}/run/ep1", trainer.state)

    assert key in str(info.value) and "nothing was executed" in str(info.value)
    assert not marker.exists(), "code from a shard entry ran"
    after = params_of(trainer.state.model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused load changed the weights"


@pytest.mark.slow
def test_two_ranks_resume_from_the_store_each_fetching_only_what_its_plan_reads(
    tmp_path: Path, s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """FSDP2 at 2 -> 2 ranks: rank r's weight and optimizer shards are in ``__r_0.distcp``, and DCP's save put the
    replicated entries (the optimizer's param groups and step counts) in rank 1's file alone. So rank 1 reads
    nothing from rank 0's file and never fetches it; rank 0 needs both. Then one plain process (2 -> 1) fetches
    both, and a shard replaced in the store is refused before the model changes."""
    from test_distributed import torchrun

    torchrun(tmp_path / "whole", "--fsdp")
    uri = f"s3://{s3_bucket}/run"
    sharded = ("--fsdp", "--sharded", "--save-folder", uri, "--save-interval", "1ba")
    first_machine, fresh_machine = tmp_path / "first-machine", tmp_path / "fresh-machine"
    first_machine.mkdir()
    fresh_machine.mkdir()
    monkeypatch.chdir(first_machine)
    torchrun(tmp_path / "first", *sharded, "--max-duration", "5ba")
    folder = f"{uri}/ep0-ba5-rank0.pt"

    monkeypatch.chdir(fresh_machine)
    torchrun(tmp_path / "resumed", *sharded, "--autoresume", "--cairn-log")

    fetched = {
        rank: _fetches((tmp_path / "resumed" / f"log-rank{rank}.txt").read_text().splitlines()) for rank in (0, 1)
    }
    assert fetched[1] == [(1, ["__1_0.distcp"], folder, ["__0_0.distcp"])], "rank 1 never fetched rank 0's file"
    assert fetched[0] == [(0, ["__0_0.distcp", "__1_0.distcp"], folder, [])], "rank 0 needs rank 1's byte entries"
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "resumed from the store: bit for bit"

    with caplog.at_level(logging.INFO, logger="cairn"):
        single = _load(folder, _fresh_model())
    assert _fetches([r.getMessage() for r in caplog.records]) == [(0, ["__0_0.distcp", "__1_0.distcp"], folder, [])]
    at_five = torch.load(tmp_path / "first" / "final.pt", weights_only=True)
    assert all(torch.equal(at_five[k], v) for k, v in single.state.model.module.state_dict().items()), "2 -> 1"

    shard = bucket_objects(s3_env, s3_bucket)["run/ep0-ba5-rank0.pt/__1_0.distcp"]
    replaced = tmp_path / "replaced.distcp"
    replaced.write_bytes(shard[:-10] + bytes(10))
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    store.upload_object("run/ep0-ba5-rank0.pt/__1_0.distcp", str(replaced), overwrite=True)
    message = _refused_leaving_the_model_alone(folder, CheckpointCorruptError)
    assert f"{folder}/__1_0.distcp fails its digest" in message


def test_autoresume_skips_a_store_folder_whose_shard_fails_its_digest_for_the_one_before(
    tmp_path: Path, s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only ``cairn.pt`` and the index are verified when autoresume picks a store's folder; a damaged shard is found
    as the folder is applied (before any weight changes), and autoresume then takes the folder before it, as it does
    for a damaged file."""
    uri = f"s3://{s3_bucket}/run"
    build_trainer(tmp_path, save_folder=str(tmp_path / "saved"), save_filename="ep{epoch}.pt", max_duration="2ep").fit()
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_env)
    for epoch in (1, 2):  # this run's names, as sharded folders
        folder = tmp_path / f"ep{epoch}-sharded"
        convert(str(tmp_path / "saved" / f"ep{epoch}.pt"), "sharded", str(folder))
        upload_folder(folder, store, f"run/ep{epoch}.pt")
    shard = bytearray((tmp_path / "ep2-sharded" / "__0_0.distcp").read_bytes())
    shard[-10] ^= 0x10
    (tmp_path / "damaged.distcp").write_bytes(bytes(shard))
    store.upload_object("run/ep2.pt/__0_0.distcp", str(tmp_path / "damaged.distcp"), overwrite=True)
    fresh_machine = tmp_path / "fresh"
    fresh_machine.mkdir()
    monkeypatch.chdir(fresh_machine)

    with caplog.at_level(logging.WARNING, logger="cairn"):
        resumed = build_trainer(
            tmp_path, save_folder=uri, save_filename="ep{epoch}.pt", max_duration="2ep", autoresume=True
        )

    assert resumed.state.timestamp.epoch == 1, "resumed from the folder before the damaged one"
    skipped = [r.getMessage() for r in caplog.records if "autoresume skips" in r.getMessage()]
    assert skipped and f"{uri}/ep2.pt/__0_0.distcp fails its digest" in skipped[0]
    saved = read_checkpoint(str(tmp_path / "saved" / "ep1.pt"))["state"]["model"]
    loaded = resumed.state.model.module.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved), "bit for bit"
