"""Uploads stage files without copying them, retention never deletes a file whose upload is unsettled, a Trainer
that fails to build leaves nothing behind, and autoresume follows a store pointer only to this run's own names.

Every test runs against moto's S3 server (tests/store_servers/moto.py). Where an upload must be caught in flight,
a proxy in front of it (``HeldUploads``, built on tests/store_servers/faulty_proxy.py) holds the PUTs of one name
until the test lets them go: the upload really is on the wire, waiting for the store's answer.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import boto3
import pytest

from cairn import Trainer
from cairn.core.callback import Callback
from cairn.errors import CheckpointIncompatibleError, ObjectStoreError
from cairn.models import Classifier
from cairn.names import METADATA_FILE, TEMP_MARKER
from cairn.storage.transfer import Transfers
from cairn.utils.checkpoint import save_checkpoint
from conftest import TinyNet, make_loader, s3_run_trainer
from store_servers.faulty_proxy import FaultyProxy
from store_servers.moto import bucket_objects

MIB = 2**20


class HeldUploads(FaultyProxy):
    """A proxy that holds every PUT whose path contains ``hold`` until :attr:`release` is set, then answers it
    with ``then`` (503: the store is down for that object; ``"pass"``: forwarded as it came). :attr:`held` says
    that one arrived. Everything else is forwarded untouched."""

    def __init__(self, upstream: str, hold: str, *, then: str = "503") -> None:
        super().__init__(upstream)
        self.hold, self.then = hold, then
        self.held, self.release = threading.Event(), threading.Event()
        proxy = self
        relay = self._server.RequestHandlerClass

        class Handler(relay):  # type: ignore[misc, valid-type]
            def _held(self) -> None:
                if self.command != "PUT" or proxy.hold not in self.path:
                    return relay._relay(self)
                proxy.held.set()
                proxy.release.wait(60)
                if proxy.then == "pass":
                    return relay._relay(self)
                self._read_body()
                return self._answer(503, "<Error><Code>SlowDown</Code><Message>held, then refused</Message></Error>")

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _held

        self._server.RequestHandlerClass = Handler


@pytest.fixture
def held_proxy(moto_endpoint: str) -> Any:
    proxies: list[HeldUploads] = []

    def start(hold: str, *, then: str = "503") -> HeldUploads:
        proxies.append(HeldUploads(moto_endpoint, hold, then=then).start())
        return proxies[-1]

    yield start
    for proxy in proxies:
        proxy.release.set()
        proxy.stop()


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def _staged(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


# -- 1. staging by hard link ----------------------------------------------------------------------------------------


def test_a_staged_upload_is_a_hard_link_to_the_file_not_a_copy(
    s3_bucket: str, held_proxy: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = held_proxy("big.bin", then="pass")
    source = tmp_path / "ckpt" / "big.bin"
    source.parent.mkdir()
    data = _random_file(source, 48 * MIB)
    staging = tmp_path / "staging"
    staging.mkdir()
    transfers = Transfers(
        f"s3://{s3_bucket}",
        {"endpoint_url": proxy.endpoint},
        upload_staging_folder=str(staging),
        use_procs=False,
    )
    with caplog.at_level(logging.WARNING, logger="cairn"):
        transfers.upload("run/big.bin", str(source))
    assert proxy.held.wait(30), "the upload reached the store"
    (staged,) = _staged(staging)
    assert os.stat(staged).st_ino == os.stat(source).st_ino, "the staged file is the file itself: nothing copied"
    assert os.stat(source).st_nlink == 2
    os.remove(source)  # training may delete it now (retention would): the upload still has its bytes
    proxy.release.set()
    transfers.close()
    assert bucket_objects(proxy.endpoint, s3_bucket)["run/big.bin"] == data, "uploaded bit for bit"
    assert _staged(staging) == [], "the link is gone once the upload is verified"
    assert "copies" not in caplog.text


def test_a_file_renamed_over_while_uploading_does_not_change_what_is_uploaded(
    s3_bucket: str, held_proxy: Any, tmp_path: Path
) -> None:
    """A new save renames a new file over the name; the upload under way keeps the bytes it was handed."""
    proxy = held_proxy("ep.pt", then="pass")
    source = tmp_path / "ep.pt"
    first = _random_file(source, 2 * MIB)
    transfers = Transfers(f"s3://{s3_bucket}", {"endpoint_url": proxy.endpoint}, use_procs=False)
    transfers.upload("run/ep.pt", str(source))
    assert proxy.held.wait(30)
    newer = tmp_path / ".ep.pt.new"
    newer.write_bytes(os.urandom(2 * MIB))
    os.replace(newer, source)
    proxy.release.set()
    transfers.close()
    assert bucket_objects(proxy.endpoint, s3_bucket)["run/ep.pt"] == first


def test_a_file_rewritten_in_place_while_uploading_fails_its_upload_loudly(
    s3_bucket: str, held_proxy: Any, tmp_path: Path
) -> None:
    """A link sees every write: a file changed in place is never reported as uploaded."""
    proxy = held_proxy("log.txt", then="pass")
    source = tmp_path / "log.txt"
    _random_file(source, MIB)
    transfers = Transfers(f"s3://{s3_bucket}", {"endpoint_url": proxy.endpoint}, use_procs=False)
    transfers.upload("run/log.txt", str(source))
    assert proxy.held.wait(30)
    with open(source, "r+b") as file:
        file.write(b"rewritten")
    proxy.release.set()
    with pytest.raises(ObjectStoreError, match="rewritten in place") as caught:
        transfers.wait()
    assert str(source) in str(caught.value) and "rename it over" in str(caught.value)
    transfers.close()


def _other_filesystem(tmp_path: Path) -> Path | None:
    """A folder on another filesystem than ``tmp_path`` (``/dev/shm`` where it is one), or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    return Path(tempfile.mkdtemp(prefix="cairn-test-staging-", dir=shm))


def test_a_staging_folder_on_another_filesystem_falls_back_to_a_copy(
    s3_env: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Across filesystems (a real one where /dev/shm is another filesystem than the test's folder; else the link
    is refused with EXDEV as it would be there), the file is copied, said once in the log, and uploaded intact."""
    staging = _other_filesystem(tmp_path)
    if staging is None:
        staging = tmp_path / "staging"
        staging.mkdir()

        def cross_device(source: str, target: str, **_: Any) -> None:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), source, None, target)

        monkeypatch.setattr("cairn.storage.transfer.os.link", cross_device)
    try:
        sources = [tmp_path / f"ep{index}.pt" for index in (1, 2)]
        contents = [_random_file(path, 3 * MIB) for path in sources]
        transfers = Transfers(f"s3://{s3_bucket}", upload_staging_folder=str(staging), use_procs=False)
        with caplog.at_level(logging.WARNING, logger="cairn"):
            for path in sources:
                transfers.upload(f"run/{path.name}", str(path))
                path.unlink()  # the copy is the upload's own
            transfers.close()
        objects = bucket_objects(s3_env, s3_bucket)
        assert [objects["run/ep1.pt"], objects["run/ep2.pt"]] == contents
        notes = [r.getMessage() for r in caplog.records if "cannot hold a hard link" in r.getMessage()]
        assert len(notes) == 1, "said once per uploader, not once per file"
        assert "another filesystem" in notes[0] and "upload_staging_folder" in notes[0]
        assert list(staging.iterdir()) == []
    finally:
        if str(staging).startswith("/dev/shm/"):
            staging.rmdir()


def _staging_folders(folder: Path) -> list[Path]:
    """The hidden staging folders an uploader made in ``folder`` (``.cairn-upload-staging.cairn-tmp-...``)."""
    return sorted(folder.glob(f".cairn-upload-staging{TEMP_MARKER}*"))


def test_with_tmpdir_on_another_filesystem_a_file_is_still_staged_by_link_beside_itself(
    held_proxy: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The temporary folder on a tmpfs (``/dev/shm`` here), the checkpoints on disk: without an
    ``upload_staging_folder``, the file is staged by hard link in a hidden folder beside it, not copied into TMPDIR;
    the folder goes when the uploader closes."""
    other_tmp = _other_filesystem(tmp_path)
    if other_tmp is None:
        pytest.skip("/dev/shm is not another filesystem than the test's folder here")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(other_tmp))
        proxy = held_proxy("ep1.pt", then="pass")
        save_folder = tmp_path / "checkpoints"
        save_folder.mkdir()
        source = save_folder / "ep1.pt"
        data = _random_file(source, 8 * MIB)
        transfers = Transfers(f"s3://{s3_bucket}", {"endpoint_url": proxy.endpoint}, use_procs=False)
        with caplog.at_level(logging.WARNING, logger="cairn"):
            transfers.upload("run/ep1.pt", str(source))
        assert proxy.held.wait(30), "the upload reached the store"
        (staging,) = _staging_folders(save_folder)
        (staged,) = _staged(staging)
        assert os.stat(staged).st_ino == os.stat(source).st_ino, "linked on the file's own filesystem, not copied"
        assert list(other_tmp.iterdir()) == [], "nothing staged in TMPDIR"
        proxy.release.set()
        transfers.close()
        assert bucket_objects(proxy.endpoint, s3_bucket)["run/ep1.pt"] == data
        assert _staging_folders(save_folder) == [], "the staging folder is removed on close"
        assert "copies" not in caplog.text
    finally:
        shutil.rmtree(other_tmp, ignore_errors=True)


def test_a_staging_folder_beside_checkpoints_is_never_taken_for_one_and_skips_sharded_folders(
    s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    """The staging folder sits in the save folder, not inside a sharded checkpoint folder (whose files are all its
    own); it is named as a temporary of this process, so the folder walk of retention, autoresume and ``cairn ckpt
    ls`` skips it, and a run starting there clears it only once this process is gone (a killed run's leftover)."""
    from cairn.atomic import WRITER_PATTERN, this_machine
    from cairn.checkpoint.folder import folder_entries
    from cairn.checkpoint.save.commit import remove_stale_temporaries

    save_folder = tmp_path / "checkpoints"
    sharded = save_folder / "ep1-ba2-rank0"
    sharded.mkdir(parents=True)
    (sharded / METADATA_FILE).write_bytes(b"stands for the folder's cairn.pt")
    shard = sharded / "__0_0.distcp"
    data = _random_file(shard, MIB)
    single = save_folder / "ep2.pt"
    _random_file(single, MIB)
    transfers = Transfers(f"s3://{s3_bucket}", use_procs=False)
    uploads = [
        transfers.upload("run/ep1-ba2-rank0/__0_0.distcp", str(shard)),
        transfers.upload("run/ep2.pt", str(single)),
    ]
    for upload in uploads:
        upload.result(timeout=60)
    (staging,) = _staging_folders(save_folder)
    assert transfers.staging_folder_for(str(shard)) == transfers.staging_folder_for(str(single)) == str(staging)
    assert sorted(p.name for p in sharded.iterdir()) == ["__0_0.distcp", METADATA_FILE], "the checkpoint is as saved"
    assert bucket_objects(s3_env, s3_bucket)["run/ep1-ba2-rank0/__0_0.distcp"] == data
    assert sorted(entry.path for entry in folder_entries(str(save_folder))) == [str(sharded), str(single)]
    writer = WRITER_PATTERN.match(staging.name.rsplit(TEMP_MARKER, 1)[1])
    assert writer is not None and writer["machine"] == this_machine() and int(writer["pid"]) == os.getpid()
    assert remove_stale_temporaries(str(save_folder)) == [], "kept while this process runs"
    transfers.wait()
    assert _staging_folders(save_folder) == [], "once every upload has finished, the empty folder goes"
    transfers.upload("run/ep2-again.pt", str(single))  # a later upload makes a new one
    transfers.close()
    assert _staging_folders(save_folder) == []
    assert bucket_objects(s3_env, s3_bucket)["run/ep2-again.pt"] == single.read_bytes()


def test_staging_a_missing_file_raises_instead_of_copying(tmp_path: Path) -> None:
    from cairn.storage.transfer import stage_file

    with pytest.raises(FileNotFoundError):
        stage_file(str(tmp_path / "missing.pt"), str(tmp_path / "staged.pt"))
    assert not (tmp_path / "staged.pt").exists()


# -- 2. retention waits for uploads ---------------------------------------------------------------------------------


class _AtFitEnd(Callback):
    """Before the saver and the uploader see FIT_END (user callbacks come first): check that the first checkpoint's
    upload was held in flight through the second save, note what the folder held, and let the proxy answer."""

    def __init__(self, proxy: HeldUploads, folder: Path) -> None:
        self.proxy, self.folder = proxy, folder
        self.seen: list[str] = []

    def fit_end(self, state: Any, logger: Any) -> None:
        assert self.proxy.held.wait(30), "ep1's upload reached the store"
        self.seen = sorted(name for name in os.listdir(self.folder) if name.startswith("ep"))
        self.proxy.release.set()


def _retention_run(bucket: str, proxy: HeldUploads, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Any:
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    watcher = _AtFitEnd(proxy, Path("run"))
    trainer = s3_run_trainer(
        "2ep",
        save_folder=f"s3://{bucket}/run",
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=1,
        callbacks=[watcher],
        **kwargs,
    )
    return trainer, watcher


@pytest.mark.parametrize("save_async", [False, True], ids=["sync", "async"])
def test_a_checkpoint_whose_upload_failed_is_kept_by_retention_as_the_error_says(
    s3_env: str, s3_bucket: str, held_proxy: Any, monkeypatch: pytest.MonkeyPatch, save_async: bool
) -> None:
    """save_num_checkpoints_to_keep=1: ep1's upload is in flight when ep2 is saved, then fails for good."""
    proxy = held_proxy("run/ep1.pt", then="503")
    trainer, watcher = _retention_run(s3_bucket, proxy, monkeypatch, save_async=save_async)
    with pytest.raises(ObjectStoreError) as caught:
        trainer.fit()
    trainer.close()
    message = str(caught.value)
    assert "ep1.pt" in message and "The local file is kept" in message
    assert "ep1.pt" in watcher.seen, "kept while its upload was in flight"
    if not save_async:  # an async ep2 may still be in its background write when FIT_END begins
        assert watcher.seen == ["ep1.pt", "ep2.pt"]
    assert sorted(os.listdir("run")) == ["ep1.pt", "ep2.pt", "latest-rank0.pt"], "kept after it failed, as promised"
    objects = bucket_objects(s3_env, s3_bucket)
    assert "run/ep1.pt" not in objects and objects["run/latest-rank0.pt.symlink"] == b"run/ep2.pt"


def test_a_checkpoint_kept_for_its_upload_is_pruned_once_uploaded(
    s3_env: str, s3_bucket: str, held_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = held_proxy("run/ep1.pt", then="pass")
    trainer, watcher = _retention_run(s3_bucket, proxy, monkeypatch)
    trainer.fit()
    trainer.close()
    assert watcher.seen == ["ep1.pt", "ep2.pt"]
    assert sorted(os.listdir("run")) == ["ep2.pt", "latest-rank0.pt"], "one kept, once every upload was verified"
    assert {"run/ep1.pt", "run/ep2.pt"} <= set(bucket_objects(s3_env, s3_bucket))


# -- 3. a failed construction leaves nothing behind -------------------------------------------------------------------


class _CloseCounter(Callback):
    def __init__(self) -> None:
        self.closed = 0

    def close(self, state: Any, logger: Any) -> None:
        self.closed += 1


def _other_shape_checkpoint(path: Path) -> str:
    """A real checkpoint of another model (a wider hidden layer): it does not fit the store tests' run."""
    other = Trainer(
        model=Classifier(TinyNet(hidden=16), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="1ba",
        device="cpu",
        progress_bar=False,
    )
    save_checkpoint(other.state, str(path))
    other.close()
    return str(path)


@pytest.mark.parametrize("failure", ["a missing load_path", "a checkpoint that does not fit"])
def test_a_trainer_whose_construction_fails_leaves_no_staging_folder_and_closes_its_callbacks(
    s3_env: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    if failure == "a missing load_path":
        load_path, error = str(tmp_path / "no-such-checkpoint.pt"), FileNotFoundError
    else:
        load_path, error = _other_shape_checkpoint(tmp_path / "other" / "small.pt"), CheckpointIncompatibleError
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    counter = _CloseCounter()
    with pytest.raises(error):
        s3_run_trainer("1ep", save_folder=f"s3://{s3_bucket}/run", load_path=load_path, callbacks=[counter])
    assert [p.name for p in private_tmp.iterdir() if p.name.startswith("cairn-upload-staging-")] == []
    assert counter.closed == 1, "the Trainer closed what it had been given, since nobody else can"


# -- 4. a store pointer is followed only to this run's own names ---------------------------------------------------


def _epochs_in_the_store(tmp_path: Path, bucket: str, run: str, epochs: int) -> None:
    folder = tmp_path / f"machine-{run}"
    folder.mkdir()
    os.chdir(folder)
    s3_run_trainer(f"{epochs}ep", save_folder=f"s3://{bucket}/{run}", save_filename="ep{epoch}.pt").fit()


@pytest.mark.parametrize(
    "pointer",
    ["other-run/ep5.pt", "other-run/run/ep5.pt", "run-b/ep5.pt", "run/sub/ep5.pt", "run/ep5.pt.tmp"],
)
def test_autoresume_never_follows_a_pointer_out_of_the_runs_own_names(
    s3_env: str, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, pointer: str
) -> None:
    """Another run's objects in the same bucket, further along, and this run's pointer made to name one of them
    (or a name beside this run's that its save_filename cannot produce): the pointer is ignored, with a warning,
    and the run resumes from its own newest checkpoint."""
    _epochs_in_the_store(tmp_path, s3_bucket, "run", 2)
    _epochs_in_the_store(tmp_path, s3_bucket, "other-run", 5)
    client = _client(s3_env)
    source = {"Bucket": s3_bucket, "Key": "other-run/ep5.pt"}
    for key in {"other-run/run/ep5.pt", "run-b/ep5.pt", "run/sub/ep5.pt", "run/ep5.pt.tmp"}:
        client.copy_object(Bucket=s3_bucket, Key=key, CopySource=source)
    client.put_object(Bucket=s3_bucket, Key="run/latest-rank0.pt.symlink", Body=pointer.encode())

    (tmp_path / "fresh").mkdir()
    os.chdir(tmp_path / "fresh")
    with caplog.at_level(logging.WARNING, logger="cairn"):
        resumed = s3_run_trainer(
            "3ep", save_folder=f"s3://{s3_bucket}/run", save_filename="ep{epoch}.pt", autoresume=True
        )
    assert resumed.state.resumed_from == f"s3://{s3_bucket}/run/ep2.pt"
    assert any("ignores the latest pointer" in r.getMessage() and pointer in r.getMessage() for r in caplog.records)
    resumed.fit()
    resumed.close()
    assert _client(s3_env).get_object(Bucket=s3_bucket, Key="run/latest-rank0.pt.symlink")["Body"].read() == (
        b"run/ep3.pt"
    )
