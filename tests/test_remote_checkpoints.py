"""Checkpoints saved to and resumed from an object store (moto's S3 server on 127.0.0.1), through the Trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cairn import Callback, Trainer
from cairn.checkpoint import read_checkpoint
from cairn.errors import CheckpointNotFoundError, ObjectStoreError
from cairn.loggers import RemoteUploaderDownloader
from cairn.models import Classifier
from cairn.utils import S3ObjectStore
from conftest import TinyNet, make_loader, params_of
from store_servers.moto import bucket_objects


def _trainer(max_duration: str = "3ep", init_seed: int = 0, **kwargs: Any) -> Trainer:
    torch.manual_seed(init_seed)
    net = TinyNet(dropout=0.2)
    return Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8, shuffle=True),
        max_duration=max_duration,
        device="cpu",
        seed=7,
        progress_bar=False,
        **kwargs,
    )


def test_a_uri_save_folder_uploads_every_checkpoint_and_moves_the_pointer(s3_env: str, s3_bucket: str) -> None:
    trainer = _trainer(
        save_folder=f"s3://{s3_bucket}/checkpoints", save_filename="ep{epoch}.pt", save_num_checkpoints_to_keep=0
    )
    trainer.fit()
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(objects) == [
        "checkpoints/ep1.pt",
        "checkpoints/ep2.pt",
        "checkpoints/ep3.pt",
        "checkpoints/latest-rank0.pt.symlink",
    ]
    assert objects["checkpoints/latest-rank0.pt.symlink"] == b"checkpoints/ep3.pt"
    assert (
        objects["checkpoints/ep3.pt"] == Path(trainer.saved_checkpoints[-1]).read_bytes()
        if Path(trainer.saved_checkpoints[-1]).exists()
        else True
    )
    assert not list(Path("checkpoints").glob("ep*.pt")), "num_checkpoints_to_keep=0 removes local copies once uploaded"
    Path("remote-ep3.pt").write_bytes(objects["checkpoints/ep3.pt"])
    assert read_checkpoint("remote-ep3.pt")["state"]["timestamp"]["epoch"] == 3


@pytest.mark.parametrize("use_procs", [False, True])
def test_an_uploader_in_loggers_names_files_by_run(s3_env: str, s3_bucket: str, use_procs: bool) -> None:
    uploader = RemoteUploaderDownloader(f"s3://{s3_bucket}", use_procs=use_procs, num_concurrent_uploads=2)
    trainer = _trainer("2ep", save_folder="local", run_name="my-run", loggers=uploader)
    trainer.fit()
    assert sorted(bucket_objects(s3_env, s3_bucket)) == [
        "my-run/checkpoints/ep1-ba4-rank0.pt",
        "my-run/checkpoints/ep2-ba8-rank0.pt",
        "my-run/checkpoints/latest-rank0.pt.symlink",
    ]
    assert sorted(p.name for p in Path("local").iterdir()) == [
        "ep1-ba4-rank0.pt",
        "ep2-ba8-rank0.pt",
        "latest-rank0.pt",
    ]
    trainer.close()


def test_load_path_uri_and_load_object_store(s3_env: str, s3_bucket: str) -> None:
    _trainer("1ep", save_folder=f"s3://{s3_bucket}/ckpt", save_filename="ep{epoch}.pt").fit()
    by_uri = _trainer("2ep", load_path=f"s3://{s3_bucket}/ckpt/ep1.pt")
    assert by_uri.state.timestamp.epoch == 1
    store = S3ObjectStore(s3_bucket)
    by_store = _trainer("2ep", load_path="ckpt/ep1.pt", load_object_store=store)
    assert by_store.state.timestamp.epoch == 1
    by_uploader = _trainer(
        "2ep", load_path="ckpt/ep1.pt", load_object_store=RemoteUploaderDownloader(f"s3://{s3_bucket}")
    )
    assert by_uploader.state.timestamp.epoch == 1
    assert not list(Path(".").glob("**/*.cairn-tmp-*")) and not list(Path(".").glob("cairn-download-*"))


def test_autoresume_from_the_store_on_a_machine_with_nothing_local(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    uninterrupted = _trainer("3ep")
    uninterrupted.fit()
    folder = f"s3://{s3_bucket}/run"
    first = tmp_path / "machine-a"
    first.mkdir()
    os.chdir(first)
    _trainer("5ba", save_folder=folder, save_interval="1ba", run_name="r").fit()
    second = tmp_path / "machine-b"
    second.mkdir()
    os.chdir(second)
    resumed = _trainer("3ep", init_seed=1, save_folder=folder, save_interval="1ba", run_name="r", autoresume=True)
    assert resumed.state.timestamp.batch == 5
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep1-ba5-rank0.pt"
    resumed.fit()
    expected, got = params_of(uninterrupted.state.model), params_of(resumed.state.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed from the store, bit for bit"


def test_autoresume_with_an_empty_bucket_starts_fresh(s3_env: str, s3_bucket: str) -> None:
    trainer = _trainer("1ep", save_folder=f"s3://{s3_bucket}/run", autoresume=True, run_name="r")
    assert trainer.state.timestamp.batch == 0
    trainer.fit()
    assert trainer.state.timestamp.epoch == 1


def test_a_missing_object_is_a_clear_error_at_construction(s3_env: str, s3_bucket: str) -> None:
    with pytest.raises(CheckpointNotFoundError, match=rf"s3://{s3_bucket}/nope/ep1.pt"):
        _trainer(load_path=f"s3://{s3_bucket}/nope/ep1.pt")


def test_a_missing_bucket_is_a_clear_error_before_training(s3_env: str) -> None:
    with pytest.raises(ObjectStoreError, match="bucket does not exist"):
        _trainer(load_path="s3://no-such-bucket-here/ckpt/ep1.pt")
    trainer = _trainer(save_folder="s3://no-such-bucket-here/ckpt")
    with pytest.raises(ObjectStoreError, match="bucket does not exist"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0


@pytest.mark.parametrize("uri", ["s3:/bucket/x.pt", "nosuch://bucket/x.pt", "s3:///x.pt", "s3://user@host/x"])
def test_a_bad_uri_is_refused_with_what_would_work(s3_env: str, uri: str) -> None:
    with pytest.raises((ValueError, CheckpointNotFoundError)) as excinfo:
        _trainer(load_path=uri)
    assert "s3://" in str(excinfo.value) or "no checkpoint" in str(excinfo.value)


def test_uploads_survive_a_flaky_store(faulty_proxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    faulty_proxy.fault_rate = 0.3
    monkeypatch.setenv("S3_ENDPOINT_URL", faulty_proxy.endpoint)
    trainer = _trainer("3ep", save_folder=f"s3://{s3_bucket}/flaky", save_filename="ba{batch}.pt", save_interval="1ba")
    trainer.fit()
    injected = sum(faulty_proxy.counts[f] for f in ("drop", "500", "503", "stall"))
    assert injected >= 5, faulty_proxy.counts
    objects = bucket_objects(_upstream(faulty_proxy), s3_bucket)
    for batch in range(1, 13):
        assert objects[f"flaky/ba{batch}.pt"] == (tmp_path / "flaky" / f"ba{batch}.pt").read_bytes(), (
            faulty_proxy.counts
        )
    assert objects["flaky/latest-rank0.pt.symlink"] == b"flaky/ba12.pt"


@pytest.mark.slow  # every attempt and its backoff is waited out, about 20 s
def test_a_store_that_stays_down_fails_the_run_and_keeps_the_local_copy(
    faulty_proxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("S3_ENDPOINT_URL", faulty_proxy.endpoint)

    class GoDown(Callback):
        def batch_start(self, state, logger) -> None:
            faulty_proxy.down = True  # after the store was checked at fit start, before the first upload

    trainer = _trainer(
        "2ep",
        save_folder=f"s3://{s3_bucket}/down",
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,
        callbacks=GoDown(),
    )
    with pytest.raises(ObjectStoreError, match=r"ep1\.pt"):
        trainer.fit()
    assert read_checkpoint(str(tmp_path / "down" / "ep1.pt"))["state"]["timestamp"]["epoch"] == 1


def _upstream(proxy) -> str:
    return f"http://{proxy.upstream_host}:{proxy.upstream_port}"


def test_save_remote_file_name_names_thebucket_objects(s3_env: str, s3_bucket: str) -> None:
    trainer = _trainer(
        "2ep",
        save_folder=f"s3://{s3_bucket}/ignored-path",
        save_filename="ep{epoch}.pt",
        save_remote_file_name="custom/{run_name}/e{epoch}.pt",
        run_name="named",
    )
    trainer.fit()
    assert sorted(bucket_objects(s3_env, s3_bucket)) == [
        "custom/named/e1.pt",
        "custom/named/e2.pt",
        "custom/named/latest-rank0.pt.symlink",
    ]
    assert sorted(p.name for p in Path("ignored-path").iterdir()) == ["ep1.pt", "ep2.pt", "latest-rank0.pt"]


def test_large_downloads_show_a_progress_bar(
    s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cairn.storage.transfer as uploader_module

    _trainer("1ep", save_folder=f"s3://{s3_bucket}/ckpt", save_filename="ep{epoch}.pt").fit()
    capsys.readouterr()
    monkeypatch.setattr(uploader_module, "PROGRESS_BAR_BYTES", 1)
    _trainer("2ep", load_path=f"s3://{s3_bucket}/ckpt/ep1.pt")
    assert "download ep1.pt" in capsys.readouterr().err
    _trainer("2ep", load_path=f"s3://{s3_bucket}/ckpt/ep1.pt", load_progress_bar=False)
    assert "download ep1.pt" not in capsys.readouterr().err


def test_the_pointer_only_moves_forward_with_concurrent_uploads(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    uploader = RemoteUploaderDownloader(f"s3://{s3_bucket}", num_concurrent_uploads=4, use_procs=False)
    sizes = [400_000, 10, 200_000, 10, 300_000, 10, 50_000, 10]  # mixed sizes finish out of order
    for index, size in enumerate(sizes):
        path = tmp_path / f"f{index}.bin"
        path.write_bytes(os.urandom(size))
        uploader.upload_file(f"run/f{index}.bin", str(path), pointer_name="run/latest.symlink")
    uploader.wait()
    objects = bucket_objects(s3_env, s3_bucket)
    assert objects["run/latest.symlink"] == f"run/f{len(sizes) - 1}.bin".encode()
    assert all(objects[f"run/f{i}.bin"] == (tmp_path / f"f{i}.bin").read_bytes() for i in range(len(sizes)))


def test_autoresume_needs_a_run_name_when_remote_names_hold_it(s3_env: str, s3_bucket: str) -> None:
    with pytest.raises(ValueError, match="run_name"):
        _trainer(save_folder="local", loggers=RemoteUploaderDownloader(f"s3://{s3_bucket}"), autoresume=True)
