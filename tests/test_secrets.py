"""Credentials stay secret: they never reach logs, error messages, progress bars, reprs or checkpoint files."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
import pytest
import torch

from cairn import Trainer
from cairn.errors import ObjectStoreError
from cairn.loggers import InMemoryLogger, RemoteUploaderDownloader
from cairn.models import Classifier
from cairn.utils import S3ObjectStore
from conftest import TinyNet, make_loader

CANARY_KEY_ID = "AKIACANARY7Q2W9XK4ZD"
CANARY_SECRET = "canary-secret-5f1e0c9b7a2d4e6f8a0b"


def _trainer(**kwargs: object) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8),
        max_duration="2ep",
        device="cpu",
        **kwargs,
    )


def test_credentials_never_reach_logs_errors_progress_bars_or_checkpoints(
    moto_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG, logger="cairn")
    credentials = {
        "endpoint_url": moto_endpoint,
        "aws_access_key_id": CANARY_KEY_ID,
        "aws_secret_access_key": CANARY_SECRET,
    }
    seen: list[str] = []

    uploader = RemoteUploaderDownloader(f"s3://{s3_bucket}/run", backend_kwargs=credentials, use_procs=False)
    metrics = InMemoryLogger()
    trainer = _trainer(loggers=[uploader, metrics], save_folder="ckpt", progress_bar=True)
    trainer.fit()
    trainer.close()
    seen += [repr(uploader), repr(metrics.hyperparameters), repr(metrics.data)]

    store = S3ObjectStore(s3_bucket, **credentials)
    seen += [repr(store), str(store.get_uri("x"))]
    store.close()

    missing = RemoteUploaderDownloader("s3://no-such-bucket-canary", backend_kwargs=credentials, use_procs=False)
    with pytest.raises(ObjectStoreError) as failure:
        _trainer(loggers=missing, save_folder="ckpt2", progress_bar=True).fit()
    seen += [str(failure.value), repr(failure.value), str(failure.value.__cause__)]

    captured = capsys.readouterr()
    seen += [captured.out, captured.err, caplog.text]
    files = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert any(key.endswith(".pt") for key in keys), "the run did upload its checkpoints"
    files += [client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() for key in keys]

    assert "epoch 1/2" in captured.err, "the progress bar was drawn"
    for text in seen:
        assert CANARY_KEY_ID not in text and CANARY_SECRET not in text, text[:500]
    for data in files:
        assert CANARY_KEY_ID.encode() not in data and CANARY_SECRET.encode() not in data
