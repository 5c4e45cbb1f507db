"""Time MosaicML Composer's own checkpoint save and resume on the shared workload; print one JSON line.

Runs in the ``composer`` peer venv (benchmarks/peers/setup.py):
``<python> benchmarks/peers/composer_driver.py --size-gib 1.0 --runs 5 --dir SCRATCH_DIR``.
Save is ``Trainer.save_checkpoint`` (the same ``checkpoint.save_checkpoint`` that its ``CheckpointSaver`` calls);
resume is ``Trainer(load_path=...)`` then ``fit()``, Composer's normal resume route. Composer loads the checkpoint
inside ``Trainer.__init__``, so the resume time includes building the Trainer (the model itself is built untimed).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import composer
import driver_common as common
import torch
from composer import Trainer
from composer.models import ComposerModel
from driver_common import workload
from torch import nn

TOOL = "composer"


class Wrapped(ComposerModel):
    """The workload's MLP as a ComposerModel; the loss is ``take_one_step``'s."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net(batch)

    def loss(self, outputs: torch.Tensor, batch: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs.pow(2).mean()


def make_trainer(model: Wrapped, optimizer: torch.optim.Optimizer, batches: int, load_path: str | None) -> Trainer:
    """A CPU trainer with everything that is not about checkpoints switched off (no eval loader: no evaluation)."""
    return Trainer(
        model=model,
        train_dataloader=common.random_loader(),
        optimizers=optimizer,
        max_duration=f"{batches}ba",
        device="cpu",
        precision="fp32",
        seed=0,
        run_name="cairn-bench",
        loggers=[],
        progress_bar=False,
        log_to_console=False,
        load_path=load_path,
        load_progress_bar=False,
    )


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    """AdamW's own step count: proves the optimizer state came back from the checkpoint, not from scratch."""
    return int(next(iter(optimizer.state.values()))["step"])


def measure_save(size_gib: float, runs: int, path: str) -> tuple[workload.Measurement, int, int]:
    """Train one batch, then time saves of that running trainer; returns (times, saved batch, state bytes).

    Its own function so that the trainer, model and optimizer are gone before resume is measured.
    """
    net = workload.build_model(size_gib)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    trainer = make_trainer(Wrapped(net), optimizer, 1, None)
    trainer.fit()
    saved_batch = int(trainer.state.timestamp.batch)
    state_bytes = workload.state_bytes(net, optimizer)
    common.log(f"{TOOL}: trained to batch {saved_batch}; state {state_bytes / 2**30:.3f} GiB")

    def save() -> None:
        written = trainer.save_checkpoint(path)
        if written != path:
            raise AssertionError(f"composer wrote {written!r}, expected {path!r}")
        common.durable(path)

    saved = workload.measure(save, runs, before=lambda: common.remove(path))
    common.log(f"{TOOL}: checkpoint file {os.path.getsize(path) / 2**30:.3f} GiB; save s {saved.seconds}")
    trainer.close()
    return saved, saved_batch, state_bytes


def measure_resume(size_gib: float, runs: int, path: str, saved_batch: int) -> workload.Measurement:
    """Time resume-to-first-step: Trainer(load_path) + fit(); only the model and AdamW are built untimed."""
    fresh: dict[str, Any] = {}

    def release() -> None:
        if "trainer" in fresh:
            fresh["trainer"].close()
        fresh.clear()
        gc.collect()

    def prepare() -> None:
        release()
        fresh["model"] = Wrapped(workload.build_model(size_gib))
        fresh["optimizer"] = torch.optim.AdamW(fresh["model"].parameters(), lr=1e-3)
        workload.evict_from_page_cache(path)

    def resume() -> None:
        again = make_trainer(fresh["model"], fresh["optimizer"], saved_batch + 1, path)
        fresh["trainer"] = again
        again.fit()
        batch, step = int(again.state.timestamp.batch), adam_step(fresh["optimizer"])
        if batch != saved_batch + 1 or step != saved_batch + 1:
            raise AssertionError(f"resume ended at batch {batch}, AdamW step {step}")

    resumed = workload.measure(resume, runs, before=prepare)
    common.log(f"{TOOL}: resume s {resumed.seconds}")
    release()
    return resumed


def main() -> None:
    out = common.claim_stdout()
    args = common.parse_args(TOOL)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(os.path.abspath(args.dir), "composer.pt")
    saved, saved_batch, state_bytes = measure_save(args.size_gib, args.runs, path)
    gc.collect()
    resumed = measure_resume(args.size_gib, args.runs, path, saved_batch)
    common.remove(path)

    common.emit(
        out,
        tool=TOOL,
        version=composer.__version__,
        state_bytes=state_bytes,
        save=saved,
        resume=resumed,
        notes=(
            "save: Trainer.save_checkpoint(path) (one monolithic .pt file via torch.save, the path CheckpointSaver "
            "uses) + fsync of the file and its folder. resume: a fresh model and AdamW built untimed, file evicted "
            "from the page cache untimed, then timed Trainer(load_path=path, max_duration=saved+1 batches) + fit() "
            "until its one more batch ends; Composer loads inside Trainer.__init__, so building the Trainer is "
            "timed too (in the process that saved, imports warm). CPU, fp32, no loggers/progress bars/evaluation; "
            "torchvision is a stand-in module."
        ),
    )


if __name__ == "__main__":
    main()
