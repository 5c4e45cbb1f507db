"""The stores' edges (issue 16): retries that spread out after a blip, multipart uploads verified at the part size
boto3 really used, downloads that keep arriving cut off, and listings that carry their sizes.

Everything runs against the suite's real servers (moto, the GCS emulator, Azurite, the OCI stand-in), most of it
through the fault proxy, which breaks requests on purpose and records what a client really sent.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import boto3
import pytest
from tenacity import RetryCallState, Retrying

from cairn.checkpoint.tools.listing import list_remote_checkpoints
from cairn.errors import ObjectStoreError
from cairn.storage.base import ObjectStore
from cairn.storage.libcloud import LibcloudObjectStore
from cairn.storage.s3 import S3ObjectStore
from cairn.storage.settings import RETRY_FIRST_WAIT_S, RETRY_MAX_WAIT_S, retry_wait
from store_servers.faulty_proxy import FaultyProxy
from store_servers.moto import CREDENTIALS, new_s3_bucket

MiB = 1 << 20
CAIRN = str(Path(sys.executable).parent / "cairn")
STORE_KINDS = ["s3", "gcs", "gcs_hmac", "oci", "libcloud_s3", "libcloud_azure"]


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _cairn(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "S3_ENDPOINT_URL": endpoint, "NO_COLOR": "1"}
    return subprocess.run([CAIRN, *args], capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.fixture
def proxy(moto_endpoint: str) -> Any:
    proxy = FaultyProxy(moto_endpoint).start()
    yield proxy
    proxy.stop()


# -- retries with jitter (item 4) ---------------------------------------------------------------------------------


def _waits(policy: Any, attempt: int, draws: int = 200) -> list[float]:
    """What ``policy`` waits after failed attempt number ``attempt``, drawn ``draws`` times."""
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return [policy(state) for _ in range(draws)]


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 12])
def test_the_retry_policy_waits_a_random_time_within_its_window(attempt: int) -> None:
    window = min(RETRY_MAX_WAIT_S, RETRY_FIRST_WAIT_S * 2 ** (attempt - 1))
    waits = _waits(retry_wait(), attempt)
    assert all(0 <= wait <= window for wait in waits), (window, min(waits), max(waits))
    assert max(waits) - min(waits) > window / 2, "the waits spread over the window"


def test_the_uploader_retries_with_the_same_policy() -> None:
    from cairn.storage import transfer

    waits = _waits(transfer._retrying(3).wait, 2)
    assert all(0 <= wait <= 2 * RETRY_FIRST_WAIT_S for wait in waits)
    assert len(set(waits)) > 1


def test_stores_retrying_after_one_blip_do_not_retry_in_lockstep(proxy: FaultyProxy) -> None:
    """Twelve ranks hit a store that is down at the same moment; their retries reach it at spread-out times, each
    within the policy's window (libcloud's driver retries nothing itself, so every wait seen here is cairn's)."""
    proxy.down = True
    ranks, attempts = 12, 3
    host, port = proxy.endpoint.removeprefix("http://").split(":")
    kwargs = {
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "host": host,
        "port": int(port),
        "secure": False,
    }
    stores = [LibcloudObjectStore("s3", f"rank-{rank}", kwargs, num_attempts=attempts) for rank in range(ranks)]
    start, failures = threading.Barrier(ranks), []

    def rank_reads(store: LibcloudObjectStore) -> None:
        start.wait()
        try:
            store.get_object_size("ckpt.pt")
        except ObjectStoreError as error:
            failures.append(error)

    threads = [threading.Thread(target=rank_reads, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(failures) == ranks
    arrivals: dict[str, list[float]] = defaultdict(list)
    for when, _, path in proxy.requests:
        arrivals[path.lstrip("/").split("/")[0]].append(when)
    assert sorted(arrivals) == sorted(f"rank-{rank}" for rank in range(ranks))
    assert all(len(times) == attempts for times in arrivals.values()), arrivals
    first_waits = [times[1] - times[0] for times in arrivals.values()]
    second_waits = [times[2] - times[1] for times in arrivals.values()]
    slack = 0.5  # a loaded machine answers late; no wait can be shorter than the policy draws, though
    assert max(first_waits) <= RETRY_FIRST_WAIT_S + slack and max(second_waits) <= 2 * RETRY_FIRST_WAIT_S + slack
    assert min(first_waits) < RETRY_FIRST_WAIT_S, f"a fixed pause is never shorter than 0.2 s: {first_waits}"
    assert max(first_waits) - min(first_waits) > RETRY_FIRST_WAIT_S / 4, f"spread out: {first_waits}"


# -- multipart verification (item 5a) -----------------------------------------------------------------------------


def test_a_multipart_upload_with_parts_boto3_enlarged_verifies(moto_endpoint: str, tmp_path: Path) -> None:
    """1 MiB parts are below S3's 5 MiB minimum: boto3 sends 5 MiB parts, and the ETag is theirs."""
    store = S3ObjectStore(
        new_s3_bucket(moto_endpoint), endpoint_url=moto_endpoint, multipart_threshold=MiB, multipart_chunksize=MiB
    )
    source = _file(tmp_path, "big.pt", 12 * MiB + 123)
    store.upload_object("run/big.pt", str(source))
    head = store._client.head_object(Bucket=store.bucket, Key="run/big.pt")
    assert head["ETag"].strip('"').endswith("-3"), "three parts of 5 MiB, not thirteen of 1 MiB"
    store.verify_upload("run/big.pt", str(source))
    store.upload_object("run/big.pt", str(source), overwrite=False)  # "already holds exactly this file"
    other = _file(tmp_path, "other.pt", 12 * MiB + 123)
    with pytest.raises(ObjectStoreError, match="checksum mismatch"):
        store.verify_upload("run/big.pt", str(other))
    store.close()


# -- downloads that keep arriving cut off (item 5c) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short run's folder: ep1-ba4-rank0.pt and ep2-ba8-rank0.pt."""
    from conftest import s3_run_trainer

    folder = tmp_path_factory.mktemp("edges") / "run"
    s3_run_trainer("2ep", save_folder=str(folder), run_name="edges").fit()
    return folder


def _uploaded_run(moto_endpoint: str, local_run: Path) -> str:
    bucket = new_s3_bucket(moto_endpoint)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    for name in ("ep1-ba4-rank0.pt", "ep2-ba8-rank0.pt"):
        client.upload_file(str(local_run / name), bucket, f"run/{name}")
    return bucket


def test_a_download_that_keeps_arriving_cut_off_is_a_cairn_error_naming_the_object(
    proxy: FaultyProxy, tmp_path: Path
) -> None:
    bucket = new_s3_bucket(proxy.endpoint)
    store = S3ObjectStore(bucket, endpoint_url=proxy.endpoint)
    source = _file(tmp_path, "a.pt", 300_000)
    store.upload_object("run/a.pt", str(source))
    proxy.cut_downloads = "run/a.pt"
    target = tmp_path / "copy.pt"
    with pytest.raises(ObjectStoreError) as info:
        store.download_object("run/a.pt", str(target))
    message = str(info.value)
    assert f"s3://{bucket}/run/a.pt" in message and "try again" in message, message
    assert proxy.counts["cut"] >= 2, "the proxy really cut the downloads"
    assert not target.exists() and os.listdir(tmp_path) == ["a.pt"], "no partial file left behind"
    store.close()


def test_load_path_autoresume_and_show_report_a_cut_off_download_as_a_cairn_error(
    proxy: FaultyProxy, moto_endpoint: str, local_run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from conftest import s3_run_trainer

    bucket = _uploaded_run(moto_endpoint, local_run)
    proxy.cut_downloads = "ep2-ba8"
    uri = f"s3://{bucket}/run/ep2-ba8-rank0.pt"
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ObjectStoreError, match=f"{uri}.*try again"):
        s3_run_trainer("3ep", load_path=uri)
    with pytest.raises(ObjectStoreError, match=f"{uri}.*try again"):  # a fresh machine: nothing local to fall back on
        s3_run_trainer("3ep", save_folder=f"s3://{bucket}/run", run_name="edges", autoresume=True)
    shown = _cairn("ckpt", "show", uri, endpoint=proxy.endpoint)
    assert shown.returncode == 1 and "Traceback" not in shown.stderr, shown.stderr
    assert uri in shown.stderr and "try again" in shown.stderr, shown.stderr


def test_verify_of_a_prefix_reports_each_object(proxy: FaultyProxy, moto_endpoint: str, local_run: Path) -> None:
    """One object's download keeps breaking off: that one FAILED, the others still checked and OK."""
    bucket = _uploaded_run(moto_endpoint, local_run)
    proxy.cut_downloads = "ep1-ba4"
    result = _cairn("ckpt", "verify", f"s3://{bucket}/run/", endpoint=proxy.endpoint)
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert [line.split()[0] for line in lines] == ["OK", "FAILED"], lines
    assert lines[0].startswith(f"OK      s3://{bucket}/run/ep2-ba8-rank0.pt ")
    assert lines[1].startswith(f"FAILED  s3://{bucket}/run/ep1-ba4-rank0.pt: ") and "try again" in lines[1]
    assert "1 of 2 intact" in result.stderr


# -- listings carry their sizes (item 5d) -------------------------------------------------------------------------


@pytest.fixture(params=STORE_KINDS)
def any_store(request: pytest.FixtureRequest) -> ObjectStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_every_store_lists_each_objects_size(any_store: ObjectStore, tmp_path: Path) -> None:
    sizes = {"run/a.pt": 1, "run/b.pt": 1234, "run/sub/c.pt": 70_000, "other/d.pt": 5}
    for name, size in sizes.items():
        any_store.upload_object(name, str(_file(tmp_path, name.replace("/", "-"), size)))
    expected = sorted((name, size) for name, size in sizes.items() if name.startswith("run/"))
    assert any_store.list_objects_with_sizes("run/") == expected
    assert any_store.list_objects_with_sizes("nothing-here/") == []


def test_every_store_refuses_an_absolute_name(any_store: ObjectStore, tmp_path: Path) -> None:
    """A leading '/' was once stripped without a word; an absolute name has no place inside a prefix."""
    with pytest.raises(ValueError, match="leads outside .*no leading '/'"):
        any_store.upload_object("/escaped.bin", str(_file(tmp_path, "x.bin", 10)))
    with pytest.raises(ValueError, match="leads outside"):
        any_store.download_object("/escaped.bin", str(tmp_path / "out.bin"))
    assert any_store.list_objects("") == [] and not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize("kind", ["libcloud_s3", "libcloud_azure"])
@pytest.mark.parametrize("name", ["../escaped.bin", "run/../../escaped.bin", "run/.."])
def test_libcloud_refuses_dot_dot_which_its_http_client_folds_out_of_the_prefix(
    kind: str, name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """urllib3 resolves ``..`` in the request's path: ``conformance/run/../../escaped.bin`` was written as
    ``escaped.bin`` at the container's root, outside the store's prefix. Now no request is sent."""
    store = request.getfixturevalue(f"{kind}_store")
    with pytest.raises(ValueError, match="leads outside .*no '\\.\\.' segment"):
        store.upload_object(name, str(_file(tmp_path, "x.bin", 10)))
    with pytest.raises(ValueError, match="leads outside"):
        store.download_object(name, str(tmp_path / "out.bin"))
    whole = copy.copy(store)
    whole.prefix = ""  # the same container, seen from its root
    assert whole.list_objects("") == [], "nothing anywhere in the container"


@pytest.mark.parametrize("kind", ["s3", "gcs_hmac", "oci"])
def test_stores_that_keep_dot_dot_literally_keep_it_inside_the_prefix(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """S3's and OCI's requests carry a name as it is: ``run/../x`` is one more key under the prefix, listed and read
    back under that very name (the loader never lets a name choose where a download lands)."""
    store = request.getfixturevalue(f"{kind}_store")
    source = _file(tmp_path, "x.bin", 10)
    store.upload_object("run/../../x.bin", str(source))
    assert store.list_objects("") == ["run/../../x.bin"]
    store.download_object("run/../../x.bin", str(tmp_path / "out.bin"))
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()


def test_listing_a_prefix_asks_for_no_size_object_by_object(proxy: FaultyProxy, moto_endpoint: str) -> None:
    bucket = new_s3_bucket(moto_endpoint)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    names = [f"run/ep{epoch}-ba{4 * epoch}-rank0.pt" for epoch in range(1, 41)]
    for index, name in enumerate(names):
        client.put_object(Bucket=bucket, Key=name, Body=b"x" * (100 + index))
    store = S3ObjectStore(bucket, endpoint_url=proxy.endpoint)
    listing = list_remote_checkpoints(store, "run/")
    assert {entry.name: entry.size for entry in listing.entries} == {
        name.removeprefix("run/"): 100 + index for index, name in enumerate(names)
    }
    assert [method for _, method, _ in proxy.requests] == ["GET"], proxy.requests  # one listing page, nothing else
    listed = _cairn("ckpt", "ls", "--json", f"s3://{bucket}/run", endpoint=proxy.endpoint)
    assert listed.returncode == 0, listed.stderr
    assert not [request for request in proxy.requests[1:] if request[1] == "HEAD"], "no size request per object"
    assert len(json.loads(listed.stdout)["checkpoints"]) == len(names)
    store.close()
