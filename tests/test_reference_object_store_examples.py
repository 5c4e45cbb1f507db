"""The reference guide's object-store examples, run with ``cairn`` where the guide says ``composer``.

Each example runs nearly verbatim against a real server on 127.0.0.1 (see ``tests/store_servers``): moto's S3
server for S3, for S3-compatible stores such as CoreWeave, for GCS's HMAC (S3-compatible) path and for Libcloud's
``s3`` driver; gcp-storage-emulator for GCS's native path; and the OCI stand-in for OCI. The URI examples name no
endpoint and no credentials, as a user's would: the environment supplies them, as it would on a real cluster
(``AWS_ENDPOINT_URL_S3`` for boto3, ``S3_ENDPOINT_URL`` as in the CoreWeave example, ``GCS_KEY``/``GCS_SECRET`` with
``GCS_ENDPOINT_URL``, ``STORAGE_EMULATOR_HOST``, ``OCI_CONFIG_FILE`` with ``OCI_ENDPOINT_URL``). The Libcloud
examples pass moto's key and secret where the guide has placeholders, plus ``host``/``port``/``secure``.

The asserts check what the guide says happens, reading each bucket with the store's own client rather than cairn's:
the objects' names (``checkpoints/ep3.pt`` for the third epoch), the local copies gone with
``save_num_checkpoints_to_keep=0``, and a loaded trainer that starts at the checkpoint's epoch and trains to 10.

Bucket names are the guide's. ``my_bucket`` has an underscore, which AWS S3 refuses in new bucket names (GCS and
OCI allow it); moto's server accepts it, so the examples keep it as written.
"""

from __future__ import annotations

import abc
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cairn.models import Classifier
from cairn.trainer import Trainer
from store_servers.azurite import moto_provider_kwargs
from store_servers.moto import CREDENTIALS
from store_servers.oci import OCIStandIn

_STORE_VARIABLES = (
    "S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GCS_KEY",
    "GCS_SECRET",
    "GCS_ENDPOINT_URL",
    "OCI_CONFIG_FILE",
    "OCI_ENDPOINT_URL",
)


class Model(nn.Module):
    """The user's own network, small enough that ten epochs take a moment."""

    def __init__(self, num_channels: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(num_channels, 16), nn.ReLU())
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def moto_address(moto_endpoint: str) -> dict[str, Any]:
    """Where moto listens, as Libcloud's S3 driver takes it (``host``, ``port``, ``secure``)."""
    return {k: v for k, v in moto_provider_kwargs(moto_endpoint).items() if k in ("host", "port", "secure")}


def make_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)  # 4 batches per epoch


@pytest.fixture(autouse=True)
def in_tmp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each example in its own folder, with no store setting left over from the shell or another test."""
    monkeypatch.chdir(tmp_path)
    for name in _STORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def model() -> Classifier:
    return Classifier(Model(), num_classes=3)


@pytest.fixture
def train_dataloader() -> DataLoader:
    return make_loader()


# -- the stores, as the tests see them: each through its own client, not cairn's ---------------------------------


class Bucketeer(abc.ABC):
    """Makes a bucket empty (creating it when missing), puts a file in it, and reads everything back."""

    @abc.abstractmethod
    def fresh(self, bucket: str) -> None: ...

    @abc.abstractmethod
    def put(self, bucket: str, name: str, filename: Path) -> None: ...

    @abc.abstractmethod
    def objects(self, bucket: str) -> dict[str, bytes]: ...


class MotoBuckets(Bucketeer):
    def __init__(self, endpoint: str) -> None:
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def fresh(self, bucket: str) -> None:
        try:
            self.client.create_bucket(Bucket=bucket)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for key in self.objects(bucket):
            self.client.delete_object(Bucket=bucket, Key=key)

    def put(self, bucket: str, name: str, filename: Path) -> None:
        self.client.upload_file(str(filename), bucket, name)

    def objects(self, bucket: str) -> dict[str, bytes]:
        listed = self.client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {item["Key"]: self.client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


class StandInBuckets(Bucketeer):
    def __init__(self, server: OCIStandIn, config: dict[str, str]) -> None:
        import oci

        self.server = server
        self.client = oci.object_storage.ObjectStorageClient(config, service_endpoint=server.endpoint)

    def fresh(self, bucket: str) -> None:
        with self.server.lock:
            self.server.buckets.pop(bucket, None)
        self.server.create_bucket(bucket)

    def put(self, bucket: str, name: str, filename: Path) -> None:
        self.client.put_object(self.server.namespace, bucket, name, filename.read_bytes())

    def objects(self, bucket: str) -> dict[str, bytes]:
        with self.server.lock:
            return {name: stored.data for name, stored in self.server.buckets[bucket].objects.items()}


class EmulatorBuckets(Bucketeer):
    def __init__(self) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.client = storage.Client(project="cairn-emulator", credentials=AnonymousCredentials())

    def fresh(self, bucket: str) -> None:
        found = self.client.lookup_bucket(bucket)
        if found is None:
            self.client.create_bucket(bucket)
            return
        for blob in self.client.list_blobs(bucket):
            blob.delete()

    def put(self, bucket: str, name: str, filename: Path) -> None:
        self.client.bucket(bucket).blob(name).upload_from_filename(str(filename))

    def objects(self, bucket: str) -> dict[str, bytes]:
        return {blob.name: blob.download_as_bytes() for blob in self.client.list_blobs(bucket)}


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Bucketeer:
    """S3 as a user of AWS has it: boto3 finds credentials and endpoint in its own configuration (here: env vars)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)
    return MotoBuckets(moto_endpoint)


@pytest.fixture
def moto(moto_endpoint: str) -> Bucketeer:
    """moto with no endpoint in the environment: the example that uses it sets one itself."""
    return MotoBuckets(moto_endpoint)


@pytest.fixture
def oci_env(
    oci_server: OCIStandIn,
    oci_config: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Bucketeer:
    """An OCI config file, as ``oci setup config`` writes one, found through OCI_CONFIG_FILE; the stand-in's
    address through OCI_ENDPOINT_URL (a real config's region picks the real service's address)."""
    config_file = tmp_path_factory.mktemp("oci-home") / "config"
    config_file.write_text("[DEFAULT]\n" + "".join(f"{key}={value}\n" for key, value in oci_config.items()))
    monkeypatch.setenv("OCI_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("OCI_ENDPOINT_URL", oci_server.endpoint)
    return StandInBuckets(oci_server, oci_config)


@pytest.fixture(params=["hmac", "native"])
def gcs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Bucketeer:
    """GCS both ways cairn speaks it: HMAC keys (GCS_KEY/GCS_SECRET) through the S3-compatible XML API, here moto
    at GCS_ENDPOINT_URL; or google-cloud-storage, here on the emulator at STORAGE_EMULATOR_HOST."""
    if request.param == "hmac":
        endpoint = request.getfixturevalue("moto_endpoint")
        monkeypatch.setenv("GCS_KEY", CREDENTIALS["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("GCS_SECRET", CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        monkeypatch.setenv("GCS_ENDPOINT_URL", endpoint)
        return MotoBuckets(endpoint)
    request.getfixturevalue("gcs_emulator")  # sets STORAGE_EMULATOR_HOST
    return EmulatorBuckets()


# -- what the guide says happens ----------------------------------------------------------------------------------


def assert_uploaded_every_epoch_and_kept_nothing_locally(
    trainer: Trainer, objects: dict[str, bytes], folder: str = "checkpoints"
) -> None:
    """The guide: the checkpoints are in the bucket as ``checkpoints/ep3.pt`` (third epoch) and gone from disk."""
    pointer = f"{folder}/latest-rank0.pt.symlink"
    assert sorted(objects) == sorted([*(f"{folder}/ep{epoch}.pt" for epoch in range(1, 11)), pointer])
    assert objects[pointer] == f"{folder}/ep10.pt".encode()
    third = torch.load(io.BytesIO(objects[f"{folder}/ep3.pt"]), weights_only=True)
    assert third["state"]["timestamp"]["epoch"] == 3
    assert trainer.saved_checkpoints == [f"checkpoints/ep{epoch}.pt" for epoch in range(1, 11)]
    assert trainer.state.timestamp.epoch == 10
    assert os.listdir("checkpoints") == [], "save_num_checkpoints_to_keep=0 deletes each local copy once uploaded"


def first_epoch_checkpoint(tmp_path: Path) -> Path:
    """``checkpoints/ep1.pt`` as an earlier run wrote it (on disk; each test puts it in a bucket by the store's own
    client), from a model other than the one the example loads it into."""
    trainer = Trainer(
        model=Classifier(Model(), num_classes=3),
        train_dataloader=make_loader(),
        max_duration="1ep",
        save_folder=str(tmp_path / "earlier-run"),
        save_filename="ep{epoch}.pt",
        progress_bar=False,
    )
    trainer.fit()
    return tmp_path / "earlier-run" / "ep1.pt"


class ResumeCheck:
    """Before ``fit()`` the loaded trainer holds the checkpoint (epoch 1, its weights); after, it reached 10 epochs."""

    def __init__(self, checkpoint: Path, model: Classifier) -> None:
        self.weights = torch.load(checkpoint, weights_only=True)["state"]["model"]
        self.net = model.module  # the checkpoint holds the user's own network's state_dict

    def loaded(self, trainer: Trainer) -> None:
        assert trainer.state.timestamp.epoch == 1 and trainer.state.timestamp.batch == 4
        current = self.net.state_dict()
        assert all(torch.equal(current[name].cpu(), value) for name, value in self.weights.items())

    def finished(self, trainer: Trainer) -> None:
        assert trainer.state.timestamp.epoch == 10 and trainer.state.timestamp.batch == 40


# -- Uploading Checkpoints to Object Store ------------------------------------------------------------------------


def test_s3_example_uploads_each_epoch_and_deletes_the_local_copies(
    s3: Bucketeer, model: Classifier, train_dataloader: DataLoader
) -> None:
    s3.fresh("my_bucket")

    # Save checkpoints every epoch to s3://my_bucket/checkpoints
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        save_folder="s3://my_bucket/checkpoints",
        save_interval="1ep",
        save_overwrite=True,
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,  # delete all checkpoints locally
    )

    trainer.fit()

    assert_uploaded_every_epoch_and_kept_nothing_locally(trainer, s3.objects("my_bucket"))
    trainer.close()


def test_coreweave_example_reaches_the_store_named_by_s3_endpoint_url(
    moto: Bucketeer,
    moto_endpoint: str,
    model: Classifier,
    train_dataloader: DataLoader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moto.fresh("my_bucket")
    coreweave_endpoint = moto_endpoint  # the guide: 'https://object.las1.coreweave.com'

    # the guide: os.environ['S3_ENDPOINT_URL'] = ...; monkeypatch sets it the same way, and unsets it afterwards
    monkeypatch.setenv("S3_ENDPOINT_URL", coreweave_endpoint)
    from cairn.trainer import Trainer

    # Save checkpoints every epoch to s3://my_bucket/checkpoints
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        save_folder="s3://my_bucket/checkpoints",
        save_interval="1ep",
        save_overwrite=True,
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,  # delete all checkpoints locally
    )

    trainer.fit()

    assert_uploaded_every_epoch_and_kept_nothing_locally(trainer, moto.objects("my_bucket"))
    trainer.close()


def test_oci_example_uploads_each_epoch_and_deletes_the_local_copies(
    oci_env: Bucketeer, model: Classifier, train_dataloader: DataLoader
) -> None:
    oci_env.fresh("my_bucket")

    # Save checkpoints every epoch to oci://my_bucket/checkpoints
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        save_folder="oci://my_bucket/checkpoints",
        save_interval="1ep",
        save_overwrite=True,
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,  # delete all checkpoints locally
    )

    trainer.fit()

    assert_uploaded_every_epoch_and_kept_nothing_locally(trainer, oci_env.objects("my_bucket"))
    trainer.close()


def test_gcs_example_uploads_each_epoch_and_deletes_the_local_copies(
    gcs: Bucketeer, model: Classifier, train_dataloader: DataLoader
) -> None:
    gcs.fresh("my_bucket")

    # Save checkpoints every epoch to gs://my_bucket/checkpoints
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        save_folder="gs://my_bucket/checkpoints",
        save_interval="1ep",
        save_overwrite=True,
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,  # delete all checkpoints locally
    )

    trainer.fit()

    assert_uploaded_every_epoch_and_kept_nothing_locally(trainer, gcs.objects("my_bucket"))
    trainer.close()


def test_remote_uploader_downloader_example_with_libcloud_names_objects_by_run(
    moto: Bucketeer, moto_endpoint: str, model: Classifier, train_dataloader: DataLoader
) -> None:
    moto.fresh("checkpoint-debugging")
    from cairn.loggers import RemoteUploaderDownloader
    from cairn.trainer import Trainer

    remote_uploader_downloader = RemoteUploaderDownloader(
        bucket_uri="libcloud://checkpoint-debugging",
        backend_kwargs={
            "provider": "s3",  # The Apache Libcloud provider name
            "container": "checkpoint-debugging",  # The name of the cloud container (i.e. bucket) to use.
            "provider_kwargs": {  # The Apache Libcloud provider driver initialization arguments
                "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],  # The cloud provider key.
                "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],  # The cloud provider secret.
                # Any additional arguments required for the cloud provider: here, where moto listens.
                **moto_address(moto_endpoint),
            },
        },
    )

    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        save_folder="checkpoints",
        save_interval="1ep",
        save_overwrite=True,
        save_filename="ep{epoch}.pt",
        save_num_checkpoints_to_keep=0,  # delete all checkpoints locally
        loggers=[remote_uploader_downloader],
    )

    trainer.fit()

    # With a local save_folder, remote names default to {run_name}/checkpoints/<save_filename> (SPEC 4).
    assert_uploaded_every_epoch_and_kept_nothing_locally(
        trainer, moto.objects("checkpoint-debugging"), folder=f"{trainer.state.run_name}/checkpoints"
    )
    trainer.close()


# -- Loading Checkpoints from Object Store ------------------------------------------------------------------------


def libcloud_object_store(moto_endpoint: str) -> Any:
    from cairn.utils import LibcloudObjectStore

    return LibcloudObjectStore(
        provider="s3",  # The Apache Libcloud provider name
        container="checkpoint-debugging",  # The name of the cloud container (i.e. bucket) to use.
        provider_kwargs={  # The Apache Libcloud provider driver initialization arguments
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],  # The cloud provider key.
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],  # The cloud provider secret.
            # Any additional arguments required for the cloud provider: here, where moto listens.
            **moto_address(moto_endpoint),
        },
    )


@pytest.mark.parametrize("given", ["LibcloudObjectStore", "RemoteUploaderDownloader"])
def test_load_object_store_example_resumes_from_the_named_object(
    moto: Bucketeer, moto_endpoint: str, model: Classifier, train_dataloader: DataLoader, tmp_path: Path, given: str
) -> None:
    checkpoint = first_epoch_checkpoint(tmp_path)
    moto.fresh("checkpoint-debugging")
    moto.put("checkpoint-debugging", "checkpoints/ep1.pt", checkpoint)
    check = ResumeCheck(checkpoint, model)
    from cairn.loggers import RemoteUploaderDownloader
    from cairn.trainer import Trainer

    object_store = libcloud_object_store(moto_endpoint)
    if given == "RemoteUploaderDownloader":  # "you can also provide the full RemoteUploaderDownloader object"
        store_settings = {"provider": "s3", "provider_kwargs": moto_provider_kwargs(moto_endpoint)}
        object_store = RemoteUploaderDownloader("libcloud://checkpoint-debugging", backend_kwargs=store_settings)

    new_trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        load_path="checkpoints/ep1.pt",
        load_object_store=object_store,
    )
    check.loaded(new_trainer)

    new_trainer.fit()

    check.finished(new_trainer)


def test_s3_uri_load_path_example_needs_no_load_object_store(
    s3: Bucketeer, model: Classifier, train_dataloader: DataLoader, tmp_path: Path
) -> None:
    checkpoint = first_epoch_checkpoint(tmp_path)
    s3.fresh("checkpoint-debugging")
    s3.put("checkpoint-debugging", "checkpoints/ep1.pt", checkpoint)
    check = ResumeCheck(checkpoint, model)

    new_trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        load_path="s3://checkpoint-debugging/checkpoints/ep1.pt",
    )
    check.loaded(new_trainer)

    new_trainer.fit()

    check.finished(new_trainer)


def test_oci_uri_load_path_example_needs_no_load_object_store(
    oci_env: Bucketeer, model: Classifier, train_dataloader: DataLoader, tmp_path: Path
) -> None:
    checkpoint = first_epoch_checkpoint(tmp_path)
    oci_env.fresh("checkpoint-debugging")
    oci_env.put("checkpoint-debugging", "checkpoints/ep1.pt", checkpoint)
    check = ResumeCheck(checkpoint, model)

    new_trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        load_path="oci://checkpoint-debugging/checkpoints/ep1.pt",
    )
    check.loaded(new_trainer)

    new_trainer.fit()

    check.finished(new_trainer)


def test_gcs_uri_load_path_example_needs_no_load_object_store(
    gcs: Bucketeer, model: Classifier, train_dataloader: DataLoader, tmp_path: Path
) -> None:
    checkpoint = first_epoch_checkpoint(tmp_path)
    gcs.fresh("checkpoint-debugging")
    gcs.put("checkpoint-debugging", "checkpoints/ep1.pt", checkpoint)
    check = ResumeCheck(checkpoint, model)

    new_trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        load_path="gs://checkpoint-debugging/checkpoints/ep1.pt",
    )
    check.loaded(new_trainer)

    new_trainer.fit()

    check.finished(new_trainer)
