"""FsspecObjectStore: any scheme cairn has no store of its own for, through fsspec.

``az://`` runs for real through adlfs against Azurite (tests/store_servers/azurite.py), credentials from
``AZURE_STORAGE_CONNECTION_STRING`` as a user's job would have them; ``memory://`` and ``file://`` need no server.
The conformance suite every store passes (tests/test_object_stores.py, and the overwrite check of
tests/test_store_overwrite.py) runs here against all three, through the ``store`` fixture below.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cairn.errors import CheckpointNotFoundError, ObjectExistsError, ObjectNotFoundError, ObjectStoreError
from cairn.storage.base import ObjectStore, TransientStoreError
from cairn.storage.fsspec import FsspecObjectStore
from cairn.storage.uri import parse_uri, store_from_uri
from conftest import params_of, s3_run_trainer
from store_servers.azurite import AZURITE_ACCOUNT, AZURITE_KEY
from store_servers.faulty_proxy import FaultyProxy

# The conformance suite, collected again here with this module's ``store`` fixture.
from test_object_stores import (  # noqa: F401
    test_a_changed_object_fails_verification,
    test_a_large_file_survives_the_trip,
    test_a_missing_object_is_file_not_found,
    test_delete_refuses_a_name_outside_the_prefix,
    test_delete_removes_that_one_object_and_a_missing_one_is_no_error,
    test_download_does_not_replace_a_file_unless_asked,
    test_upload_list_size_download_round_trip,
    test_uploading_a_missing_file_is_refused,
)
from test_store_overwrite import test_overwrite_false_never_replaces_an_object  # noqa: F401

fsspec = pytest.importorskip("fsspec")
pytest.importorskip("adlfs")

KINDS = ["fsspec_azure", "fsspec_memory", "fsspec_file"]
WRONG_KEY = base64.b64encode(b"cairn-canary-not-the-azurite-key-42").decode()
_names = itertools.count()


def _connection_string(endpoint: tuple[str, int], key: str = AZURITE_KEY) -> str:
    host, port = endpoint
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
        f"BlobEndpoint=http://{host}:{port}/{AZURITE_ACCOUNT};"
    )


def _fresh_name() -> str:
    return f"cairn-fsspec-{os.getpid()}-{next(_names)}"  # Azure: 3 to 63 lowercase letters, digits, hyphens


@pytest.fixture
def azure_env(azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> str:
    """The variable adlfs reads, pointed at Azurite; returns a new, empty container."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(azurite_endpoint))
    container = _fresh_name()
    fsspec.filesystem("az", skip_instance_cache=True).mkdir(container)
    return container


@pytest.fixture
def fsspec_azure_store(azure_env: str) -> Iterator[FsspecObjectStore]:
    store = FsspecObjectStore(f"az://{azure_env}", prefix="conformance")
    yield store
    store.close()


@pytest.fixture
def fsspec_memory_store() -> Iterator[FsspecObjectStore]:
    bucket = _fresh_name()
    yield FsspecObjectStore(f"memory://{bucket}", prefix="conformance")
    memory = fsspec.filesystem("memory")
    if memory.exists(f"/{bucket}"):
        memory.rm(f"/{bucket}", recursive=True)


@pytest.fixture
def fsspec_file_store(tmp_path: Path) -> FsspecObjectStore:
    return FsspecObjectStore(f"file://{tmp_path}/store", prefix="conformance")


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _through(proxy: FaultyProxy) -> str:
    """The connection string that reaches Azurite through ``proxy``."""
    return _connection_string(("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1])))


def _unused_port() -> int:
    with socket.socket() as sock:  # a port that nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- URIs -----------------------------------------------------------------------------------------------------------


def test_schemes_of_our_own_stay_ours_and_the_rest_go_to_fsspec(tmp_path: Path) -> None:
    assert parse_uri(f"file://{tmp_path}/run").bucket_uri == "file://"
    assert parse_uri(f"file://{tmp_path}/run").path == f"{str(tmp_path).lstrip('/')}/run"
    store, path = store_from_uri(f"file://{tmp_path}/run")
    assert isinstance(store, FsspecObjectStore) and path == f"{str(tmp_path).lstrip('/')}/run"
    source = _file(tmp_path, "a.bin", 10)
    store.upload_object(f"{path}/a.bin", str(source))
    assert (tmp_path / "run" / "a.bin").read_bytes() == source.read_bytes()
    assert store.get_uri(f"{path}/a.bin") == f"file://{tmp_path}/run/a.bin"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("nosuch://bucket/x.pt", "unknown scheme 'nosuch'; use one of s3://, gs://, oci://, libcloud://, or a scheme"),
        ("file://host/x.pt", "three slashes, file:///absolute/path"),
        ("sftp://user:hunter2@host/x.pt", "'sftp://user:***@host/x.pt' holds a password: give credentials in"),
        ("s3://user:hunter2@host/x.pt", "'s3://user:***@host/x.pt' "),
        ("memory://bucket/x.pt?version=2", "'?' and '#' have no meaning here"),
        ("simplecache::az://container/x.pt", "chained fsspec URLs"),
    ],
)
def test_a_uri_fsspec_cannot_serve_is_refused_in_one_sentence(uri: str, words: str) -> None:
    for refused in (lambda: parse_uri(uri), lambda: store_from_uri(uri), lambda: FsspecObjectStore(uri)):
        with pytest.raises(ValueError) as excinfo:
            refused()
        message = str(excinfo.value)
        assert words in message and "\n" not in message and "hunter2" not in message


def test_a_scheme_whose_package_is_missing_names_what_to_install() -> None:
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(
        ImportError, match=r"^'gcs://bucket/x\.pt': gcs:// needs the package 'gcsfs'.*pip install gcsfs"
    ):
        parse_uri("gcs://bucket/x.pt")


def test_importing_cairn_utils_needs_no_fsspec() -> None:
    code = (
        "import sys, cairn.utils, cairn.storage\n"
        "from cairn.utils.object_store import FsspecObjectStore\n"
        "assert FsspecObjectStore is cairn.utils.FsspecObjectStore is cairn.storage.FsspecObjectStore\n"
        "print(sorted(m for m in ('fsspec', 'adlfs', 'azure') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- Azure through adlfs, against Azurite ---------------------------------------------------------------------------


def test_storage_options_reach_the_filesystem(
    azure_env: str, azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    options = {"storage_options": {"connection_string": _connection_string(azurite_endpoint)}}
    store, path = store_from_uri(f"az://{azure_env}/runs/one", options)
    source = _file(tmp_path, "ckpt.pt", 5000)
    store.upload_object(f"{path}/ckpt.pt", str(source))
    assert store.list_objects(path) == ["runs/one/ckpt.pt"]
    assert store.get_uri(f"{path}/ckpt.pt") == f"az://{azure_env}/runs/one/ckpt.pt"
    store.close()


def test_no_credentials_at_all_is_a_cairn_error_that_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCOUNT_NAME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ObjectStoreError, match="set AZURE_STORAGE_CONNECTION_STRING"):
        FsspecObjectStore("az://container")


def test_a_missing_container_is_an_error_that_names_it(azure_env: str, tmp_path: Path) -> None:
    store = FsspecObjectStore("az://no-such-container")
    source = _file(tmp_path, "a.bin", 100)
    for attempt in (
        lambda: store.list_objects(""),
        lambda: store.upload_object("a.bin", str(source)),
        lambda: store.upload_object("a.bin", str(source), overwrite=False),
        lambda: store.get_object_size("a.bin"),
        lambda: store.download_object("a.bin", str(tmp_path / "out.bin")),
    ):
        with pytest.raises(ObjectStoreError, match="container 'no-such-container' does not exist") as excinfo:
            attempt()
        assert not isinstance(excinfo.value, ObjectNotFoundError)  # a wrong setting, not a missing checkpoint
    assert not (tmp_path / "out.bin").exists()
    store.close()


def test_refused_credentials_are_a_cairn_error_without_the_secret(
    azure_env: str,
    azurite_endpoint: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = _connection_string(azurite_endpoint, WRONG_KEY)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", wrong)
    stores = [FsspecObjectStore(f"az://{azure_env}")]  # the key from the environment
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    stores.append(FsspecObjectStore(f"az://{azure_env}", storage_options={"connection_string": wrong}))
    source = _file(tmp_path, "a.bin", 100)
    for store in stores:
        for attempt in (
            lambda store=store: store.list_objects(""),
            lambda store=store: store.upload_object("a.bin", str(source)),
            lambda store=store: store.get_object_size("a.bin"),
            lambda store=store: store.download_object("a.bin", str(tmp_path / "out.bin")),
        ):
            with pytest.raises(ObjectStoreError, match="refused access.*check the credentials") as excinfo:
                attempt()
            error = excinfo.value
            assert type(error).__module__.startswith("cairn.")
            assert WRONG_KEY not in f"{error} {error!r}"
        assert WRONG_KEY not in f"{store} {store!r}"
        store.close()
    assert WRONG_KEY not in caplog.text


def test_secrets_are_scrubbed_from_whatever_a_backend_says(
    azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backends' messages have been known to echo a URL with its SAS token, or an option; none reaches cairn's."""
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(azurite_endpoint, WRONG_KEY))
    store = FsspecObjectStore("az://container", storage_options={"sas_token": "sv=2024&sig=CANARY-SAS-SIGNATURE"})
    said = OSError(f"GET https://acct/c/x?sv=2024&sig=OTHER-SIGNATURE failed; key {WRONG_KEY}, sas sig=CANARY-SAS")
    error = store._translate(said, "x")
    assert error is not None and "x" in str(error)
    for secret in (WRONG_KEY, "CANARY-SAS", "OTHER-SIGNATURE"):
        assert secret not in str(error)
    store.close()


def test_an_object_that_appears_during_the_upload_is_not_replaced(
    fsspec_azure_store: FsspecObjectStore, tmp_path: Path
) -> None:
    """adlfs writes with If-None-Match: the object another writer lands after the existence check stays."""
    theirs, ours = _file(tmp_path, "theirs.bin", 1000), _file(tmp_path, "ours.bin", 1000)
    fsspec_azure_store.upload_object("run/ep1.pt", str(theirs))  # landed between the check and our write
    with pytest.raises(ObjectExistsError, match="already exists"):
        fsspec_azure_store._upload_new(fsspec_azure_store.key("run/ep1.pt"), str(ours), None)
    fsspec_azure_store.verify_upload("run/ep1.pt", str(theirs))


@pytest.mark.parametrize("kind", ["fsspec_memory", "fsspec_file"])
def test_the_conditional_write_of_fast_stores_refuses_an_existing_object(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = request.getfixturevalue(f"{kind}_store")
    theirs, ours = _file(tmp_path, "theirs.bin", 1000), _file(tmp_path, "ours.bin", 1000)
    store.upload_object("run/ep1.pt", str(theirs))
    with pytest.raises(ObjectExistsError):
        store._upload_new(store.key("run/ep1.pt"), str(ours), None)
    store.verify_upload("run/ep1.pt", str(theirs))


def test_transient_failures_are_retried_through_a_flaky_store(
    azure_env: str, azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host, port = azurite_endpoint
    proxy = FaultyProxy(f"http://{host}:{port}", fault_rate=0.3, seed=3, stall_seconds=0.1).start()
    try:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _through(proxy))
        store = FsspecObjectStore(f"az://{azure_env}", num_attempts=5)
        for index in range(6):
            source = _file(tmp_path, f"f{index}.bin", 50_000)
            store.upload_object(f"flaky/f{index}.bin", str(source))
            store.verify_upload(f"flaky/f{index}.bin", str(source))
            store.download_object(f"flaky/f{index}.bin", str(tmp_path / f"copy{index}.bin"))
            assert (tmp_path / f"copy{index}.bin").read_bytes() == source.read_bytes()
        assert len(store.list_objects("flaky/")) == 6
        store.close()
    finally:
        proxy.stop()
    assert sum(proxy.counts[fault] for fault in ("drop", "500", "503")) >= 3, proxy.counts


def test_a_store_that_stays_down_is_retried_then_reported_quickly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(("127.0.0.1", _unused_port())))
    store = FsspecObjectStore("az://container", num_attempts=2)
    started = time.monotonic()
    with pytest.raises(ObjectStoreError, match="could not list az://container/") as excinfo:
        store.list_objects("")
    assert not isinstance(excinfo.value, ObjectNotFoundError)
    assert "attempt 1" in caplog.text
    assert time.monotonic() - started < 30, "the Azure SDK's own 15 s pauses are shortened"
    store.close()


def test_downloads_cut_short_are_tried_again_then_name_the_object(
    fsspec_azure_store: FsspecObjectStore,
    azurite_endpoint: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Azure SDK reports a cut-off download as a plain HttpResponseError raised from its IncompleteReadError:
    a transient failure all the same."""
    source = _file(tmp_path, "ckpt.pt", 200_000)
    fsspec_azure_store.upload_object("run/ckpt.pt", str(source))
    host, port = azurite_endpoint
    proxy = FaultyProxy(f"http://{host}:{port}").start()
    try:
        proxy.cut_downloads = "run/ckpt.pt"
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _through(proxy))
        store = FsspecObjectStore(f"az://{fsspec_azure_store.bucket}", prefix="conformance", num_attempts=2)
        uri = f"az://{store.bucket}/conformance/run/ckpt.pt"
        with pytest.raises(TransientStoreError, match=rf"^could not download {uri}: .*payload is not completed"):
            store.download_object("run/ckpt.pt", str(tmp_path / "out.pt"))
        store.close()
    finally:
        proxy.stop()
    assert f"could not download {uri} (attempt 1)" in caplog.text
    assert proxy.counts["cut"] >= 2, proxy.counts
    assert not (tmp_path / "out.pt").exists()


def test_an_azure_blob_sent_in_blocks_is_verified_by_its_md5_not_its_size_alone(
    fsspec_azure_store: FsspecObjectStore, tmp_path: Path
) -> None:
    """Above 64 MiB the SDK sends blocks (each checked by the service against its own MD5) and Azure keeps no MD5
    of the whole blob; the store declares the file's, so another file of the same size fails verification."""
    size = (64 << 20) + 1
    source = _file(tmp_path, "big.pt", size)
    fsspec_azure_store.upload_object("run/big.pt", str(source))
    assert fsspec_azure_store._checksum_matches("run/big.pt", str(source)) is True
    fsspec_azure_store.verify_upload("run/big.pt", str(source))
    with pytest.raises(ObjectStoreError, match="checksum mismatch"):
        fsspec_azure_store.verify_upload("run/big.pt", str(_file(tmp_path, "other.pt", size)))


def test_every_kind_lists_sizes_from_the_listing(store: ObjectStore, tmp_path: Path) -> None:
    sizes = {"run/a.pt": 10, "run/b/c.pt": 2000, "run-2/d.pt": 5}
    for name, size in sizes.items():
        store.upload_object(name, str(_file(tmp_path, name.replace("/", "-"), size)))
    assert store.list_objects_with_sizes("run/") == [("run/a.pt", 10), ("run/b/c.pt", 2000)]
    assert store.list_objects_with_sizes("run") == sorted(sizes.items())
    assert store.list_objects_with_sizes("nothing-here/") == []


def test_listing_an_azure_prefix_asks_for_no_size_blob_by_blob(
    azure_env: str, azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    host, port = azurite_endpoint
    source = _file(tmp_path, "one.bin", 10)
    direct = FsspecObjectStore(f"az://{azure_env}")
    for index in range(30):
        direct.upload_object(f"run/ep{index}.pt", str(source))
    direct.close()
    proxy = FaultyProxy(f"http://{host}:{port}").start()
    try:
        monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _through(proxy))
        store = FsspecObjectStore(f"az://{azure_env}")
        assert len(store.list_objects_with_sizes("run/ep")) == 30
        store.close()
    finally:
        proxy.stop()
    assert len(proxy.requests) <= 3, proxy.requests


# -- file:// ---------------------------------------------------------------------------------------------------------


def test_file_objects_appear_whole_and_listing_skips_an_upload_in_progress(
    fsspec_file_store: FsspecObjectStore, tmp_path: Path
) -> None:
    source = _file(tmp_path, "a.bin", 1000)
    fsspec_file_store.upload_object("run/a.bin", str(source))
    folder = tmp_path / "store" / "conformance" / "run"
    assert sorted(p.name for p in folder.iterdir()) == ["a.bin"], "no temporary left beside it"
    (folder / ".b.bin.cairn-tmp-0123abcd-42-89abcdef").write_bytes(b"half")  # another upload, under way
    assert fsspec_file_store.list_objects("run/") == ["run/a.bin"]


# -- through the Trainer ---------------------------------------------------------------------------------------------


def _on_new_machine(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another machine: an empty working directory, nothing local."""
    folder = tmp_path / name
    folder.mkdir()
    monkeypatch.chdir(folder)


def _folder_uri(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "az":
        return f"az://{request.getfixturevalue('azure_env')}/run"
    if kind == "memory":
        return f"memory://{_fresh_name()}/run"
    return f"file://{tmp_path}/store/run"


@pytest.mark.parametrize("name", ["../outside.bin", "run/../../outside.bin", "..", "/outside.bin"])
def test_a_file_store_refuses_a_name_that_leads_outside_its_root(tmp_path: Path, name: str) -> None:
    """``..`` segments would have read and written beside the store's folder; a leading ``/`` once went quietly
    inside it. Each is refused before anything is touched, in one sentence that says what a name may be."""
    (tmp_path / "store" / "root").mkdir(parents=True)
    store = FsspecObjectStore(f"file://{tmp_path}/store/root", prefix="run")
    source = _file(tmp_path, "source.bin", 100)
    (tmp_path / "store" / "outside.bin").write_bytes(b"not the store's")
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    calls = {
        "upload": lambda: store.upload_object(name, str(source)),
        "upload, overwrite=False": lambda: store.upload_object(name, str(source), overwrite=False),
        "download": lambda: store.download_object(name, str(tmp_path / "out.bin")),
        "size": lambda: store.get_object_size(name),
        "verify": lambda: store.verify_upload(name, str(source)),
    }
    for what, call in calls.items():
        with pytest.raises(ValueError, match=r"leads outside .*no leading '/' and no '\.\.' segment") as excinfo:
            call()
        assert "\n" not in str(excinfo.value), what
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before, "nothing written, inside or out"


def test_an_azure_name_with_dot_dot_is_refused_not_blamed_on_the_credentials(
    fsspec_azure_store: FsspecObjectStore, tmp_path: Path
) -> None:
    """aiohttp folds ``..`` out of the URL after the request was signed: Azure refused the signature, and the
    message sent the user to check credentials that were fine."""
    with pytest.raises(ValueError, match="leads outside"):
        fsspec_azure_store.upload_object("run/../../x.pt", str(_file(tmp_path, "x.pt", 10)))


@pytest.mark.parametrize("kind", ["az", "memory", "file"])
def test_a_run_saves_to_the_store_and_a_fresh_machine_resumes_from_it(
    kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = _folder_uri(kind, request, tmp_path)
    uninterrupted = s3_run_trainer("3ep")
    uninterrupted.fit()

    _on_new_machine(tmp_path, "machine-a", monkeypatch)
    first = s3_run_trainer("5ba", save_folder=folder, save_interval="1ba", save_num_checkpoints_to_keep=0, run_name="r")
    first.fit()
    first.close()
    store, path = store_from_uri(folder)
    assert store.list_objects(f"{path}/") == [f"{path}/ep{(b - 1) // 4}-ba{b}-rank0.pt" for b in range(1, 6)] + [
        f"{path}/latest-rank0.pt.symlink"
    ]
    pointer = tmp_path / "pointer.txt"
    store.download_object(f"{path}/latest-rank0.pt.symlink", str(pointer))
    assert pointer.read_text() == f"{path}/ep1-ba5-rank0.pt"

    _on_new_machine(tmp_path, "machine-b", monkeypatch)
    resumed = s3_run_trainer("3ep", init_seed=1, save_folder=folder, save_interval="1ba", run_name="r", autoresume=True)
    assert resumed.state.timestamp.batch == 5
    assert resumed.state.resumed_from == f"{folder}/ep1-ba5-rank0.pt"
    resumed.fit()
    resumed.close()
    expected, got = params_of(uninterrupted.state.model), params_of(resumed.state.model)
    assert all(torch.equal(expected[k], got[k]) for k in expected), "resumed from the store, bit for bit"

    _on_new_machine(tmp_path, "machine-c", monkeypatch)
    loaded = s3_run_trainer("3ep", load_path=f"{folder}/ep0-ba4-rank0.pt")
    assert loaded.state.timestamp.batch == 4
    with pytest.raises(CheckpointNotFoundError, match=f"{folder}/ep9.pt"):
        s3_run_trainer("3ep", load_path=f"{folder}/ep9.pt")
    store.close()


@pytest.mark.parametrize("use_procs", [False, pytest.param(True, marks=pytest.mark.slow)])  # processes: ~6 s
def test_an_uploader_of_your_own_reaches_azure_from_its_workers(
    azure_env: str, azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, use_procs: bool
) -> None:
    """Settings travel to the workers in backend_kwargs (the environment variable is unset here)."""
    from cairn.loggers import RemoteUploaderDownloader

    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    options = {"storage_options": {"connection_string": _connection_string(azurite_endpoint)}}
    uploader = RemoteUploaderDownloader(f"az://{azure_env}/team", backend_kwargs=options, use_procs=use_procs)
    source = _file(tmp_path, "ep1.pt", 3000)
    try:
        uploader.upload_file("run/ep1.pt", str(source), pointer_name="run/latest.symlink")
        uploader.wait()
        uploader.download_file("run/ep1.pt", str(tmp_path / "back.pt"))
    finally:
        uploader.close(None, None)  # type: ignore[arg-type]
    assert (tmp_path / "back.pt").read_bytes() == source.read_bytes()
    store = FsspecObjectStore(f"az://{azure_env}", storage_options=options["storage_options"])
    assert store.list_objects() == ["team/run/ep1.pt", "team/run/latest.symlink"]
    store.close()


def test_a_second_run_is_refused_before_training_in_an_azure_container(
    azure_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = f"az://{azure_env}/run"
    _on_new_machine(tmp_path, "machine-a", monkeypatch)
    s3_run_trainer("1ep", save_folder=folder, save_filename="ep{epoch}.pt").fit()
    _on_new_machine(tmp_path, "machine-b", monkeypatch)
    second = s3_run_trainer("1ep", init_seed=1, save_folder=folder, save_filename="ep{epoch}.pt")
    with pytest.raises(FileExistsError, match=rf"{folder}/ep1\.pt"):
        second.fit()
    assert second.state.timestamp.batch == 0


def test_a_missing_container_fails_the_run_before_training(
    azure_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = s3_run_trainer("1ep", save_folder="az://no-such-container/run")
    with pytest.raises(ObjectStoreError, match="container 'no-such-container' does not exist"):
        trainer.fit()
    assert trainer.state.timestamp.batch == 0
    trainer.close()
    with pytest.raises(ObjectStoreError, match="container 'no-such-container' does not exist"):
        s3_run_trainer("1ep", save_folder="az://no-such-container/run", run_name="r", autoresume=True)
