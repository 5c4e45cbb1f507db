"""A disk that fills up mid-write: a clear error, the earlier checkpoints intact, nothing half-written, training state
untouched. The full disk is a file-size limit (RLIMIT_FSIZE) set in a child process, so the test needs no root."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.models import Classifier
from conftest import TinyNet, make_loader

CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from cairn import Trainer
    from cairn.callbacks import CheckpointSaver
    from cairn.models import Classifier
    from conftest import TinyNet, make_loader

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    trainer = Trainer(
        model=Classifier(TinyNet(hidden=256), num_classes=3), train_dataloader=make_loader(n=32, batch_size=8),
        max_duration="2ep", load_path={checkpoint!r}, progress_bar=False, run_name="full",
    )
    before = {{k: v.clone() for k, v in trainer.state.model.state_dict().items()}}
    saver = CheckpointSaver(folder={folder!r}, filename="ep{{epoch}}-next.pt", async_save={async_save})
    report = {{}}
    try:
        saver.save(trainer.state)
        saver.fit_end(trainer.state, trainer.logger)  # an async save's failure surfaces here at the latest
    except Exception as err:
        report["error"] = type(err).__name__
        report["message"] = str(err)
        report["is_os_error"] = isinstance(err, OSError)
    after = trainer.state.model.state_dict()
    report["state_untouched"] = all(torch.equal(v, after[k]) for k, v in before.items())
    trainer.fit()  # and training goes on from the same state
    report["trained_to"] = trainer.state.timestamp.batch
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_mid_write_fails_clearly_and_loses_nothing(tmp_path: Path, async_save: bool) -> None:
    folder = tmp_path / "ckpt"
    Trainer(
        model=Classifier(TinyNet(hidden=256), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8),
        max_duration="1ep",
        save_folder=str(folder),
        save_filename="ep{epoch}.pt",
        progress_bar=False,
        run_name="full",
    ).fit()
    good = folder / "ep1.pt"
    size = good.stat().st_size
    script = tmp_path / "child.py"
    script.write_text(
        CHILD.format(
            tests=str(Path(__file__).parent),
            limit=size // 2,  # the next checkpoint stops half-way through its tensors
            checkpoint=str(good),
            folder=str(folder),
            async_save=async_save,
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] == "CheckpointWriteError" and report["is_os_error"]
    assert "disk may be full" in report["message"] and "earlier checkpoints are intact" in report["message"]
    assert report["state_untouched"] and report["trained_to"] == 8
    assert sorted(p.name for p in folder.iterdir()) == ["ep1.pt", "latest-rank0.pt"], "no partial or temporary file"
    assert read_checkpoint(str(good))["state"]["timestamp"]["epoch"] == 1, "the last good checkpoint still loads"
