"""What a resumable data pipeline says of itself: the state of a loader, dataset or sampler that offers
``state_dict()``/``load_state_dict()``, saved per rank so that a resumed run continues from there instead of fetching
and throwing away every batch before the resume point.

Which parts speak for the pipeline, and why:

- the loader itself, when it offers state (torchdata's ``StatefulDataLoader``, or any iterable with the pair): only
  the loader knows what its worker processes have handed over, as opposed to fetched ahead;
- in a plain ``DataLoader`` that loads in the main process (``num_workers=0``), each of its dataset, sampler and
  batch sampler that offers state: there they advance exactly as batches are drawn, no further;
- nothing in a plain ``DataLoader`` with worker processes: each worker iterates its own copy of the dataset (the
  main process's copy never moves), and the sampler runs ahead of training by the prefetch. Their state would name
  the wrong point, so such a loader is replayed, with a warning that says how to avoid it.

The state is checked to be plain data (dicts, lists, numbers, strings, tensors) when it is taken, so a save refuses
what ``torch.load(weights_only=True)`` would refuse later, when the checkpoint is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader

from cairn.errors import CheckpointIncompatibleError

__all__ = ["PARTS", "check_loader_state_fits", "load_loader_state", "loader_state", "stateful_parts", "why_replayed"]

#: where a loader's state can come from, in the order they are restored
PARTS = ("loader", "dataset", "sampler", "batch_sampler")

_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor)
_PLAIN_CONTAINERS = (dict, OrderedDict, list, tuple)
_MAX_DEPTH = 100


def _offers_state(part: object) -> bool:
    return callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))


def stateful_parts(loader: Iterable[Any] | None) -> dict[str, Any]:
    """The parts of ``loader`` whose state says where the data stands, by name (see the module's docstring)."""
    if loader is None:
        return {}
    if _offers_state(loader):
        return {"loader": loader}
    if not isinstance(loader, DataLoader) or loader.num_workers > 0:
        return {}
    parts = {"dataset": loader.dataset, "sampler": loader.sampler, "batch_sampler": loader.batch_sampler}
    return {name: part for name, part in parts.items() if part is not None and _offers_state(part)}


def why_replayed(loader: Iterable[Any]) -> str:
    """Why ``loader`` has no state to resume from, and what to do instead: the reason a replay's warning gives."""
    if isinstance(loader, DataLoader) and loader.num_workers > 0:
        parts = [name for name in ("dataset", "sampler") if _offers_state(getattr(loader, name, None))]
        if parts:
            return (
                f"its {' and '.join(parts)} offer state_dict(), but with num_workers={loader.num_workers} a plain "
                "DataLoader's workers and prefetch leave that state behind or ahead of training; wrap them in "
                "torchdata's StatefulDataLoader to resume without replaying"
            )
    return (
        "it offers no state_dict(); use torchdata's StatefulDataLoader, or give the dataset or sampler "
        "state_dict()/load_state_dict(), to resume without replaying"
    )


def loader_state(loader: Iterable[Any] | None) -> dict[str, Any] | None:
    """The state of each of ``loader``'s stateful parts, as plain data; ``None`` when it has none."""
    parts = stateful_parts(loader)
    if not parts:
        return None
    state = {name: part.state_dict() for name, part in parts.items()}
    for name, value in state.items():
        _check_plain(value, f"train_dataloader's {name}.state_dict()")
    return state


def load_loader_state(loader: Iterable[Any], saved: Any, *, source: str) -> None:
    """Put ``saved`` (one rank's :func:`loader_state`) back into ``loader``'s parts."""
    parts = check_loader_state_fits(loader, saved, source=source)
    for name in PARTS:
        if name in parts:
            try:
                parts[name].load_state_dict(saved[name])
            except Exception as err:  # noqa: BLE001 - the user's code, given data from a file: say which and why
                raise CheckpointIncompatibleError(
                    f"{source!r}: train_dataloader's {name} refused the state it saved ({type(err).__name__}: "
                    f"{str(err)[:200]}); resume with the data pipeline the checkpoint was saved with"
                ) from err


def check_loader_state_fits(loader: Iterable[Any], saved: Any, *, source: str) -> dict[str, Any]:
    """``loader``'s stateful parts, refused unless they are the ones that saved ``saved``: another kind of loader
    would misread their states."""
    parts = stateful_parts(loader)
    if not isinstance(saved, dict) or set(saved) != set(parts):
        had = sorted(saved) if isinstance(saved, dict) else []
        raise CheckpointIncompatibleError(
            f"{source!r} holds the state of the data loader's {_names(had)}, but this train_dataloader's stateful "
            f"parts are {_names(sorted(parts))}; resume with the kind of data loader the checkpoint was saved with"
        )
    return parts


def _names(parts: list[str]) -> str:
    return ", ".join(parts) if parts else "none"


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` naming the first value that is not plain data, and where it sits."""
    pending: list[tuple[str, Any, int]] = [("", value, 0)]
    while pending:
        path, item, depth = pending.pop()
        if type(item) in _PLAIN_CONTAINERS:
            if depth >= _MAX_DEPTH:
                raise TypeError(f"{where} nests containers more than {_MAX_DEPTH} deep at {path or '/'!r}")
            entries = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in entries:
                if isinstance(item, dict) and type(key) not in (str, int, bool, float, type(None)):
                    raise TypeError(f"{where} has a {type(key).__name__} key at {path or '/'!r}; {_PLAIN_ADVICE}")
                pending.append((f"{path}/{key}", child, depth + 1))
        elif not isinstance(item, _PLAIN_LEAVES) or (isinstance(item, torch.Tensor) and type(item) is not torch.Tensor):
            raise TypeError(f"{where} holds a value of type {type(item).__name__} at {path or '/'!r}; {_PLAIN_ADVICE}")


_PLAIN_ADVICE = (
    "a checkpoint holds plain data only (dicts, lists, tuples, numbers, strings, bytes and tensors), so that it "
    "loads without running code: return the state in those types"
)
