"""Incremental checkpoints in an object store, against the real moto server: each chunk is uploaded once (later
saves upload only the chunks that changed), every manifest in the store loads with each chunk downloaded and
verified, autoresume from the store alone continues bit for bit, a chunk missing or damaged in the store is a clear
error that autoresume falls back from, and store retention takes the chunks only the deleted manifests named.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from cairn import Trainer
from cairn.checkpoint.load.remote import read_remote_checkpoint
from cairn.checkpoint.save.remote_chunks import store_chunk_folder
from cairn.errors import CheckpointCorruptError
from cairn.storage.s3 import S3ObjectStore
from conftest import frozen_body_trainer, params_of
from store_servers.moto import bucket_objects

CHUNKS = "run/.cairn-chunks/"


pytestmark = pytest.mark.usefixtures("small_chunks")


def _trainer(bucket: str | None, max_duration: str, *, init_seed: int = 0, **kwargs: Any) -> Trainer:
    if bucket is not None:
        kwargs.setdefault("save_folder", f"s3://{bucket}/run")
        kwargs.setdefault("save_filename", "ba{batch}.pt")
        kwargs.setdefault("save_interval", "1ba")
        kwargs.setdefault("save_incremental", True)
    return frozen_body_trainer(max_duration, init_seed=init_seed, **kwargs)


def _store(endpoint: str, bucket: str) -> S3ObjectStore:
    return S3ObjectStore(bucket, endpoint_url=endpoint)


def _chunks_in(endpoint: str, bucket: str) -> set[str]:
    return {name[len(CHUNKS) :] for name in bucket_objects(endpoint, bucket) if name.startswith(CHUNKS)}


def _named(store: S3ObjectStore, name: str, tmp_path: Path) -> set[str]:
    local = tmp_path / "manifest.pt"
    store.download_object(name, str(local), overwrite=True)
    manifest = torch.load(local, weights_only=True)
    return {key for entry in manifest["chunks"]["tensors"] for key, _ in entry["chunks"]}


class _ChunkUploads:
    """Counts the chunk uploads each save starts (the saver's calls into its store's transfers)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from cairn.storage.transfer import Transfers

        self.names: list[str] = []
        upload = Transfers.upload

        def counting(transfers: Transfers, remote_file_name: str, *args: Any, **kwargs: Any) -> Any:
            self.names.append(remote_file_name)
            return upload(transfers, remote_file_name, *args, **kwargs)

        monkeypatch.setattr(Transfers, "upload", counting)

    def chunks(self) -> list[str]:
        return [name for name in self.names if "/.cairn-chunks/" in name]


def test_later_saves_upload_only_the_new_chunks_and_every_manifest_loads_verified(
    s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    uploads = _ChunkUploads(monkeypatch)
    trainer = _trainer(s3_bucket, "3ba")
    trainer.fit()
    objects = bucket_objects(s3_env, s3_bucket)
    assert {"run/ba1.pt", "run/ba2.pt", "run/ba3.pt"} <= set(objects)
    chunk_uploads = uploads.chunks()
    assert len(chunk_uploads) == len(set(chunk_uploads)), "no chunk is uploaded twice"
    stored = _chunks_in(s3_env, s3_bucket)
    assert set(name.rpartition("/")[2] for name in chunk_uploads) == stored
    store = _store(s3_env, s3_bucket)
    first = _named(store, "run/ba1.pt", tmp_path)
    assert len(first) >= 5 and first <= stored, "the first save uploaded the body's chunks and the head's"
    for name in ("run/ba2.pt", "run/ba3.pt"):
        new = _named(store, name, tmp_path) - first
        assert 0 < len(new) <= 2 * 3, "the head and its two moments: two chunks each, at most"
    assert len(stored) <= len(first) + 2 * 6, "the body once, then only what changed"
    for name in ("run/ba1.pt", "run/ba2.pt", "run/ba3.pt"):
        loaded = read_remote_checkpoint(store, name, progress=False)  # every chunk downloaded and checked
        assert "chunks" not in loaded
    live = params_of(trainer.state.model.module)
    assert all(torch.equal(loaded["state"]["model"][key], value) for key, value in live.items())
    os.rename("run", "moved")  # the store alone: nothing local to read from
    assert torch.equal(read_remote_checkpoint(store, "run/ba3.pt", progress=False)["state"]["model"]["head.weight"],
                       live["head.weight"])  # fmt: skip


def test_a_chunk_cut_short_in_the_store_is_uploaded_again_by_the_next_run(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _trainer(s3_bucket, "1ba").fit()
    store = _store(s3_env, s3_bucket)
    body = sorted(_named(store, "run/ba1.pt", tmp_path))[0]
    cut = tmp_path / "cut"
    cut.write_bytes(b"short")
    store.upload_object(f"{CHUNKS}{body}", str(cut))  # a copy of the wrong size under the chunk's name
    _trainer(s3_bucket, "1ba", save_filename="again-ba{batch}.pt").fit()  # a new run: it lists the chunks once
    assert body in _named(store, "run/again-ba1.pt", tmp_path)
    read_remote_checkpoint(store, "run/again-ba1.pt", progress=False)  # every chunk whole again, and checked


class _RecordingStore(S3ObjectStore):
    """The real S3 store, remembering which objects it downloaded."""

    downloaded: list[str]

    def download_object(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.downloaded.append(name)
        super().download_object(name, *args, **kwargs)


def test_an_oversized_object_in_a_chunks_place_is_refused_without_being_downloaded(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _trainer(s3_bucket, "1ba").fit()
    store = _RecordingStore(s3_bucket, endpoint_url=s3_env)
    store.downloaded = []
    body = sorted(_named(store, "run/ba1.pt", tmp_path))[0]
    big = tmp_path / "big"
    big.write_bytes(b"x" * (3 << 20))  # larger than the 64 KiB chunk it stands in for
    store.upload_object(f"{CHUNKS}{body}", str(big))
    with pytest.raises(CheckpointCorruptError, match=f"its chunk {body} .*has another size"):
        read_remote_checkpoint(store, "run/ba1.pt", progress=False)
    assert f"{CHUNKS}{body}" not in store.downloaded


def test_autoresume_from_the_store_alone_ends_bit_for_bit(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    uninterrupted = _trainer(None, "6ba")
    uninterrupted.fit()
    _trainer(s3_bucket, "3ba").fit()
    os.rename("run", "gone")  # an empty local folder: the run resumes from the store's latest pointer
    resumed = _trainer(s3_bucket, "6ba", init_seed=1, autoresume=True)
    assert resumed.state.timestamp.batch == 3
    resumed.fit()
    expected, got = params_of(uninterrupted.state.model), params_of(resumed.state.model)
    assert all(torch.equal(got[key], value) for key, value in expected.items())


def test_a_chunk_missing_or_damaged_in_the_store_is_refused_and_autoresume_falls_back(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _trainer(s3_bucket, "3ba").fit()
    store = _store(s3_env, s3_bucket)
    named = {batch: _named(store, f"run/ba{batch}.pt", tmp_path) for batch in (1, 2, 3)}
    deleted = sorted(named[3] - named[2] - named[1])[0]
    damaged = sorted(named[2] - named[1] - named[3])[0]
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.delete_object(Bucket=s3_bucket, Key=CHUNKS + deleted)
    data = bytearray(client.get_object(Bucket=s3_bucket, Key=CHUNKS + damaged)["Body"].read())
    data[100] ^= 1
    client.put_object(Bucket=s3_bucket, Key=CHUNKS + damaged, Body=bytes(data))
    with pytest.raises(CheckpointCorruptError, match=f"ba3.pt is incomplete: its chunk {deleted} .*is missing from"):
        read_remote_checkpoint(store, "run/ba3.pt", progress=False)
    with pytest.raises(CheckpointCorruptError, match=f"ba2.pt is incomplete: its chunk {damaged} .*does not match"):
        read_remote_checkpoint(store, "run/ba2.pt", progress=False)
    os.rename("run", "gone")
    resumed = _trainer(s3_bucket, "4ba", autoresume=True)
    assert resumed.state.timestamp.batch == 1, "the newest checkpoint whose chunks are all there and whole"


def test_store_retention_takes_the_chunks_only_pruned_manifests_named(
    s3_env: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _trainer(s3_bucket, "2ba").fit()
    store = _store(s3_env, s3_bucket)
    earlier = _named(store, "run/ba1.pt", tmp_path) | _named(store, "run/ba2.pt", tmp_path)
    os.rename("run", "gone")  # a restart elsewhere: the store's chunks are known from one listing
    uploads = _ChunkUploads(monkeypatch)
    _trainer(s3_bucket, "4ba", autoresume=True, save_remote_num_checkpoints_to_keep=1).fit()
    assert not {name.rpartition("/")[2] for name in uploads.chunks()} & earlier, "nothing uploaded twice"
    objects = bucket_objects(s3_env, s3_bucket)
    assert sorted(name for name in objects if name.endswith(".pt")) == ["run/ba4.pt"]
    kept = _named(store, "run/ba4.pt", tmp_path)
    assert _chunks_in(s3_env, s3_bucket) == kept, "the earlier run's manifests were read to collect theirs too"
    read_remote_checkpoint(store, "run/ba4.pt", progress=False)


def test_a_chunk_folder_above_the_store_root_is_refused() -> None:
    assert store_chunk_folder("run/sub/ba1.pt", "../.cairn-chunks") == "run/.cairn-chunks"
    with pytest.raises(CheckpointCorruptError, match="above the store's root"):
        store_chunk_folder("ba1.pt", "../.cairn-chunks")
    with pytest.raises(CheckpointCorruptError, match="is not"):
        store_chunk_folder("run/ba1.pt", "../../etc")


def test_a_failed_chunk_upload_keeps_the_manifest_out_of_the_store_and_is_raised(
    faulty_proxy: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cairn.callbacks import CheckpointSaver
    from cairn.core.callback import Callback
    from cairn.errors import ObjectStoreError
    from cairn.loggers import RemoteUploaderDownloader

    monkeypatch.setenv("S3_ENDPOINT_URL", faulty_proxy.endpoint)
    monkeypatch.chdir(tmp_path)

    class StoreGoesDown(Callback):
        """After the first save is verified in the store, before the second save: every request then fails."""

        def batch_start(self, state: Any, logger: Any) -> None:
            if int(state.timestamp.batch) == 1:
                saver = next(c for c in state.callbacks if isinstance(c, CheckpointSaver))
                cf.wait([future for future, _ in saver._uploading])  # the manifest verified, after its chunks
                faulty_proxy.down = True

    uploader = RemoteUploaderDownloader(  # one attempt per upload, all at once: the failure comes in seconds
        f"s3://{s3_bucket}", num_attempts=1, num_concurrent_uploads=8, use_procs=False
    )
    trainer = _trainer(s3_bucket, "2ba", save_folder="run", save_remote_file_name="run/ba{batch}.pt",
                       loggers=[uploader], callbacks=[StoreGoesDown()])  # fmt: skip
    with pytest.raises(ObjectStoreError, match="uploading .* failed"):
        trainer.fit()
    faulty_proxy.down = False
    puts = [path for _, method, path in faulty_proxy.requests if method == "PUT"]
    assert any("/run/.cairn-chunks/" in path for path in puts[-3:]), "the new chunks were tried"
    assert not any(path.split("?")[0].endswith("/run/ba2.pt") for path in puts), "the manifest never went up"
    assert (tmp_path / "run" / "ba2.pt").is_file(), "the local manifest is kept"
    store = _store(faulty_proxy.endpoint, s3_bucket)
    read_remote_checkpoint(store, "run/ba1.pt", progress=False)
