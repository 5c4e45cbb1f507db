"""moto's S3 server on 127.0.0.1, started once per test session; each test gets a fresh bucket."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

_buckets = itertools.count()

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cairn-test-key", "AWS_SECRET_ACCESS_KEY": "cairn-test-secret"}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_DEFAULT_REGION")}
    os.environ.update(CREDENTIALS, AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def new_s3_bucket(endpoint: str) -> str:
    import boto3

    name = f"cairn-test-{os.getpid()}-{next(_buckets)}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    return new_s3_bucket(moto_endpoint)


@pytest.fixture
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    """``s3://`` URIs reach moto (``S3_ENDPOINT_URL``), and the test runs in its own working directory (a URI
    save_folder stages its files under the URI's path, relative to it)."""
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.chdir(tmp_path)
    return moto_endpoint


def bucket_objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object in ``bucket``, by name: what a test compares before and after a run."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.fixture
def s3_store(moto_endpoint: str, s3_bucket: str):
    from cairn.storage.s3 import S3ObjectStore

    store = S3ObjectStore(
        s3_bucket,
        prefix="conformance",
        endpoint_url=moto_endpoint,
        multipart_threshold=5 << 20,
        multipart_chunksize=5 << 20,
    )
    yield store
    store.close()
