"""Time PyTorch Lightning's own checkpoint save and resume on the shared workload; print one JSON line.

Runs in the ``lightning`` peer venv (benchmarks/peers/setup.py):
``<python> benchmarks/peers/lightning_driver.py --size-gib 1.0 --runs 5 --dir SCRATCH_DIR``.
Save is ``Trainer.save_checkpoint`` (what ``ModelCheckpoint`` calls); resume is ``Trainer.fit(ckpt_path=...)``,
Lightning's normal resume route, timed until one more optimizer step is done.
"""

from __future__ import annotations

import functools
import gc
import os
from typing import Any

import driver_common as common
import lightning.pytorch as pl
import torch
from driver_common import workload
from torch import nn

TOOL = "lightning"


class Wrapped(pl.LightningModule):
    """The workload's MLP as a LightningModule; the loss is ``take_one_step``'s, the optimizer AdamW(lr=1e-3)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.net(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def make_trainer(max_steps: int, root: str) -> pl.Trainer:
    """A CPU trainer with everything that is not about checkpoints switched off."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )


def adam_step(trainer: pl.Trainer) -> int:
    """AdamW's own step count: proves the optimizer state came back from the checkpoint, not from scratch."""
    state = next(iter(trainer.optimizers[0].state.values()))
    return int(state["step"])


def measure_save(size_gib: float, runs: int, folder: str, path: str) -> tuple[workload.Measurement, int, int]:
    """Train one step, then time saves of that running trainer; returns (times, saved step, state bytes).

    Its own function so that the trainer, model and optimizer are gone before resume is measured.
    """
    model = Wrapped(workload.build_model(size_gib))
    trainer = make_trainer(1, folder)
    trainer.fit(model, train_dataloaders=common.random_loader())
    state_bytes = workload.state_bytes(model.net, trainer.optimizers[0])
    common.log(f"{TOOL}: trained to step {trainer.global_step}; state {state_bytes / 2**30:.3f} GiB")

    def save() -> None:
        trainer.save_checkpoint(path, weights_only=False)  # the full checkpoint, said explicitly
        common.durable(path)

    saved = workload.measure(save, runs, before=lambda: common.remove(path))
    common.log(f"{TOOL}: checkpoint file {os.path.getsize(path) / 2**30:.3f} GiB; save s {saved.seconds}")
    return saved, trainer.global_step, state_bytes


def measure_resume(
    size_gib: float, runs: int, folder: str, path: str, saved_step: int, turns: common.Turns
) -> workload.Measurement:
    """Time resume-to-first-step: a fresh model and Trainer are built untimed, the file evicted untimed (and, with
    ``--take-turns``, the bench's word awaited untimed)."""
    fresh: dict[str, Any] = {}

    def prepare() -> None:
        fresh.clear()
        gc.collect()
        fresh["model"] = Wrapped(workload.build_model(size_gib))
        fresh["trainer"] = make_trainer(saved_step + 1, folder)
        workload.evict_from_page_cache(path)

    def resume() -> None:
        again: pl.Trainer = fresh["trainer"]
        again.fit(fresh["model"], train_dataloaders=common.random_loader(), ckpt_path=path)
        if again.global_step != saved_step + 1 or adam_step(again) != saved_step + 1:
            raise AssertionError(f"resume ended at step {again.global_step}, AdamW step {adam_step(again)}")

    resumed = workload.measure(resume, runs, before=turns(prepare))
    common.log(f"{TOOL}: resume s {resumed.seconds}")
    return resumed


def main() -> None:
    out = common.claim_stdout()
    args = common.parse_args(TOOL)
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "lightning.ckpt")
    saved, saved_step, state_bytes = measure_save(args.size_gib, args.runs, args.dir, path)
    gc.collect()
    turns = functools.partial(common.taking_turns, out=out, enabled=args.take_turns)
    resumed = measure_resume(args.size_gib, args.runs, args.dir, path, saved_step, turns)
    common.remove(path)

    common.emit(
        out,
        tool=TOOL,
        version=pl.__version__,
        state_bytes=state_bytes,
        save=saved,
        resume=resumed,
        notes=(
            "save: Trainer.save_checkpoint(path) (what ModelCheckpoint calls; Lightning serialises to an in-memory "
            "buffer, then writes one .ckpt file) + fsync of the file and its folder. resume: a fresh model and "
            "Trainer(max_steps=saved+1) built untimed, file evicted from the page cache untimed, then timed "
            "Trainer.fit(model, loader, ckpt_path=path) until its one more step ends (in the process that saved, "
            "imports warm; with --take-turns, each run follows one of the bench's own resumes). CPU, fp32, no "
            "logger/progress bar/summary/validation/sanity check."
        ),
    )


if __name__ == "__main__":
    main()
