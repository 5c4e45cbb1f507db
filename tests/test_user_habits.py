"""What a user coming from the reference types first: ``cairn.utils.checkpoint`` with ``{epoch}`` names, URIs,
``strict_model_weights`` and a callable ``ignore_keys``; ``import cairn.utils.object_store``; ``python -m cairn``;
and ``cairn ckpt ls --json`` for scripts. Real files, moto's S3 server and the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from torch import nn

import cairn
from cairn.errors import CheckpointCorruptError, CheckpointIncompatibleError, CheckpointNotFoundError
from cairn.models import Classifier
from cairn.utils.checkpoint import load_checkpoint, save_checkpoint
from conftest import TinyNet, build_trainer

BIN = Path(sys.executable).parent
CAIRN = str(BIN / "cairn")


def _run(*command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment, cwd=cwd, check=False)


def _trained(tmp_path: Path, **kwargs: Any) -> Any:
    trainer = build_trainer(tmp_path, save_folder=None, **kwargs)
    trainer.fit()
    return trainer


# -- save_checkpoint fills names ------------------------------------------------------------------------------------


def test_save_checkpoint_fills_epoch_style_names_and_returns_the_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = _trained(tmp_path, max_duration="3ba")

    written = save_checkpoint(trainer.state, "manual/{run_name}/ep{epoch}-ba{batch:03d}-rank{rank}.pt")

    assert written == "manual/run/ep0-ba003-rank0.pt"
    assert [p.name for p in (tmp_path / "manual" / "run").iterdir()] == ["ep0-ba003-rank0.pt"]
    other = build_trainer(tmp_path, save_folder=None, max_duration="5ba")
    load_checkpoint(written, other.state)
    assert other.state.timestamp.batch == 3


def test_save_checkpoint_keeps_a_plain_path_and_escaped_braces(tmp_path: Path) -> None:
    trainer = _trained(tmp_path)
    plain = tmp_path / "plain.pt"
    assert save_checkpoint(trainer.state, plain) == str(plain)
    assert save_checkpoint(trainer.state, str(tmp_path / "{{literal}}.pt")) == str(tmp_path / "{literal}.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pt", "{literal}.pt"]


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("ep{epok}.pt", "unknown variable {epok}"),
        ("ep{epoch!r}.pt", "converts"),
        ("ep{epoch}.cairn-tmp-x.pt", "marks unfinished files"),
        ("s3://bucket/ep{epoch}.pt", "writes local files"),
        ("out/bad\x1b[2J{epoch}.pt", "control character"),
    ],
)
def test_save_checkpoint_refuses_a_bad_name_before_writing(tmp_path: Path, monkeypatch, path: str, words: str) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = _trained(tmp_path)
    with pytest.raises(ValueError, match="^path=.*" + words.replace("{", r"\{").replace("}", r"\}").replace("!", ".")):
        save_checkpoint(trainer.state, path)
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_refuses_a_folder_that_is_a_file(tmp_path: Path) -> None:
    trainer = _trained(tmp_path)
    (tmp_path / "taken").write_text("notes")
    with pytest.raises(ValueError, match="is a file"):
        save_checkpoint(trainer.state, str(tmp_path / "taken" / "ep{epoch}.pt"))


# -- load_checkpoint: URIs, strict_model_weights, callable ignore_keys ----------------------------------------------


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    """A full checkpoint after 2 batches (TinyNet), saved by hand."""
    trainer = _trained(tmp_path)
    return Path(save_checkpoint(trainer.state, str(tmp_path / "saved" / "ba{batch}.pt")))


def test_load_checkpoint_takes_a_pathlib_path(checkpoint_file: Path, tmp_path: Path) -> None:
    trainer = build_trainer(tmp_path, save_folder=None, max_duration="4ba")
    load_checkpoint(checkpoint_file, trainer.state)
    assert trainer.state.timestamp.batch == 2


def test_load_checkpoint_reads_an_s3_uri_and_leaves_no_download(
    checkpoint_file: Path, s3_env: str, s3_bucket: str, tmp_path: Path, monkeypatch
) -> None:
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.upload_file(str(checkpoint_file), s3_bucket, "run/ba2.pt")
    trainer = build_trainer(tmp_path, save_folder=None, max_duration="4ba")

    content = load_checkpoint(f"s3://{s3_bucket}/run/ba2.pt", trainer.state, progress=False)

    assert trainer.state.timestamp.batch == 2 and content["state"]["timestamp"]["batch"] == 2
    assert trainer.state.resumed_from == f"s3://{s3_bucket}/run/ba2.pt"
    assert list(downloads.iterdir()) == [], "the download is deleted once read"
    trainer.fit()
    assert trainer.state.timestamp.batch == 4


def test_load_checkpoint_of_a_missing_or_damaged_object_says_so(
    checkpoint_file: Path, s3_env: str, s3_bucket: str, tmp_path: Path
) -> None:
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    data = bytearray(checkpoint_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=s3_bucket, Key="run/damaged.pt", Body=bytes(data))
    trainer = build_trainer(tmp_path, save_folder=None)
    before = {k: v.clone() for k, v in trainer.state.model.weights_module().state_dict().items()}

    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        load_checkpoint(f"s3://{s3_bucket}/run/missing.pt", trainer.state, progress=False)
    with pytest.raises(CheckpointCorruptError):
        load_checkpoint(f"s3://{s3_bucket}/run/damaged.pt", trainer.state, progress=False)

    after = trainer.state.model.weights_module().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "nothing was loaded"


class _Wider(nn.Module):
    """TinyNet with one more module: its names are missing from a TinyNet checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = TinyNet().layers
        self.extra = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.layers(x))


@pytest.mark.parametrize("keyword", ["strict_model_weights", "strict"])
def test_load_checkpoint_with_strict_model_weights_false_skips_missing_names(
    checkpoint_file: Path, tmp_path: Path, keyword: str
) -> None:
    trainer = build_trainer(tmp_path, save_folder=None, model=Classifier(_Wider()))
    with pytest.raises(CheckpointIncompatibleError):
        load_checkpoint(str(checkpoint_file), trainer.state, weights_only=True)

    load_checkpoint(str(checkpoint_file), trainer.state, weights_only=True, **{keyword: False})

    saved = torch.load(checkpoint_file, weights_only=True)["state"]["model"]
    loaded = trainer.state.model.weights_module().state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())


def test_load_checkpoint_refuses_strict_and_strict_model_weights_that_disagree(
    checkpoint_file: Path, tmp_path: Path
) -> None:
    trainer = build_trainer(tmp_path, save_folder=None)
    with pytest.raises(TypeError, match="disagree"):
        load_checkpoint(str(checkpoint_file), trainer.state, strict_model_weights=False, strict=True)
    with pytest.raises(TypeError, match="strict_model_weights='False'"):
        load_checkpoint(str(checkpoint_file), trainer.state, strict_model_weights="False")  # type: ignore[arg-type]


def test_load_checkpoint_takes_a_callable_ignore_keys(checkpoint_file: Path, tmp_path: Path) -> None:
    trainer = build_trainer(tmp_path, save_folder=None)
    seen: list[list[str]] = []

    def drop_progress(checkpoint: dict[str, Any]) -> None:
        seen.append(sorted(checkpoint))
        del checkpoint["state"]["timestamp"]

    content = load_checkpoint(str(checkpoint_file), trainer.state, ignore_keys=drop_progress)

    assert seen == [["rng", "state"]]
    assert "timestamp" not in content["state"]
    assert trainer.state.timestamp.batch == 0, "the progress was left out"
    saved = torch.load(checkpoint_file, weights_only=True)["state"]["model"]
    assert all(torch.equal(trainer.state.model.weights_module().state_dict()[k], v) for k, v in saved.items())


def test_load_checkpoint_checks_ignore_keys_before_downloading(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    trainer = build_trainer(tmp_path, save_folder=None)
    with pytest.raises(TypeError, match="^ignore_keys='state/optimizers'"):
        load_checkpoint(f"s3://{s3_bucket}/missing.pt", trainer.state, ignore_keys="state/optimizers")


# -- import paths and python -m cairn -------------------------------------------------------------------------------


def test_cairn_utils_object_store_imports_without_cloud_sdks() -> None:
    script = (
        "import sys\n"
        "import cairn.utils.object_store as object_store\n"
        "from cairn.utils.object_store import GCSObjectStore, LibcloudObjectStore, OCIObjectStore, ObjectStore\n"
        "from cairn.utils.object_store import S3ObjectStore\n"
        "import cairn.storage, cairn.utils\n"
        "assert S3ObjectStore is cairn.storage.S3ObjectStore is cairn.utils.S3ObjectStore\n"
        "assert issubclass(GCSObjectStore, ObjectStore) and ObjectStore is cairn.storage.ObjectStore\n"
        "assert sorted(object_store.__all__) == sorted(n for n in dir(object_store) if n.endswith('ObjectStore'))\n"
        "print(sorted(m for m in ('boto3', 'google.cloud.storage', 'oci', 'libcloud') if m in sys.modules))\n"
    )
    result = _run(sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_m_cairn_runs_the_console_command(tmp_path: Path) -> None:
    version = _run(sys.executable, "-m", "cairn", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"cairn {cairn.__version__} (torch {torch.__version__})\n"
    missing = _run(sys.executable, "-m", "cairn", "ckpt", "ls", "--json", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stdout == "" and missing.stderr.startswith("cairn ckpt ls: ")


# -- cairn ckpt ls --json -------------------------------------------------------------------------------------------

KEYS = [
    "name",
    "location",
    "kind",
    "size_bytes",
    "incremental",
    "own_bytes",
    "shared_bytes",
    "created_at",
    "epoch",
    "batch",
    "latest",
    "metrics",
    "kept_by",
]


def test_ls_json_lists_a_folder_newest_first_with_strings_exact(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    build_trainer(tmp_path, save_folder=str(folder), max_duration="2ep", save_interval="1ep").fit()
    hostile = "ep9\x1b]0;owned\x07\u202egp.pt"
    (folder / hostile).write_bytes(b"not a checkpoint")

    result = _run(CAIRN, "ckpt", "ls", "--json", str(folder))

    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.isascii() and "\x1b" not in result.stdout, "every string escaped by JSON"
    listing = json.loads(result.stdout)
    assert list(listing) == ["target", "checkpoints", "notes"] and listing["target"] == str(folder)
    entries = listing["checkpoints"]
    assert all(list(entry) == KEYS for entry in entries)
    full = [e for e in entries if e["kind"] == "full"]
    assert [(e["name"], e["epoch"], e["batch"]) for e in full] == [
        ("ep2-ba8-rank0.pt", 2, 8),
        ("ep1-ba4-rank0.pt", 1, 4),
    ]
    assert full[0]["latest"] == ["latest-rank0.pt"] and full[1]["latest"] == []
    assert full[0]["location"] == str(folder / "ep2-ba8-rank0.pt") and full[0]["size_bytes"] > 0
    damaged = [e for e in entries if e["kind"] == "unreadable"]
    assert [e["name"] for e in damaged] == [hostile] and damaged[0]["epoch"] is None


def test_ls_json_of_a_bucket_prefix_and_of_nothing(s3_env: str, s3_bucket: str, tmp_path: Path) -> None:
    build_trainer(tmp_path, save_folder=f"s3://{s3_bucket}/run", max_duration="2ba").fit()
    client = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="run/notes.txt", Body=b"lr sweep")
    (tmp_path / "empty").mkdir()

    remote = _run(CAIRN, "ckpt", "ls", "--json", f"s3://{s3_bucket}/run")
    empty = _run(CAIRN, "ckpt", "ls", "--json", str(tmp_path / "empty"))

    assert remote.returncode == 0, remote.stderr
    listing = json.loads(remote.stdout)
    [entry] = listing["checkpoints"]
    assert entry["name"] == "ep0-ba2-rank0.pt" and entry["location"] == f"s3://{s3_bucket}/run/ep0-ba2-rank0.pt"
    assert (entry["kind"], entry["created_at"], entry["batch"]) == ("?", None, 2)
    assert entry["latest"] == ["latest-rank0.pt"]
    assert any("1 other object(s) not listed" in note for note in listing["notes"])
    assert empty.returncode == 0 and json.loads(empty.stdout) == {
        "target": str(tmp_path / "empty"),
        "checkpoints": [],
        "notes": [],
    }


def test_ls_help_shows_the_json_example() -> None:
    result = _run(CAIRN, "ckpt", "ls", "--help")
    assert result.returncode == 0 and "cairn ckpt ls --json" in result.stdout and '"checkpoints"' in result.stdout
