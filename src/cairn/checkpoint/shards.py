"""What a sharded checkpoint is to both halves: a folder holding ``cairn.pt``, and the state's tensors as
``torch.distributed.checkpoint`` wants them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

from cairn.core.model_state import model_weights_module
from cairn.core.state import State, class_keys
from cairn.names import METADATA_FILE

__all__ = ["dcp_tensors", "is_sharded_folder", "single_process_quietly"]


def is_sharded_folder(path: str) -> bool:
    """A folder holding ``cairn.pt``: the mark of a finished sharded checkpoint (a temporary one is hidden)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, METADATA_FILE))


def dcp_tensors(state: State, *, weights_only: bool) -> dict[str, Any]:
    """The model's (and optimizers') state as DCP wants it: sharded tensors where the model is sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module = model_weights_module(state.model)  # names as the user's network has them, as in single files
    tensors: dict[str, Any] = {"model": get_model_state_dict(module)}
    if not weights_only:
        optimizers = zip(class_keys(state.optimizers), state.optimizers, strict=True)
        tensors["optimizers"] = {key: get_optimizer_state_dict(module, opt) for key, opt in optimizers}
    return tensors


@contextlib.contextmanager
def single_process_quietly() -> Iterator[None]:
    """DCP warns each time it runs without a process group; loading into one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
