"""Deleting a run's old checkpoints in its object store (cairn.checkpoint.save.remote_retention), against the real
moto server: single files and sharded folders go whole, ``cairn.pt`` first; what a pointer names, another run's
objects, damaged copies and pointers never go; nothing goes before a newer checkpoint is verified; a store that
refuses is logged and the prune tried again later; a SIGKILL half-way through a folder leaves nothing a loader
takes as complete.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cairn import Trainer
from cairn.checkpoint.save.remote_retention import StoreCheckpoint, list_store_checkpoints, prune_store
from cairn.checkpoint.tools.convert import convert
from cairn.errors import CheckpointCorruptError, CheckpointNotFoundError, ObjectStoreError
from cairn.storage.s3 import S3ObjectStore
from cairn.storage.transfer import Transfers
from conftest import build_trainer, s3_run_trainer
from store_servers.faulty_proxy import FaultyProxy, _handler_for
from store_servers.moto import CREDENTIALS, bucket_objects

#: the store names of ``save_folder="s3://<bucket>/run", save_filename="ep{epoch}.pt"`` (name_pattern's form)
PATTERN = re.compile(r"run/ep(?P<epoch>\d+)\.pt\Z", re.ASCII)
POINTER = "run/latest-rank0.pt.symlink"
BEST = "run/best-rank0.pt.symlink"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def sharded_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained checkpoint as a sharded folder (one process, as ``cairn ckpt convert`` writes it)."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    build_trainer(tmp_path, save_folder=str(tmp_path / "saved"), save_filename="ep{epoch}.pt", max_duration="1ep").fit()
    folder = tmp_path / "ep1-sharded"
    convert(str(tmp_path / "saved" / "ep1.pt"), "sharded", str(folder))
    return folder


@pytest.fixture
def transfers(s3_env: str, s3_bucket: str) -> Iterator[Transfers]:
    uploads = Transfers(f"s3://{s3_bucket}", use_procs=False)
    yield uploads
    uploads.close()


def _put(store: S3ObjectStore, tmp_path: Path, name: str, data: bytes = b"checkpoint bytes") -> None:
    path = tmp_path / "put.bin"
    path.write_bytes(data)
    store.upload_object(name, str(path))


def _upload_folder(store: S3ObjectStore, folder: Path, name: str, *, complete: bool = True) -> None:
    for file in sorted(os.listdir(folder), key=lambda f: f == "cairn.pt"):  # cairn.pt last, as a save would
        if complete or file != "cairn.pt":
            store.upload_object(f"{name}/{file}", str(folder / file))


def _names(objects: dict[str, bytes]) -> set[str]:
    return set(objects)


def _a_store_of_mixed_checkpoints(transfers: Transfers, sharded_folder: Path, tmp_path: Path) -> set[str]:
    """ep1 a single file, ep2 a sharded folder, ep3 a single file (the newest, pointed at), and what is never this
    run's to delete: another run's objects, a damaged copy, the pointers, a name of another pattern. Returns the
    names of the latter, which must stay whatever happens."""
    store = transfers.store
    _put(store, tmp_path, "run/ep1.pt")
    _upload_folder(store, sharded_folder, "run/ep2.pt")
    _put(store, tmp_path, "run/ep3.pt")
    _put(store, tmp_path, POINTER, b"run/ep3.pt")
    never = {
        "other-run/ep1.pt",
        "run/ep1.pt.damaged-20261130T000000Z-ab12cd",
        "run/ep10.pt.old",
        "run/notes/ep1.pt",
        POINTER,
    }
    for name in never - {POINTER}:
        _put(store, tmp_path, name)
    return never


def test_single_files_and_sharded_folders_are_listed_and_deleted_whole(
    transfers: Transfers, sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    never = _a_store_of_mixed_checkpoints(transfers, sharded_folder, tmp_path)
    folder_files = {f"run/ep2.pt/{file}" for file in os.listdir(sharded_folder)}
    assert folder_files <= _names(bucket_objects(s3_env, s3_bucket)) and len(folder_files) >= 3

    listed = list_store_checkpoints(transfers, PATTERN, "run/", metric_of=lambda name: float(name[6]))
    assert listed == [
        StoreCheckpoint("run/ep1.pt", (1.0,), sharded=False, complete=True, metric=1.0),
        StoreCheckpoint("run/ep2.pt", (2.0,), sharded=True, complete=True, metric=2.0),
        StoreCheckpoint("run/ep3.pt", (3.0,), sharded=False, complete=True, metric=3.0),
    ]

    deleted = prune_store(
        transfers, ["run/ep1.pt", "run/ep2.pt/"], pattern=PATTERN, verified=["run/ep3.pt"], pointers=[POINTER]
    )

    assert deleted == ["run/ep1.pt", "run/ep2.pt"]
    assert _names(bucket_objects(s3_env, s3_bucket)) == never | {"run/ep3.pt"}, "every object of ep2's folder went"


def test_what_a_pointer_names_is_never_deleted(
    transfers: Transfers, sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _a_store_of_mixed_checkpoints(transfers, sharded_folder, tmp_path)
    _put(transfers.store, tmp_path, BEST, b"run/ep2.pt/")  # a folder, named with its slash
    before = bucket_objects(s3_env, s3_bucket)

    deleted = prune_store(
        transfers,
        ["run/ep2.pt", "run/ep3.pt"],
        pattern=PATTERN,
        verified=["run/ep1.pt", "run/ep2.pt", "run/ep3.pt"],
        pointers=[POINTER, BEST],
    )

    assert deleted == [] and bucket_objects(s3_env, s3_bucket) == before


def test_another_runs_objects_damaged_copies_and_pointers_are_never_deleted_whatever_is_doomed(
    transfers: Transfers, sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path, caplog: Any
) -> None:
    never = _a_store_of_mixed_checkpoints(transfers, sharded_folder, tmp_path)

    with caplog.at_level(logging.WARNING, logger="cairn"):
        deleted = prune_store(
            transfers, [*sorted(never), "/run/ep1.pt", "run/ep1.pt"], pattern=PATTERN, verified=["run/ep3.pt"]
        )

    assert deleted == ["run/ep1.pt"]
    assert never <= _names(bucket_objects(s3_env, s3_bucket))
    refused = [r.getMessage() for r in caplog.records if "not a name of this run's checkpoints" in r.getMessage()]
    assert len(refused) == len(never) + 1, refused


def test_nothing_is_deleted_until_a_newer_checkpoint_that_stays_is_verified(
    transfers: Transfers, sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _a_store_of_mixed_checkpoints(transfers, sharded_folder, tmp_path)
    before = bucket_objects(s3_env, s3_bucket)
    doomed = ["run/ep1.pt", "run/ep2.pt"]

    assert prune_store(transfers, doomed, pattern=PATTERN, verified=[]) == [], "ep3's upload still in flight"
    assert prune_store(transfers, doomed, pattern=PATTERN, verified=["run/ep1.pt"]) == [], "only older ones"
    assert prune_store(transfers, [*doomed, "run/ep3.pt"], pattern=PATTERN, verified=["run/ep3.pt"]) == [], (
        "the newer verified one is doomed itself"
    )
    assert bucket_objects(s3_env, s3_bucket) == before

    assert prune_store(transfers, ["run/ep1.pt"], pattern=PATTERN, verified=["run/ep2.pt"]) == ["run/ep1.pt"]


def test_a_folder_left_without_cairn_pt_is_listed_incomplete_and_deleted_at_the_next_prune(
    transfers: Transfers, sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    _upload_folder(transfers.store, sharded_folder, "run/ep1.pt", complete=False)
    _put(transfers.store, tmp_path, "run/ep2.pt")

    read: list[str] = []
    listed = list_store_checkpoints(transfers, PATTERN, metric_of=lambda name: read.append(name) or 0.5)
    assert [(c.name, c.sharded, c.complete, c.metric) for c in listed] == [
        ("run/ep1.pt", True, False, None),
        ("run/ep2.pt", False, True, 0.5),
    ]
    assert read == ["run/ep2.pt"], "an incomplete folder's metric is never read"
    assert prune_store(transfers, ["run/ep1.pt"], pattern=PATTERN, verified=["run/ep2.pt"]) == ["run/ep1.pt"]
    assert _names(bucket_objects(s3_env, s3_bucket)) == {"run/ep2.pt"}


# -- the store's delete itself ------------------------------------------------------------------------------------


def test_a_delete_in_a_missing_bucket_is_an_error_naming_the_object(moto_endpoint: str) -> None:
    store = S3ObjectStore("cairn-no-such-bucket", endpoint_url=moto_endpoint)
    with pytest.raises(ObjectStoreError, match=r"could not delete s3://cairn-no-such-bucket/run/ep1\.pt: the bucket"):
        store.delete_object("run/ep1.pt")
    store.close()


def test_a_delete_through_a_flaky_store_is_retried(
    faulty_proxy: FaultyProxy, s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    store = S3ObjectStore(s3_bucket, endpoint_url=moto_endpoint, num_attempts=8)
    names = [f"run/ep{epoch}.pt" for epoch in range(1, 7)]
    for name in names:
        _put(store, tmp_path, name)
    flaky = S3ObjectStore(s3_bucket, endpoint_url=faulty_proxy.endpoint, num_attempts=8)
    faulty_proxy.fault_rate = 0.5
    for name in names:
        flaky.delete_object(name)
    assert sum(faulty_proxy.counts[fault] for fault in ("drop", "500", "503", "stall")) > 0
    assert bucket_objects(moto_endpoint, s3_bucket) == {}
    store.close()
    flaky.close()


# -- a store that refuses ------------------------------------------------------------------------------------------


class _RefusingDeletes(FaultyProxy):
    """The test proxy in front of moto, answering every DELETE with S3's 403 AccessDenied while ``refusing``."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.refusing = True
        self._server.server_close()
        proxy = self

        class Handler(_handler_for(self)):  # type: ignore[misc]
            def do_DELETE(self) -> None:  # noqa: N802 - http.server's naming
                if proxy.refusing:
                    self._read_body()
                    self._answer(403, "<Error><Code>AccessDenied</Code><Message>no</Message></Error>")
                else:
                    self._relay()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)


@pytest.fixture
def refusing_proxy(moto_endpoint: str) -> Iterator[_RefusingDeletes]:
    proxy = _RefusingDeletes(moto_endpoint).start()
    yield proxy  # type: ignore[misc]
    proxy.stop()


def test_a_store_that_refuses_deletes_is_logged_and_the_run_goes_on(
    refusing_proxy: _RefusingDeletes,
    s3_bucket: str,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: Any,
) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", refusing_proxy.endpoint)
    transfers = Transfers(f"s3://{s3_bucket}", use_procs=False)
    for name in ("run/ep1.pt", "run/ep2.pt", "run/ep3.pt"):
        _put(transfers.store, tmp_path, name)
    uri = f"s3://{s3_bucket}/run/ep1.pt"
    with pytest.raises(ObjectStoreError, match=rf"could not delete {re.escape(uri)}: access denied"):
        transfers.store.delete_object("run/ep1.pt")

    with caplog.at_level(logging.WARNING, logger="cairn"):
        deleted = prune_store(transfers, ["run/ep1.pt", "run/ep2.pt"], pattern=PATTERN, verified=["run/ep3.pt"])

    assert deleted == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "the prune stops at the first refusal: the rest waits for the next one"
    assert f"could not delete {uri} from the store" in warnings[0] and "tried again at the next prune" in warnings[0]
    assert CREDENTIALS["AWS_SECRET_ACCESS_KEY"] not in caplog.text
    assert set(bucket_objects(moto_endpoint, s3_bucket)) == {"run/ep1.pt", "run/ep2.pt", "run/ep3.pt"}

    refusing_proxy.refusing = False  # the next prune, once the store allows it
    assert prune_store(transfers, ["run/ep1.pt", "run/ep2.pt"], pattern=PATTERN, verified=["run/ep3.pt"]) == [
        "run/ep1.pt",
        "run/ep2.pt",
    ]
    assert set(bucket_objects(moto_endpoint, s3_bucket)) == {"run/ep3.pt"}
    transfers.close()


def test_a_trainer_keeps_training_when_its_prune_is_refused(
    refusing_proxy: _RefusingDeletes,
    s3_bucket: str,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: Any,
) -> None:
    """Training-level code: a callback that prunes the store at every epoch's end, as the saver will, through a
    store that refuses every delete (the checkpoints of an earlier run of the pattern are doomed, so every prune
    has something to delete); the run ends normally, and nothing is gone."""
    from cairn.core import Callback, Event

    monkeypatch.setenv("S3_ENDPOINT_URL", refusing_proxy.endpoint)
    monkeypatch.chdir(tmp_path)
    transfers = Transfers(f"s3://{s3_bucket}", use_procs=False)
    for name in ("run/ep1.pt", "run/ep2.pt", "run/ep3.pt"):
        _put(transfers.store, tmp_path, name)
    pruned: list[list[str]] = []

    class PruneTheStore(Callback):
        def run_event(self, event: Event, state: Any, logger: Any) -> None:
            if event == Event.EPOCH_END:
                names = [c.name for c in list_store_checkpoints(transfers, PATTERN, "run/")]
                pruned.append(prune_store(transfers, names[:-1], pattern=PATTERN, verified=names[-1:]))

    trainer = s3_run_trainer("3ep", save_folder=f"s3://{s3_bucket}/train", save_filename="ep{epoch}.pt")
    trainer.state.callbacks.append(PruneTheStore())
    with caplog.at_level(logging.WARNING, logger="cairn"):
        trainer.fit()
    assert int(trainer.state.timestamp.epoch) == 3
    assert pruned == [[], [], []]
    assert caplog.text.count(f"could not delete s3://{s3_bucket}/run/ep1.pt from the store") == 3
    objects = set(bucket_objects(moto_endpoint, s3_bucket))
    assert {"run/ep1.pt", "run/ep2.pt", "run/ep3.pt", "train/ep1.pt", "train/ep2.pt", "train/ep3.pt"} <= objects
    transfers.close()


# -- a SIGKILL half-way through a folder ---------------------------------------------------------------------------

_PRUNE_AND_STOP_AFTER_CAIRN_PT = textwrap.dedent(
    """
    import logging, re, sys, threading
    from cairn.checkpoint.save.remote_retention import prune_store
    from cairn.storage.transfer import Transfers

    class StopAfterCairnPt(logging.Handler):
        def emit(self, record):
            if record.getMessage().endswith("/cairn.pt"):
                print("deleted cairn.pt", flush=True)
                threading.Event().wait()  # until the SIGKILL

    logger = logging.getLogger("cairn.checkpoint.save.remote_retention")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(StopAfterCairnPt())
    pattern = re.compile(r"run/ep(?P<epoch>\\d+)\\.pt\\Z", re.ASCII)
    prune_store(Transfers(sys.argv[1], use_procs=False), ["run/ep2.pt"], pattern=pattern, verified=["run/ep3.pt"])
    print("finished", flush=True)
    """
)


def _on_new_machine(tmp_path: Path, name: str) -> None:
    """Another machine: an empty working directory, nothing local, so autoresume reads the store."""
    (tmp_path / name).mkdir()
    os.chdir(tmp_path / name)


def _trainer(bucket: str, **kwargs: Any) -> Trainer:
    return s3_run_trainer("1ep", save_folder=f"s3://{bucket}/run", save_filename="ep{epoch}.pt", **kwargs)


def test_a_sigkill_half_way_through_a_folder_leaves_no_folder_a_loader_takes_as_complete(
    transfers: Transfers, sharded_folder: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    for name in ("run/ep1.pt", "run/ep2.pt", "run/ep3.pt"):
        _upload_folder(transfers.store, sharded_folder, name)
    _put(transfers.store, tmp_path, POINTER, b"run/ep3.pt")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-c", _PRUNE_AND_STOP_AFTER_CAIRN_PT, f"s3://{s3_bucket}"],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "deleted cairn.pt"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    left = {name for name in bucket_objects(s3_env, s3_bucket) if name.startswith("run/ep2.pt/")}
    assert left and "run/ep2.pt/cairn.pt" not in left, "killed after cairn.pt, before the rest"
    with pytest.raises((CheckpointNotFoundError, CheckpointCorruptError)):  # today: not found, as no cairn.pt
        _trainer(s3_bucket, load_path=f"s3://{s3_bucket}/run/ep2.pt")
    _on_new_machine(tmp_path, "resume-a")
    assert _trainer(s3_bucket, autoresume=True).state.resumed_from == f"s3://{s3_bucket}/run/ep3.pt"

    for name in [POINTER, *transfers.store.list_objects("run/ep3.pt/")]:  # the newest gone too: the one before
        transfers.store.delete_object(name)
    _on_new_machine(tmp_path, "resume-b")
    assert _trainer(s3_bucket, autoresume=True).state.resumed_from == f"s3://{s3_bucket}/run/ep1.pt"

    listed = list_store_checkpoints(transfers, PATTERN, "run/")
    assert [(c.name, c.complete) for c in listed] == [("run/ep1.pt", True), ("run/ep2.pt", False)]
    assert prune_store(transfers, ["run/ep2.pt"], pattern=PATTERN, verified=["run/ep1.pt"]) == []
    _put(transfers.store, tmp_path, "run/ep4.pt")  # a newer save, verified: the leftovers go at the next prune
    assert prune_store(transfers, ["run/ep2.pt"], pattern=PATTERN, verified=["run/ep4.pt"]) == ["run/ep2.pt"]
    assert not [name for name in bucket_objects(s3_env, s3_bucket) if name.startswith("run/ep2.pt/")]
