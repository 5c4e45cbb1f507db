"""Sharded checkpoint folders in an object store, with two real ranks (torchrun, gloo) and the real moto server.

Every rank uploads its own shard files; rank 0 uploads ``cairn.pt`` last, once every rank's shards are stored, and
the store's latest pointer moves with it. A fresh machine (an empty local folder) then resumes from the store,
bit for bit, and one plain process loads the two ranks' folder from its URI.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import torch

from cairn import Trainer
from cairn.models import Classifier
from conftest import TinyNet, make_loader
from store_servers.moto import bucket_objects
from test_distributed import torchrun
from test_kill_campaign import Run, _command, _descendants

pytestmark = pytest.mark.slow

_FOLDER_FILES = {".metadata", "__0_0.distcp", "__1_0.distcp", "cairn.pt"}


def _whole_folders(objects: dict[str, bytes]) -> list[str]:
    """The prefixes the store calls checkpoints (those holding cairn.pt), each checked to hold every file."""
    folders = sorted({name.rsplit("/", 1)[0] for name in objects if name.endswith("/cairn.pt")})
    for folder in folders:
        assert {name[len(folder) + 1 :] for name in objects if name.startswith(folder + "/")} == _FOLDER_FILES
    return folders


def _resume_on_a_fresh_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    """Autoresume from the store in an empty working folder, and end with the uninterrupted run's weights."""
    fresh_machine = tmp_path / "fresh-machine"
    fresh_machine.mkdir()
    monkeypatch.chdir(fresh_machine)
    torchrun(tmp_path / "resumed", *args, "--autoresume")
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "resumed from the store: bit for bit"


@pytest.mark.parametrize("timing", [(), ("--async-save",)], ids=["sync", "async"])
def test_a_sharded_run_saves_to_a_store_and_a_fresh_machine_resumes_from_it_bit_for_bit(
    tmp_path: Path, s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, timing: tuple[str, ...]
) -> None:
    torchrun(tmp_path / "whole", "--fsdp")
    uri = f"s3://{s3_bucket}/run"
    sharded = ("--fsdp", "--sharded", "--save-folder", uri, "--save-interval", "1ba", "--keep", "2", *timing)
    first_machine = tmp_path / "first-machine"
    first_machine.mkdir()
    monkeypatch.chdir(first_machine)

    torchrun(tmp_path / "first", *sharded, "--max-duration", "11ba")

    objects = bucket_objects(s3_env, s3_bucket)
    assert len(_whole_folders(objects)) == 11, "every save's folder reached the store whole"
    assert objects["run/latest-rank0.pt.symlink"] == b"run/ep1-ba11-rank0.pt"
    local = sorted(os.listdir(first_machine / "run"))
    assert local == ["ep1-ba10-rank0.pt", "ep1-ba11-rank0.pt", "latest-rank0.pt"], "kept 2 once uploaded"

    _resume_on_a_fresh_machine(tmp_path, monkeypatch, *sharded)

    single = Trainer(  # the two ranks' folder, from its URI, into one plain process
        model=Classifier(TinyNet(dropout=0.3)),
        train_dataloader=make_loader(),  # other data than the ranks': its mid-epoch position cannot carry over
        max_duration="4ep",
        load_path=f"{uri}/ep1-ba11-rank0.pt",
        load_at_epoch_boundary=True,
        progress_bar=False,
    )
    assert single.state.timestamp.batch == 11
    if not timing:
        torchrun(tmp_path / "four", "--fsdp", "--sharded", "--load-path", f"{uri}/ep1-ba11-rank0.pt", nproc=4)
        assert (tmp_path / "four" / "timestamp.txt").read_text().split()[0] == "3", "and onto four ranks"


def test_an_async_sharded_saves_shards_go_up_once_published_not_at_the_next_save(
    tmp_path: Path, s3_env: str, s3_bucket: str
) -> None:
    """Saves at batches 3, 6 and 8: at batch 5 rank 0 waits (at most a minute) for the store to hold both ranks'
    shards of batch 3's folder, which every rank's background starts uploading once the folder is published."""
    uri = f"s3://{s3_bucket}/run"
    out = tmp_path / "out"
    async_sharded = ("--fsdp", "--sharded", "--async-save", "--save-folder", uri, "--save-interval", "3ba")
    torchrun(out, *async_sharded, "--max-duration", "8ba", "--await-shards-at", "5")

    assert (out / "shards-at-batch.txt").read_text() == "stored\n", "batch 3's shards reached the store by batch 5"
    objects = bucket_objects(s3_env, s3_bucket)
    assert _whole_folders(objects) == ["run/ep0-ba3-rank0.pt", "run/ep0-ba6-rank0.pt", "run/ep1-ba8-rank0.pt"]
    assert objects["run/latest-rank0.pt.symlink"] == b"run/ep1-ba8-rank0.pt"


def test_with_none_kept_locally_each_folder_goes_once_the_store_holds_all_of_it(
    tmp_path: Path, s3_env: str, s3_bucket: str
) -> None:
    uri = f"s3://{s3_bucket}/run"
    torchrun(
        tmp_path / "out",
        "--fsdp",
        "--sharded",
        "--save-folder",
        uri,
        "--save-interval",
        "1ba",
        "--max-duration",
        "4ba",
        "--keep",
        "0",
    )

    objects = bucket_objects(s3_env, s3_bucket)
    folders = sorted({name.rsplit("/", 1)[0] for name in objects if name.endswith("/cairn.pt")})
    assert folders == [f"run/ep0-ba{batch}-rank0.pt" for batch in range(1, 5)]
    assert all(f"{folder}/__1_0.distcp" in objects for folder in folders)
    assert not [name for name in os.listdir(tmp_path / "run") if name.startswith("ep")], "no local folder is left"


def test_store_retention_deletes_whole_folders_and_keeps_the_best_and_the_newest(
    tmp_path: Path, s3_env: str, s3_bucket: str
) -> None:
    """Two ranks' folders, the store keeping the 2 newest and the best by the script's value (the dist script logs
    ``random.Random(batch).random()``): every other folder leaves the store whole, no object of it behind."""
    uri = f"s3://{s3_bucket}/run"
    rules = ("--remote-keep", "2", "--keep-best", "1")
    torchrun(
        tmp_path / "out",
        "--fsdp",
        "--sharded",
        "--save-folder",
        uri,
        "--save-interval",
        "1ba",
        *rules,
        "--max-duration",
        "6ba",
    )

    best = max(range(1, 7), key=lambda batch: random.Random(batch).random())
    kept = sorted({best, 5, 6})
    objects = bucket_objects(s3_env, s3_bucket)
    assert _whole_folders(objects) == [f"run/ep0-ba{batch}-rank0.pt" for batch in kept]
    assert not [
        name
        for name in objects
        if "/" in name.removeprefix("run/")
        and not any(name.startswith(f"run/ep0-ba{batch}-rank0.pt/") for batch in kept)
    ], "no object of a deleted folder is left"
    assert objects["run/latest-rank0.pt.symlink"] == b"run/ep0-ba6-rank0.pt"
    assert objects["run/best-rank0.pt.symlink"] == f"run/ep0-ba{best}-rank0.pt".encode()


def test_a_users_uploader_takes_sharded_folders_too(tmp_path: Path, s3_env: str, s3_bucket: str) -> None:
    """A local save_folder and a RemoteUploaderDownloader of the user's own: the same folders, under the uploader's
    names ({run_name}/checkpoints/...), the pointer beside them, and autoresume finds them from an empty folder."""
    uploader = ("--uploader", f"s3://{s3_bucket}/team-a")
    sharded = ("--fsdp", "--sharded", "--save-folder", str(tmp_path / "ckpt"), "--save-interval", "1ba", *uploader)
    torchrun(tmp_path / "first", *sharded, "--max-duration", "3ba")

    objects = bucket_objects(s3_env, s3_bucket)
    assert _whole_folders(objects) == [f"team-a/dist/checkpoints/ep0-ba{batch}-rank0.pt" for batch in (1, 2, 3)]
    pointer = objects["team-a/dist/checkpoints/latest-rank0.pt.symlink"]
    assert pointer == b"dist/checkpoints/ep0-ba3-rank0.pt"  # names inside the uploader's path, as for single files

    sharded = ("--fsdp", "--sharded", "--save-folder", str(tmp_path / "empty"), "--save-interval", "1ba", *uploader)
    torchrun(tmp_path / "resumed", *sharded, "--autoresume", "--max-duration", "4ba")
    assert (tmp_path / "resumed" / "timestamp.txt").read_text().split() == ["0", "4"]


def test_shard_uploads_through_a_flaky_store_still_land_whole_and_resume_bit_for_bit(
    tmp_path: Path, faulty_proxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy drops, fails (500, 503) and stalls 30% of the requests while two ranks upload their shards: every
    folder still reaches the store whole, the pointer names the last, and a fresh machine resumes from it."""
    torchrun(tmp_path / "whole", "--fsdp")
    monkeypatch.setenv("S3_ENDPOINT_URL", faulty_proxy.endpoint)
    monkeypatch.chdir(tmp_path)
    faulty_proxy.fault_rate = 0.3
    sharded = ("--fsdp", "--sharded", "--save-folder", f"s3://{s3_bucket}/run", "--save-interval", "1ba")

    torchrun(tmp_path / "first", *sharded, "--max-duration", "6ba")

    assert sum(faulty_proxy.counts[f] for f in ("drop", "500", "503", "stall")) >= 5, faulty_proxy.counts
    objects = bucket_objects(f"http://{faulty_proxy.upstream_host}:{faulty_proxy.upstream_port}", s3_bucket)
    assert _whole_folders(objects) == [f"run/ep0-ba{batch}-rank0.pt" for batch in range(1, 7)]
    assert objects["run/latest-rank0.pt.symlink"] == b"run/ep0-ba6-rank0.pt"

    faulty_proxy.fault_rate = 0.0
    _resume_on_a_fresh_machine(tmp_path, monkeypatch, *sharded)


def test_a_rank_killed_while_shards_upload_leaves_the_pointer_on_a_whole_folder(
    tmp_path: Path, faulty_proxy, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL rank 1 while shard uploads are in flight (a flaky store keeps them there), then the rest of the job
    (a lost node): every prefix the store calls a checkpoint is whole, the pointer names one of them, and a fresh
    machine resumes from the store bit for bit, saving again over the leftovers of the killed uploads."""
    torchrun(tmp_path / "whole", "--fsdp")
    monkeypatch.setenv("S3_ENDPOINT_URL", faulty_proxy.endpoint)
    monkeypatch.chdir(tmp_path)
    faulty_proxy.fault_rate = 0.5
    sharded = ("--fsdp", "--sharded", "--save-folder", f"s3://{s3_bucket}/run", "--save-interval", "1ba")
    (tmp_path / "killed").mkdir()
    run = Run(_command(tmp_path / "killed", 2, *sharded, "--announce"), tmp_path / "killed.log")
    for batch in run.batches():
        if batch == 5:
            break
    rank_one = [pid for pid in _descendants(run.process.pid) if b"\0RANK=1\0" in _environ(pid)]
    assert len(rank_one) == 1
    os.kill(rank_one[0], signal.SIGKILL)
    run.kill()

    faulty_proxy.fault_rate = 0.0
    objects = bucket_objects(f"http://{faulty_proxy.upstream_host}:{faulty_proxy.upstream_port}", s3_bucket)
    pointer = objects.get("run/latest-rank0.pt.symlink")
    assert pointer is None or pointer.decode() in _whole_folders(objects)

    _resume_on_a_fresh_machine(tmp_path, monkeypatch, *sharded)


def _environ(pid: int) -> bytes:
    try:
        return b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # it exited meanwhile
        return b""
