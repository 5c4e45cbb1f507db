"""Real multi-process runs: torchrun with gloo on the CPU, two ranks, driven from pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.models import Classifier
from conftest import TinyNet, make_loader

SCRIPT = Path(__file__).parent / "dist_scripts" / "train.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"

pytestmark = pytest.mark.slow


def torchrun(out: Path, *args: str, nproc: int = 2, preempted: bool = False) -> None:
    """Run the script on ``nproc`` ranks; a preempted run's workers exit 75, which torchrun reports as a failure
    (so that ``--max-restarts`` or the scheduler restarts it). Once the first worker has exited, torchrun sends the
    others SIGTERM, so only the first exit code is certain."""
    out.mkdir(parents=True, exist_ok=True)
    command = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT), "--out", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    if _aborted_at_exit_after_finishing(result, out, preempted=preempted):
        # torch/gloo's teardown race (a joinable gloo thread destroyed at interpreter exit, pytorch#190489): it
        # struck twice in ~180 launches of this suite, after training had finished; launch once more, and say so
        print(f"torchrun {' '.join(args)}: a rank aborted at exit after finishing; launching again", file=sys.stderr)
        for stale in out.iterdir():
            stale.unlink()
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == (1 if preempted else 0), output
    assert not preempted or "exitcode  : 75" in result.stderr, output


def _aborted_at_exit_after_finishing(result: subprocess.CompletedProcess[str], out: Path, *, preempted: bool) -> bool:
    """Whether the launch failed only because a rank died with SIGABRT in gloo's teardown once training was over
    (rank 0 had written its final weights), which is torch's bug, not the run's."""
    return (
        not preempted
        and result.returncode != 0
        and "terminate called without an active exception" in result.stderr
        and (out / "final.pt").exists()
    )


def _samples(path: Path) -> list[list[int]]:
    return [[int(i) for i in line.split()] for line in path.read_text().splitlines()]


def test_two_ranks_split_the_data_and_rank_zero_writes_one_checkpoint(tmp_path: Path) -> None:
    torchrun(tmp_path, "--save-folder", str(tmp_path / "ckpt"), "--max-duration", "2ep")
    rank0, rank1 = _samples(tmp_path / "samples-rank0.txt"), _samples(tmp_path / "samples-rank1.txt")
    assert len(rank0) == len(rank1) == 16  # 64 samples, 2 ranks, 4 a batch: 8 batches an epoch each
    for epoch in range(2):
        seen0 = {i for batch in rank0[epoch * 8 : (epoch + 1) * 8] for i in batch}
        seen1 = {i for batch in rank1[epoch * 8 : (epoch + 1) * 8] for i in batch}
        assert not seen0 & seen1 and seen0 | seen1 == set(range(64)), "each rank gets its own half"
    assert rank0[:8] != rank0[8:], "set_epoch reshuffles every epoch"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["ep1-ba8-rank0.pt", "ep2-ba16-rank0.pt", "latest-rank0.pt"]
    checkpoint = read_checkpoint(str(tmp_path / "ckpt" / "ep2-ba16-rank0.pt"))
    assert checkpoint["state"]["metadata"]["world_size"] == 2
    assert len(checkpoint["rng"]) == 2 and not torch.equal(checkpoint["rng"][0]["torch"], checkpoint["rng"][1]["torch"])
    TinyNet().load_state_dict(checkpoint["state"]["model"])  # no "module." from DDP

    final = torch.load(tmp_path / "final.pt", weights_only=True)
    resumed = Trainer(  # the two-rank checkpoint resumes in a single process
        model=Classifier(TinyNet(dropout=0.3)),
        train_dataloader=make_loader(),
        max_duration="3ep",
        load_path=str(tmp_path / "ckpt" / "latest-rank0.pt"),
        progress_bar=False,
    )
    assert resumed.state.timestamp.epoch == 2
    assert all(torch.equal(final[k], v) for k, v in resumed.state.model.module.state_dict().items())
    resumed.fit()


def test_two_ranks_resume_mid_epoch_bit_for_bit(tmp_path: Path) -> None:
    torchrun(tmp_path / "whole")
    folder = str(tmp_path / "ckpt")
    torchrun(tmp_path / "first", "--save-folder", folder, "--save-interval", "1ba", "--max-duration", "11ba")
    torchrun(tmp_path / "resumed", "--save-folder", folder, "--save-interval", "1ba", "--autoresume")
    assert (tmp_path / "resumed" / "timestamp.txt").read_text() == "3 24\n"
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    first_batches = _samples(tmp_path / "first" / "samples-rank1.txt")
    resumed_batches = _samples(tmp_path / "resumed" / "samples-rank1.txt")
    assert first_batches + resumed_batches == _samples(tmp_path / "whole" / "samples-rank1.txt")


@pytest.mark.parametrize("mode", [(), ("--fsdp", "--sharded")], ids=["ddp-single-file", "fsdp-sharded"])
def test_async_saves_on_two_ranks_publish_whole_checkpoints_and_resume_bit_for_bit(
    tmp_path: Path, mode: tuple[str, ...]
) -> None:
    torchrun(tmp_path / "whole", *mode)
    folder = tmp_path / "ckpt"
    saving = (*mode, "--save-folder", str(folder), "--save-interval", "1ba", "--async-save", "--keep", "2")
    torchrun(tmp_path / "first", *saving, "--max-duration", "11ba")
    assert sorted(os.listdir(folder)) == ["ep1-ba10-rank0.pt", "ep1-ba11-rank0.pt", "latest-rank0.pt"], "fit waited"
    assert read_checkpoint(str(folder / "latest-rank0.pt"))["state"]["timestamp"]["batch"] == 11
    torchrun(tmp_path / "resumed", *saving, "--autoresume")
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path: Path) -> None:
    torchrun(tmp_path / "whole")
    folder = tmp_path / "ckpt"
    saving = ("--save-folder", str(folder), "--save-interval", "100ep")
    torchrun(tmp_path / "first", *saving, "--preempt-at", "5", preempted=True)  # exits 75 on both ranks
    assert sorted(os.listdir(folder)) == ["ep0-ba5-rank0.pt", "latest-rank0.pt"]
    assert not (tmp_path / "first" / "final.pt").exists(), "fit() ended the process: nothing after it ran"
    for rank in (0, 1):
        assert len(_samples(tmp_path / "first" / f"samples-rank{rank}.txt")) == 5, "both ranks stopped at batch 5"
    torchrun(tmp_path / "resumed", *saving, "--autoresume")
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fsdp_shards_the_model_saves_full_weights_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    torchrun(tmp_path / "whole", "--fsdp")
    folder = str(tmp_path / "ckpt")
    torchrun(tmp_path / "first", "--fsdp", "--save-folder", folder, "--save-interval", "1ba", "--max-duration", "11ba")
    checkpoint = read_checkpoint(str(tmp_path / "ckpt" / "latest-rank0.pt"))
    assert checkpoint["state"]["timestamp"]["batch"] == 11
    TinyNet().load_state_dict(checkpoint["state"]["model"])  # full tensors, the network's own names
    torchrun(tmp_path / "resumed", "--fsdp", "--save-folder", folder, "--save-interval", "1ba", "--autoresume")
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)

    single = Trainer(  # and the FSDP checkpoint resumes in one process, without FSDP
        model=Classifier(TinyNet(dropout=0.3)),
        train_dataloader=make_loader(),  # other data than the ranks': its mid-epoch position cannot carry over
        max_duration="4ep",
        load_path=str(tmp_path / "ckpt" / "latest-rank0.pt"),
        load_at_epoch_boundary=True,
        progress_bar=False,
    )
    assert single.state.timestamp.batch == 24
    single.fit()


def test_sharded_checkpoints_are_folders_that_resume_bit_for_bit_and_reshard(tmp_path: Path) -> None:
    torchrun(tmp_path / "whole", "--fsdp")
    ckpt = tmp_path / "ckpt"
    sharded = ("--fsdp", "--sharded", "--save-folder", str(ckpt), "--save-interval", "1ba")
    torchrun(tmp_path / "first", *sharded, "--max-duration", "11ba", "--keep", "2")
    assert sorted(os.listdir(ckpt)) == ["ep1-ba10-rank0.pt", "ep1-ba11-rank0.pt", "latest-rank0.pt"], "whole folders"
    folder = ckpt / "ep1-ba11-rank0.pt"
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "cairn.pt"]
    assert os.readlink(ckpt / "latest-rank0.pt") == "ep1-ba11-rank0.pt"
    assert read_checkpoint(str(folder))["state"]["metadata"]["sharded"] is True

    single = Trainer(  # two ranks' shards, resharded into one plain process
        model=Classifier(TinyNet(dropout=0.3)),
        train_dataloader=make_loader(),  # other data than the ranks': its mid-epoch position cannot carry over
        max_duration="4ep",
        load_path=str(folder),
        load_at_epoch_boundary=True,
        progress_bar=False,
    )
    assert single.state.timestamp.batch == 11 and single.state.timestamp.batch_in_epoch == 0
    single.fit()

    joined = tmp_path / "joined.pt"  # and `cairn ckpt convert` joins the shards into one file for a plain module
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "cairn"),
            "ckpt",
            "convert",
            str(folder),
            "--to",
            "single-file",
            str(joined),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    converted = read_checkpoint(str(joined))
    assert list(converted["state"])[:3] == ["model", "optimizers", "schedulers"]
    net = TinyNet()
    net.load_state_dict(converted["state"]["model"])
    assert converted["state"]["timestamp"]["batch"] == 11 and len(converted["rng"]) == 2

    torchrun(tmp_path / "four", "--fsdp", "--sharded", "--load-path", str(folder), nproc=4)  # and onto four ranks
    assert (tmp_path / "four" / "timestamp.txt").read_text().split()[0] == "3"

    torchrun(tmp_path / "resumed", *sharded, "--autoresume", "--keep", "2")
    whole = torch.load(tmp_path / "whole" / "final.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "final.pt", weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), "same world size: bit for bit"


def test_the_demo_runs_under_torchrun_and_resumes(tmp_path: Path) -> None:
    def demo(epochs: int) -> str:
        command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "cairn.demo", "--epochs", str(epochs)]
        command += ["--no-progress", "--workdir", str(tmp_path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    first = demo(1)
    assert "run digits on 2 processes" in first and "started fresh" in first
    second = demo(2)
    assert f"resumed from {tmp_path}/distributed/ep1-ba23-rank0.pt" in second
    assert second.count("epoch 2: test accuracy") == 1, "rank 0 alone reports"
