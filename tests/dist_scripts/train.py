"""A training script for the distributed tests, launched with torchrun by tests/test_distributed.py.

It trains the shared tiny MLP (with dropout) on a shuffled loader, checkpointing as told, and on rank 0 writes the
final weights to ``--out/final.pt``. Every rank writes the sample indices it saw to ``--out/samples-rank<r>.txt``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import sys

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from cairn import Callback, Trainer  # noqa: E402
from cairn.core.model_state import model_state  # noqa: E402
from cairn.loggers import RemoteUploaderDownloader  # noqa: E402
from cairn.models import Classifier  # noqa: E402
from conftest import IndexedDataset, TinyNet  # noqa: E402


class SeenSamples(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def after_dataloader(self, state, logger) -> None:
        with open(self.path, "a") as file:
            file.write(" ".join(str(int(i)) for i in state.batch[2]) + "\n")


class SignalRankOne(Callback):
    """Sends SIGTERM to rank 1 alone at one batch, as a scheduler reaching one node first would."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state, logger) -> None:
        if state.timestamp.batch == self.batch and int(os.environ.get("RANK", 0)) == 1:
            os.kill(os.getpid(), signal.SIGTERM)


class Announce(Callback):
    """Rank 0 prints each finished batch, then waits for a line on stdin: the test paces the run, so its kill lands
    at a moment it chose (the other ranks wait at the next collective)."""

    def batch_end(self, state, logger) -> None:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"BATCH {state.timestamp.batch}", flush=True)
            if not sys.stdin.readline():  # the test is gone
                os._exit(3)


SCRIPTED_METRIC = "metrics/eval/Scripted"


def scripted_value(batch: int) -> float:
    """The scripted metric at ``batch``: pseudo-random, yet a function of the batch number alone, so a resumed run
    logs what an uninterrupted one would, and the best checkpoints lie scattered (not simply the newest)."""
    return random.Random(batch).random()


class ScriptedMetric(Callback):
    """Logs :func:`scripted_value` under ``SCRIPTED_METRIC`` at every batch end, before that batch's checkpoint
    (which records it for ``save_best_metric``)."""

    def batch_end(self, state, logger) -> None:
        logger.log_metrics({SCRIPTED_METRIC: scripted_value(state.timestamp.batch)})


class KillInsideFolderDelete(Callback):
    """From the first batch on, rank 0's first deletion of a sharded checkpoint folder (a folder holding ``cairn.pt``)
    dies half done: ``cairn.pt`` removed, the shards left, then SIGKILL. ``shutil.rmtree`` deletes in directory order,
    so a kill inside a prune can leave just this; a random kill rarely lands there. The path goes to
    ``--out/killed-inside-delete`` first, so the test knows the kill came."""

    def __init__(self, out: str) -> None:
        self.out = out

    def batch_start(self, state, logger) -> None:
        if int(os.environ.get("RANK", 0)) == 0 and not hasattr(shutil.rmtree, "kills_inside"):
            shutil.rmtree = self._wrap(shutil.rmtree)

    def _wrap(self, rmtree):  # noqa: ANN001, ANN202 - shutil.rmtree's own signature
        def kill_inside(path, *args, **kwargs):  # noqa: ANN001, ANN202
            metadata = os.path.join(path, "cairn.pt")
            if os.path.isfile(metadata):
                with open(os.path.join(self.out, "killed-inside-delete"), "w") as file:
                    file.write(f"{path}\n")
                os.remove(metadata)
                os.kill(os.getpid(), signal.SIGKILL)
            return rmtree(path, *args, **kwargs)

        kill_inside.kills_inside = True
        return kill_inside


class KillInsideChunkCollect(Callback):
    """From the first batch on, rank 0's first garbage collection that finds chunks to remove dies half done: one
    chunk removed, the rest left, then SIGKILL (the manifests that named them were deleted just before). A random
    kill rarely lands there. ``ChunkFolder.remove`` is wrapped from here, so no test hook lives in the library; the
    chunk folder goes to ``--out/killed-inside-collect`` first, so the test knows the kill came."""

    def __init__(self, out: str) -> None:
        self.out = out

    def batch_start(self, state, logger) -> None:
        from cairn.checkpoint.incremental.chunk_folder import ChunkFolder

        if int(os.environ.get("RANK", 0)) == 0 and not hasattr(ChunkFolder.remove, "kills_inside"):
            ChunkFolder.remove = self._wrap(ChunkFolder.remove)

    def _wrap(self, remove):  # noqa: ANN001, ANN202 - ChunkFolder.remove's own signature
        def kill_inside(folder, keys):  # noqa: ANN001, ANN202
            keys = list(keys)
            if keys:
                remove(folder, keys[:1])
                with open(os.path.join(self.out, "killed-inside-collect"), "w") as file:
                    file.write(f"{folder.path} removed {keys[0]}, left {len(keys) - 1}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return remove(folder, keys)

        kill_inside.kills_inside = True
        return kill_inside


class KillBeforeManifest(Callback):
    """Rank 0's second incremental save dies after its chunks are written and fsynced, as its manifest is about to
    be written (the chunk folder's lock held shared): it leaves chunks no manifest names. ``write_checkpoint`` is
    wrapped where the incremental writer looks it up, from here; the manifest's path goes to
    ``--out/killed-before-manifest`` first."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.manifests = 0

    def batch_start(self, state, logger) -> None:
        from cairn.checkpoint.incremental import files

        if int(os.environ.get("RANK", 0)) == 0 and not hasattr(files.write_checkpoint, "kills_before"):
            files.write_checkpoint = self._wrap(files.write_checkpoint)

    def _wrap(self, write):  # noqa: ANN001, ANN202 - write_checkpoint's own signature
        def kill_before(checkpoint, path, *args, **kwargs):  # noqa: ANN001, ANN202
            self.manifests += 1
            if self.manifests == 2:
                with open(os.path.join(self.out, "killed-before-manifest"), "w") as file:
                    file.write(f"{path}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            return write(checkpoint, path, *args, **kwargs)

        kill_before.kills_before = True
        return kill_before


class WideNet(TinyNet):
    """The tiny MLP made wide enough (hidden 8192) that its weights and AdamW moments are chunked (each at least
    cairn's 64 KiB inline limit), plus a frozen 1 MiB parameter that every checkpoint shares, one chunk stored
    once: what an incremental save's manifests, retention and garbage collection act on."""

    def __init__(self, dropout: float) -> None:
        super().__init__(hidden=8192, dropout=dropout)
        self.frozen = torch.nn.Parameter(torch.arange(1 << 18, dtype=torch.float32), requires_grad=False)


class TripleClassifier(Classifier):
    def forward(self, batch):
        return self.module(batch[0])

    def loss(self, outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch[1])

    def update_metric(self, batch, outputs, metric) -> None:
        metric.update(outputs, batch[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-duration", default="3ep")
    parser.add_argument("--save-folder")
    parser.add_argument("--save-interval", default="1ep")
    parser.add_argument("--autoresume", action="store_true")
    parser.add_argument("--load-path")
    parser.add_argument("--uploader", help="a bucket URI: add a RemoteUploaderDownloader for it to the loggers")
    parser.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 instead of DDP")
    parser.add_argument("--sharded", action="store_true", help="with --fsdp: sharded checkpoint folders")
    parser.add_argument("--keep", type=int, default=-1, help="save_num_checkpoints_to_keep")
    parser.add_argument("--async-save", action="store_true", help="save_async=True")
    parser.add_argument("--keep-best", type=int, default=0, help="save_keep_best, ranked by the scripted metric")
    parser.add_argument("--keep-every", help="save_keep_every, a time string")
    parser.add_argument("--remote-keep", type=int, default=-1, help="save_remote_num_checkpoints_to_keep")
    parser.add_argument("--kill-inside-delete", action="store_true", help="KillInsideFolderDelete (rank 0 dies)")
    parser.add_argument("--incremental", action="store_true", help="save_incremental=True")
    parser.add_argument("--wide", action="store_true", help="WideNet: tensors large enough to be chunked")
    parser.add_argument(
        "--kill-inside-collect", action="store_true", help="KillInsideChunkCollect (rank 0 dies removing chunks)"
    )
    parser.add_argument(
        "--kill-before-manifest", action="store_true", help="KillBeforeManifest (rank 0 dies before its 2nd manifest)"
    )
    parser.add_argument("--announce", action="store_true", help="print BATCH n, wait for a stdin line")
    parser.add_argument("--preempt-at", type=int, help="SIGTERM rank 1 at this batch (save_on_preemption=True)")
    parser.add_argument(
        "--await-shards-at", type=int, help="rank 0 at this batch: wait for a folder's shards in --save-folder's store"
    )
    parser.add_argument("--cairn-log", action="store_true", help="cairn's INFO lines to --out/log-rank<r>.txt")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", 0))
    if args.cairn_log:
        cairn_log = logging.getLogger("cairn")
        cairn_log.addHandler(logging.FileHandler(os.path.join(args.out, f"log-rank{rank}.txt")))
        cairn_log.setLevel(logging.INFO)
    torch.manual_seed(0)
    model = TripleClassifier(WideNet(dropout=0.3) if args.wide else TinyNet(dropout=0.3), num_classes=3)
    if args.await_shards_at:
        from store_watch import AwaitShards  # beside this script

        watch = [AwaitShards(args.await_shards_at, args.save_folder, args.out)]
    else:
        watch = []
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(IndexedDataset(), batch_size=4, shuffle=True),
        max_duration=args.max_duration,
        device="cpu",
        seed=11,
        run_name="dist",
        progress_bar=False,
        callbacks=[SeenSamples(os.path.join(args.out, f"samples-rank{rank}.txt"))]
        + ([SignalRankOne(args.preempt_at)] if args.preempt_at else [])
        + ([ScriptedMetric()] if args.keep_best else [])
        + ([Announce()] if args.announce else [])
        + ([KillInsideFolderDelete(args.out)] if args.kill_inside_delete else [])
        + ([KillInsideChunkCollect(args.out)] if args.kill_inside_collect else [])
        + ([KillBeforeManifest(args.out)] if args.kill_before_manifest else [])
        + watch,
        save_on_preemption=args.preempt_at is not None,
        save_folder=args.save_folder,
        save_interval=args.save_interval,
        autoresume=args.autoresume,
        save_num_checkpoints_to_keep=args.keep,
        save_keep_best=args.keep_best,
        save_best_metric=SCRIPTED_METRIC if args.keep_best else None,
        save_keep_every=args.keep_every,
        save_remote_num_checkpoints_to_keep=args.remote_keep,
        save_async=args.async_save,
        save_incremental=args.incremental,
        load_path=args.load_path,
        loggers=[RemoteUploaderDownloader(args.uploader, use_procs=False)] if args.uploader else None,
        parallelism_config={"fsdp": {"state_dict_type": "sharded" if args.sharded else "full"}} if args.fsdp else None,
    )
    trainer.fit()
    weights = model_state(model)  # every rank joins: FSDP gathers the shards to rank 0
    if rank == 0:
        torch.save(weights, os.path.join(args.out, "final.pt"))
        with open(os.path.join(args.out, "timestamp.txt"), "w") as file:
            file.write(f"{trainer.state.timestamp.epoch} {trainer.state.timestamp.batch}\n")


if __name__ == "__main__":
    main()
