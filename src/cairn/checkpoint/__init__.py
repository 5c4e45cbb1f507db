"""Checkpoints: saving, loading and the tools, each in its own package (see ``docs/architecture.md``).

- ``save/``: when (:mod:`~cairn.checkpoint.save.policy`), what (:mod:`~cairn.checkpoint.save.content`), how
  (:mod:`~cairn.checkpoint.save.writers`, :mod:`~cairn.checkpoint.save.commit`), how many
  (:mod:`~cairn.checkpoint.save.retention`), and the callback that runs them (:mod:`~cairn.checkpoint.save.saver`);
- ``load/``: safe reading (:mod:`~cairn.checkpoint.load.loader`), whether it fits
  (:mod:`~cairn.checkpoint.load.compatibility`), sharded folders and checkpoints in a store;
- :mod:`~cairn.checkpoint.resume`: the newest good checkpoint a saver wrote, and the Trainer's arguments wired;
- ``tools/``: listing, comparing and converting (``cairn ckpt ls / show / diff / convert``);
- shared by both halves: the file format (:mod:`~cairn.checkpoint.format`), names (``naming/``), folders
  (:mod:`~cairn.checkpoint.folder`), tensor trees (:mod:`~cairn.checkpoint.tree`) and ``ignore_keys``
  (:mod:`~cairn.checkpoint.keys`).
"""

from cairn.checkpoint.load.loader import load_checkpoint, read_checkpoint
from cairn.checkpoint.save.saver import CheckpointSaver

__all__ = ["CheckpointSaver", "load_checkpoint", "read_checkpoint"]
