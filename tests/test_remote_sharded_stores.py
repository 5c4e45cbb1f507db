"""Sharded checkpoint folders to and from every store, not S3 alone: GCS (gcp-storage-emulator), Azure through
``az://`` (adlfs against Azurite), Azure through Libcloud's driver (Azurite) and OCI (the stand-in server).

For each, two real ranks (torchrun, gloo, FSDP) save sharded folders into the store, each rank uploading its own
shard files and rank 0 ``cairn.pt`` last; then one plain process loads the last folder from the store, and
``cairn ckpt verify`` checks it there. A ``save_folder`` URI reaches GCS, ``az://`` and OCI (their settings come
from the environment, as on a cluster); a ``libcloud://`` store needs a provider and its arguments, which no URI
carries, so a ``RemoteUploaderDownloader`` given them takes the folders, and the load names the store itself.
The S3 store's own tests are tests/test_remote_sharded.py and tests/test_remote_sharded_cli.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import test_distributed
from cairn import Trainer
from cairn.cli.main import main as cairn_main
from cairn.models import Classifier
from cairn.storage.base import ObjectStore
from conftest import TinyNet, make_loader
from store_servers.azurite import azure_provider_kwargs
from store_servers.gcs import new_gcs_bucket
from store_servers.oci import OCIStandIn
from test_distributed import torchrun
from test_store_fsspec import _connection_string, _fresh_name

pytestmark = pytest.mark.slow

_FOLDER_FILES = [".metadata", "__0_0.distcp", "__1_0.distcp", "cairn.pt"]
_SAVES = ("--fsdp", "--sharded", "--save-interval", "1ba", "--max-duration", "2ba")
_LAST = "ep0-ba2-rank0.pt"


def _assert_whole_folders(store: ObjectStore, prefix: str) -> None:
    """Both saves' folders are in the store, each with every rank's shard files and its cairn.pt."""
    names = store.list_objects(prefix)
    folders = sorted({name.rsplit("/", 1)[0] for name in names if name.endswith("/cairn.pt")})
    assert folders == [f"{prefix}ep0-ba{batch}-rank0.pt" for batch in (1, 2)], names
    for folder in folders:
        assert sorted(name[len(folder) + 1 :] for name in names if name.startswith(folder + "/")) == _FOLDER_FILES


def _load_in_one_process(load_path: str, **kwargs: Any) -> None:
    """The two ranks' last folder, from the store, into one plain process, at the batch it was saved."""
    single = Trainer(
        model=Classifier(TinyNet(dropout=0.3)),
        train_dataloader=make_loader(),  # other data than the ranks': its mid-epoch position cannot carry over
        max_duration="1ep",
        load_path=load_path,
        load_at_epoch_boundary=True,
        progress_bar=False,
        **kwargs,
    )
    assert single.state.timestamp.batch == 2


def _ckpt(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = cairn_main(["ckpt", *args])
    out = "".join(capsys.readouterr())
    assert code == 0, out
    return out


def _verify(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``cairn ckpt show`` sees both ranks' shard files (and ``.metadata``); ``cairn ckpt verify`` checks each."""
    shown = json.loads(_ckpt(capsys, "show", "--json", target))
    assert (shown["kind"], shown["hash"]["shard_files"]) == ("sharded", 3), shown
    assert _ckpt(capsys, "verify", target).startswith("OK")


def _save_to(uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torchrun(tmp_path / "out", *_SAVES, "--save-folder", uri)


def _save_load_and_verify(
    uri: str, store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _save_to(uri, tmp_path, monkeypatch)
    _assert_whole_folders(store, "run/")
    _load_in_one_process(f"{uri}/{_LAST}")
    _verify(f"{uri}/{_LAST}", capsys)


def test_gcs_takes_sharded_folders_from_a_save_folder_uri(
    gcs_emulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cairn.storage.gcs import GCSObjectStore

    monkeypatch.delenv("GCS_KEY", raising=False)
    monkeypatch.delenv("GCS_SECRET", raising=False)
    bucket = new_gcs_bucket()
    store = GCSObjectStore(bucket)
    _save_load_and_verify(f"gs://{bucket}/run", store, tmp_path, monkeypatch, capsys)
    store.close()


@pytest.fixture
def azure_container_env(azurite_endpoint: tuple[str, int], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``AZURE_STORAGE_CONNECTION_STRING`` pointed at Azurite (for the ranks too), and a new container."""
    import fsspec

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", _connection_string(azurite_endpoint))
    container = _fresh_name()
    fsspec.filesystem("az", skip_instance_cache=True).mkdir(container)
    yield container


def test_azure_through_fsspec_takes_sharded_folders_from_a_save_folder_uri(
    azure_container_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cairn.utils import FsspecObjectStore

    store = FsspecObjectStore(f"az://{azure_container_env}")
    _save_load_and_verify(f"az://{azure_container_env}/run", store, tmp_path, monkeypatch, capsys)
    store.close()


def test_oci_takes_sharded_folders_from_a_save_folder_uri(
    oci_server: OCIStandIn,
    oci_config: dict[str, str],
    oci_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cairn.storage.oci import OCIObjectStore

    config_file = tmp_path / "oci-config"
    config_file.write_text("[DEFAULT]\n" + "".join(f"{key}={value}\n" for key, value in oci_config.items()))
    monkeypatch.setenv("OCI_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("OCI_ENDPOINT_URL", oci_server.endpoint)
    store = OCIObjectStore(oci_bucket)
    _save_load_and_verify(f"oci://{oci_bucket}/run", store, tmp_path, monkeypatch, capsys)
    store.close()


def test_azure_through_libcloud_takes_sharded_folders_through_an_uploader(
    azurite_endpoint: tuple[str, int],
    azure_container: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A local save_folder and the user's uploader, given the provider's arguments (tests/dist_scripts/
    train_with_store_arguments.py); the load names the store through ``load_object_store``, and the folder
    downloaded from it verifies (``cairn ckpt`` takes URIs alone, and a libcloud:// URI names no provider)."""
    from cairn.storage.libcloud import LibcloudObjectStore

    backend_kwargs = {"provider": "azure_blobs", "provider_kwargs": azure_provider_kwargs(azurite_endpoint)}
    monkeypatch.setenv("CAIRN_TEST_BACKEND_KWARGS", json.dumps(backend_kwargs))
    monkeypatch.setattr(test_distributed, "SCRIPT", test_distributed.SCRIPT.with_name("train_with_store_arguments.py"))
    monkeypatch.chdir(tmp_path)
    uploader = ("--uploader", f"libcloud://{azure_container}/team")
    torchrun(tmp_path / "out", *_SAVES, "--save-folder", str(tmp_path / "ckpt"), *uploader)

    store = LibcloudObjectStore("azure_blobs", azure_container, azure_provider_kwargs(azurite_endpoint), "team")
    _assert_whole_folders(store, "dist/checkpoints/")
    _load_in_one_process(f"dist/checkpoints/{_LAST}", load_object_store=store)
    downloaded = tmp_path / "downloaded" / _LAST
    downloaded.mkdir(parents=True)
    for name in _FOLDER_FILES:
        store.download_object(f"dist/checkpoints/{_LAST}/{name}", str(downloaded / name))
    _verify(str(downloaded), capsys)
    store.close()
