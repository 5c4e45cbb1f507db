"""How a preempted run leaves: a code that tells the launcher to restart it, on the signals the cluster sends, and
only once the checkpoint of the step the signal arrived in is complete (written, uploaded) wherever it came.

Each run is a real child process that sends itself the signal from a callback at a chosen event, so the moment is
exact: at FIT_END before the saver's own FIT_END waits, or while the end-of-epoch evaluation starts.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch

from cairn import Callback, Trainer
from cairn.checkpoint import read_checkpoint
from cairn.core import State
from cairn.loggers import Logger
from cairn.models import Classifier
from conftest import TinyNet, make_loader

CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from cairn import Callback, Trainer
    from cairn.models import Classifier
    from conftest import TinyNet, make_loader

    class SignalAt(Callback):
        '''Sends this process a signal the first time `event` runs at batch `batch` (before later callbacks).'''
        def __init__(self, event, batch, signum):
            self.event, self.batch, self.signum, self.sent = event, batch, signum, False
        def run_event(self, event, state, logger):
            if not self.sent and event.value == self.event and int(state.timestamp.batch) == self.batch:
                self.sent = True
                print(f"SIGNAL at {{event.value}}, batch {{int(state.timestamp.batch)}}", flush=True)
                os.kill(os.getpid(), self.signum)
            super().run_event(event, state, logger)

    event, batch, signum, kwargs = json.loads(sys.argv[1])
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=make_loader(n=16, batch_size=4, shuffle=True), eval_dataloader=make_loader(n=8, batch_size=4),
        max_duration="2ep", seed=4, run_name="preempt", progress_bar=False, device="cpu",
        save_on_preemption=True, callbacks=SignalAt(event, batch, signum), **kwargs,
    )
    trainer.fit()
    print("FINISHED", flush=True)
    """
)


def _run_child(
    tmp_path: Path, event: str, batch: int, signum: int, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    return subprocess.run(
        [sys.executable, str(script), json.dumps([event, batch, int(signum), kwargs])],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )


def _trainer(**kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=make_loader(n=16, batch_size=4, shuffle=True),
        eval_dataloader=make_loader(n=8, batch_size=4),  # as in the child: evaluation draws a loader seed
        max_duration="2ep",
        seed=4,
        run_name="preempt",
        progress_bar=False,
        device="cpu",
        **kwargs,
    )


def _same_weights(a: Trainer, b: Trainer) -> bool:
    expected = b.state.model.state_dict()
    return all(torch.equal(v, expected[k]) for k, v in a.state.model.state_dict().items())


# -- the exit code and the signals ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signame", "options", "code"),
    [("SIGUSR2", {"preemption_signals": ["SIGTERM", "SIGUSR2"]}, 75), ("SIGTERM", {"preemption_exit_code": 42}, 42)],
    ids=["SIGUSR2-default-code", "SIGTERM-code-42"],
)
def test_a_preempted_run_exits_with_a_restart_code_on_the_configured_signals(
    tmp_path: Path, signame: str, options: dict[str, Any], code: int
) -> None:
    folder = tmp_path / "ckpt"
    done = _run_child(
        tmp_path, "batch_end", 3, signal.Signals[signame], save_folder=str(folder), save_interval="100ep", **options
    )
    assert done.returncode == code, done.stderr[-2000:]
    assert "FINISHED" not in done.stdout
    assert read_checkpoint(str(folder / "latest-rank0.pt"))["state"]["timestamp"]["batch"] == 3
    resumed = _trainer(save_folder=str(folder), save_interval="100ep", autoresume=True)
    assert resumed.state.timestamp.batch == 3


def test_the_default_exit_code_asks_for_a_restart() -> None:
    """0 reads as 'finished' to torchrun, Kubernetes Jobs and Slurm; 75 (EX_TEMPFAIL) reads as 'try again'."""
    defaults = inspect.signature(Trainer.__init__).parameters
    assert defaults["preemption_exit_code"].default == 75
    assert defaults["preemption_signals"].default == ("SIGTERM", "SIGUSR1")


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (-1, ValueError, "0 to 255"),
        (256, ValueError, "0 to 255"),
        (True, TypeError, "an int"),
        ("75", TypeError, "an int"),
        (75.0, TypeError, "an int"),
    ],
)
def test_a_bad_exit_code_is_refused_at_construction(tmp_path: Path, value: Any, error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        _trainer(save_folder=str(tmp_path), save_on_preemption=True, preemption_exit_code=value)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["SIGKILL"], "SIGKILL cannot mean preemption, because no process can catch it"),
        ([signal.SIGSTOP], "SIGSTOP cannot mean preemption"),
        ([9], "SIGKILL cannot mean preemption"),
        (["SIGCHLD"], "dataloader worker"),
        (["SIGSEGV"], "crash"),
        (["SIGNOPE"], "unknown signal name 'SIGNOPE'"),
        ([100000], "not a signal number"),
        ([], "empty"),
    ],
)
def test_a_signal_that_cannot_mean_preemption_is_refused_at_construction(
    tmp_path: Path, value: Any, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        _trainer(save_folder=str(tmp_path), save_on_preemption=True, preemption_signals=value)


@pytest.mark.parametrize("value", [None, 3.5, [["SIGTERM"]], [True]])
def test_a_signal_of_the_wrong_type_is_refused(tmp_path: Path, value: Any) -> None:
    with pytest.raises(TypeError, match="preemption_signals"):
        _trainer(save_folder=str(tmp_path), save_on_preemption=True, preemption_signals=value)


@pytest.mark.parametrize("value", ["USR2", "sigusr2", int(signal.SIGUSR2), signal.SIGUSR2, ["SIGUSR2", "SIGUSR2"]])
def test_signals_may_be_named_numbered_or_given_alone(tmp_path: Path, value: Any) -> None:
    trainer = _trainer(save_folder=str(tmp_path), save_on_preemption=True, preemption_signals=value)
    assert trainer._preemption is not None and trainer._preemption.signals == (signal.SIGUSR2,)


def test_exit_code_zero_is_allowed_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _trainer(save_folder=str(tmp_path), save_on_preemption=True, preemption_exit_code=0)
    assert "will not restart" in caplog.text


@pytest.mark.parametrize("options", [{"preemption_exit_code": 42}, {"preemption_signals": ["SIGUSR2"]}])
def test_preemption_options_without_save_on_preemption_are_refused(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="save_on_preemption=True"):
        _trainer(save_folder=str(tmp_path), **options)


class HandlersAtFitEnd(Callback):
    def fit_end(self, state: State, logger: Logger) -> None:
        self.usr2, self.term = signal.getsignal(signal.SIGUSR2), signal.getsignal(signal.SIGTERM)


def test_the_configured_signals_are_watched_through_fit_end_and_then_given_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGUSR2)
    look = HandlersAtFitEnd()
    trainer = _trainer(
        save_folder=str(tmp_path), save_on_preemption=True, preemption_signals=["SIGUSR2"], callbacks=look
    )
    trainer.fit()
    assert look.usr2 not in (before, signal.SIG_DFL), "SIGUSR2 is watched through FIT_END"
    assert look.term == signal.getsignal(signal.SIGTERM), "SIGTERM is left alone when not asked for"
    assert signal.getsignal(signal.SIGUSR2) is before


# -- a signal during FIT_END: its waits finish, then the process exits -------------------------------------------


@pytest.mark.slow
def test_sigterm_during_fit_end_lets_the_last_async_write_finish(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    done = _run_child(
        tmp_path, "fit_end", 8, signal.SIGTERM, save_folder=str(folder), save_filename="ba{batch}.pt", save_async=True
    )
    assert done.returncode == 75, f"killed instead of finishing FIT_END: {done.returncode} {done.stderr[-2000:]}"
    assert "SIGNAL at fit_end, batch 8" in done.stdout and "FINISHED" not in done.stdout
    assert read_checkpoint(str(folder / "ba8.pt"))["state"]["timestamp"]["batch"] == 8
    assert os.path.realpath(folder / "latest-rank0.pt") == str((folder / "ba8.pt").resolve())


@pytest.mark.slow
def test_sigterm_during_fit_end_lets_the_last_upload_finish(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str
) -> None:
    env = {**os.environ, "S3_ENDPOINT_URL": moto_endpoint}
    done = _run_child(
        tmp_path,
        "fit_end",
        8,
        signal.SIGTERM,
        env=env,
        save_folder=f"s3://{s3_bucket}/checkpoints",
        save_filename="ep{epoch}.pt",
    )
    assert done.returncode == 75, f"killed instead of finishing FIT_END: {done.returncode} {done.stderr[-2000:]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    assert keys == ["checkpoints/ep1.pt", "checkpoints/ep2.pt", "checkpoints/latest-rank0.pt.symlink"]
    pointer = client.get_object(Bucket=s3_bucket, Key="checkpoints/latest-rank0.pt.symlink")["Body"].read()
    assert pointer == b"checkpoints/ep2.pt"


# -- a signal between steps: the checkpoint holds exactly the batches trained when it came ------------------------


@pytest.fixture(scope="module")
def uninterrupted() -> Trainer:
    whole = _trainer()
    whole.fit()
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("event", ["eval_start", "epoch_checkpoint", "epoch_start"])
def test_a_signal_at_the_end_of_an_epoch_stops_before_another_batch(
    tmp_path: Path, event: str, uninterrupted: Trainer
) -> None:
    """The end-of-epoch evaluation and checkpoint, and the next EPOCH_START, are not a step: no batch follows."""
    folder = tmp_path / "ckpt"
    saving = {"save_folder": str(folder), "save_interval": "100ep", "save_filename": "ba{batch}.pt"}
    done = _run_child(tmp_path, event, 4, signal.SIGTERM, **saving)
    assert f"SIGNAL at {event}, batch 4" in done.stdout, done.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["ba4.pt", "latest-rank0.pt"], "no batch after the signal"
    assert done.returncode == 75, done.stderr[-2000:]

    resumed = _trainer(autoresume=True, **saving)
    assert resumed.state.timestamp.batch == 4
    resumed.fit()
    assert _same_weights(resumed, uninterrupted)
