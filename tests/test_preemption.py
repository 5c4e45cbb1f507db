"""Preemption: a scheduler's SIGTERM (or SIGUSR1) ends the run cleanly, with a checkpoint of the step it was in."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.models import Classifier
from conftest import TinyNet, make_loader

CHILD = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    from cairn import Callback, Trainer
    from cairn.models import Classifier
    from conftest import TinyNet, make_loader

    class HoldAtBatch(Callback):
        '''Prints each batch; at batch 5 waits for the test to say go (it signals us first).'''
        def batch_end(self, state, logger):
            print(f"BATCH {{state.timestamp.batch}}", flush=True)
            if state.timestamp.batch == 5:
                sys.stdin.readline()

    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=4, shuffle=True),
        max_duration="3ep", seed=4, run_name="preempt", progress_bar=False,
        save_folder={folder!r}, save_interval="100ep", save_on_preemption=True, callbacks=HoldAtBatch(),
    )
    trainer.fit()
    print("FINISHED", flush=True)
    """
)


def _trainer(**kwargs: object) -> Trainer:
    torch.manual_seed(0)
    return Trainer(
        model=Classifier(TinyNet(dropout=0.3), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=4, shuffle=True),
        max_duration="3ep",
        seed=4,
        run_name="preempt",
        progress_bar=False,
        **kwargs,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_saves_its_step_exits_75_and_resumes_bit_for_bit(tmp_path: Path, signum: int) -> None:
    folder = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), folder=str(folder)))
    child = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdin is not None
    for line in child.stdout:
        if line.strip() == "BATCH 5":
            break
    child.send_signal(signum)  # arrives while batch 5's events run: the step is finished, then the run stops
    child.stdin.write("go\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 75, err[-2000:]  # EX_TEMPFAIL: launchers restart a run that exits non-zero
    assert "FINISHED" not in out, "the run stopped instead of training on"
    assert sorted(p.name for p in folder.iterdir()) == ["ep0-ba5-rank0.pt", "latest-rank0.pt"]
    assert read_checkpoint(str(folder / "latest-rank0.pt"))["state"]["timestamp"]["batch"] == 5

    resumed = _trainer(save_folder=str(folder), save_interval="100ep", autoresume=True)
    assert resumed.state.timestamp.batch == 5
    resumed.fit()
    whole = _trainer()
    whole.fit()
    expected = whole.state.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state.model.state_dict().items())


def test_save_on_preemption_without_a_place_to_save_is_refused() -> None:
    with pytest.raises(ValueError, match="save_folder"):
        _trainer(save_on_preemption=True)


def test_signal_handlers_are_restored_after_fit(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    _trainer(save_folder=str(tmp_path), save_on_preemption=True).fit()
    assert signal.getsignal(signal.SIGTERM) is before
