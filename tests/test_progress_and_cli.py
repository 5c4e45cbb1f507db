"""What a person sees: the progress bar, the demo, and the console command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cairn
from cairn import Trainer
from cairn.models import Classifier
from conftest import TinyNet, make_loader

BIN = Path(sys.executable).parent


def _fit(progress_bar: bool) -> None:
    Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=32),
        eval_dataloader=make_loader(n=16),
        max_duration="2ep",
        progress_bar=progress_bar,
    ).fit()


def test_progress_bar_shows_epoch_batches_loss_and_speed(capsys: pytest.CaptureFixture[str]) -> None:
    _fit(progress_bar=True)
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    assert "4/4" in err
    assert re.search(r"loss=\d+\.\d{4}", err)
    assert re.search(r"ba/s", err) and re.search(r"sp/s=\d+", err)
    assert re.search(r"eval MulticlassAccuracy=\d\.\d{4}", err)


def test_progress_bar_can_be_turned_off(capsys: pytest.CaptureFixture[str]) -> None:
    _fit(progress_bar=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)


def test_console_script_prints_versions() -> None:
    result = _run(str(BIN / "cairn"), "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cairn {cairn.__version__} (torch ")


def test_console_script_help_shows_examples() -> None:
    result = _run(str(BIN / "cairn"), "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "cairn demo" in result.stdout


@pytest.mark.slow
def test_demo_survives_a_kill_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    result = _run(sys.executable, "-m", "cairn.demo", "--epochs", "3", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "the training process died at epoch 2, batch 22/45 (killed by SIGKILL)" in out
    assert f"resuming from {tmp_path}/interrupted/ep1-ba45-rank0.pt (epoch 1, batch 45)" in out
    accuracies = [float(a) for a in re.findall(r"^epoch \d: test accuracy (\d+\.\d+)%$", out, re.M)]
    assert len(accuracies) == 1 + 2 + 3  # killed run, resumed run, uninterrupted run
    assert accuracies[-1] > 90.0
    assert "final weights equal the uninterrupted run's: yes, bit for bit" in out
    assert "epoch 3/3" in result.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == [
        "ep1-ba45-rank0.pt",
        "ep2-ba90-rank0.pt",
        "ep3-ba135-rank0.pt",
        "latest-rank0.pt",
    ]


@pytest.mark.slow
def test_demo_through_the_console_script_without_progress_bars(tmp_path: Path) -> None:
    result = _run(str(BIN / "cairn"), "demo", "--epochs", "2", "--no-progress", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "epoch 2: test accuracy" in result.stdout
    assert "ba/s" not in result.stderr


def _trainer(max_duration: str, **kwargs: object) -> Trainer:
    import torch

    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=make_loader(n=32, shuffle=True),
        max_duration=max_duration,
        seed=9,
        progress_bar=False,
        **kwargs,
    )


def test_convert_a_single_file_to_a_sharded_folder_and_back(tmp_path: Path) -> None:
    import torch

    from cairn.checkpoint import read_checkpoint

    whole = _trainer("4ep")
    whole.fit()
    _trainer("2ep", save_folder=str(tmp_path), save_filename="ep{epoch}.pt").fit()
    sharded, back = tmp_path / "ep2-sharded", tmp_path / "ep2-back.pt"
    for source, form, out in ((tmp_path / "ep2.pt", "sharded", sharded), (sharded, "single-file", back)):
        result = _run(str(BIN / "cairn"), "ckpt", "convert", str(source), "--to", form, str(out))
        assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(sharded)) == [".metadata", "__0_0.distcp", "cairn.pt"]
    original, returned = read_checkpoint(str(tmp_path / "ep2.pt")), read_checkpoint(str(back))
    assert all(torch.equal(v, returned["state"]["model"][k]) for k, v in original["state"]["model"].items())

    resumed = _trainer("4ep", load_path=str(sharded))  # the folder resumes, optimizer state and all
    resumed.fit()
    expected = whole.state.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state.model.state_dict().items())

    again = _run(str(BIN / "cairn"), "ckpt", "convert", str(back), "--to", "sharded", str(sharded))
    assert again.returncode == 1 and "already exists" in again.stderr
