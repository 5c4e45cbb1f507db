"""Checkpoints, one module per seam.

- when: :mod:`~cairn.checkpoint.policy` turns ``save_interval`` into one ``(state, event) -> bool`` policy;
- what: :mod:`~cairn.checkpoint.content` builds the plain-data dict and its content hash;
- how: :mod:`~cairn.checkpoint.commit` is the single atomic write path (temp name, fsync, rename, fsync folder);
- how many: :mod:`~cairn.checkpoint.retention` prunes from what is on disk;
- reading back: :mod:`~cairn.checkpoint.loader` (safe, verified) and :mod:`~cairn.checkpoint.compat` (does it fit);
- resuming: :mod:`~cairn.checkpoint.resume` finds the newest good checkpoint and wires the Trainer's arguments.
- looking inside: :mod:`~cairn.checkpoint.inspect` lists and summarizes checkpoints, :mod:`~cairn.checkpoint.compare`
  diffs two (``cairn ckpt ls / show / diff``).
"""

from cairn.checkpoint.loader import load_checkpoint, read_checkpoint
from cairn.checkpoint.saver import CheckpointSaver

__all__ = ["CheckpointSaver", "load_checkpoint", "read_checkpoint"]
