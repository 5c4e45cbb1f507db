"""The names cairn gives things on disk and in a store, in one place so that writers and readers agree.

A leaf module: it imports nothing from cairn, so that any module (saving, loading, the tools, the loggers, the
command line) can use it without closing an import circle.
"""

from __future__ import annotations

__all__ = [
    "CHUNK_FOLDER",
    "DAMAGED_MARKER",
    "EPOCH_START_GENERATORS",
    "EPOCH_START_RNG",
    "EPOCH_SPLIT",
    "GENERATORS",
    "LOADER_STATES",
    "METADATA_FILE",
    "POINTER_SUFFIX",
    "SHARD_INDEX_FILE",
    "TEMP_MARKER",
]

#: A sharded checkpoint folder's file holding everything but the sharded tensors (its content hash included);
#: a folder holding it is a sharded checkpoint.
METADATA_FILE = "cairn.pt"

#: The file of a sharded checkpoint folder in which ``torch.distributed.checkpoint`` keeps its index of the shards.
SHARD_INDEX_FILE = ".metadata"

#: Marks a file or folder still being written (``.<name>.cairn-tmp-<machine>-<pid>-<token>``); never a checkpoint.
TEMP_MARKER = ".cairn-tmp-"

#: A store's latest pointer is the object ``<latest name>.symlink``, holding the name of the object it stands for.
POINTER_SUFFIX = ".symlink"

#: Where an incremental saver keeps its chunks, in its folder: each one file named by the hash of its bytes.
CHUNK_FOLDER = ".cairn-chunks"

#: Autoresume keeps a damaged checkpoint beside it as ``<name>.damaged-<UTC time>-<token>``.
DAMAGED_MARKER = ".damaged-"

# Keys of ``state["dataset_state"]``: where the training data loader stood (trainer.dataloader writes them, the loader
# checks their types before anything is restored).
#: the global RNG at the start of the epoch, from which a resumed run replays the loader's shuffle
EPOCH_START_RNG = "epoch_start_rng"
#: the loader's own generators (sampler, workers) at the start of the epoch
EPOCH_START_GENERATORS = "epoch_start_generators"
#: the loader's own generators now, mid-epoch
GENERATORS = "generators"
#: each rank's data-loader state (a list by rank: what its stateful loader, dataset or sampler returned), from which a
#: resumed run continues mid-epoch without replaying batches
LOADER_STATES = "loader_states"
#: how the epoch's samples were split between ranks, recorded at its start: a run resumed mid-epoch on another number
#: of ranks works out from it which samples are left and hands each out once
EPOCH_SPLIT = "epoch_split"
