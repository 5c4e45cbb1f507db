"""What differs between two checkpoints: the model's tensors, the metadata, and the rest of the state.

The comparison is exact: two checkpoints are identical only when every tensor holds the same bits and every other
value is equal. It is reported in three parts, most useful first:

- **model tensors** (``state/model``): names only in one, other shapes or dtypes, and for tensors of one shape the
  largest absolute difference of their values (computed in float64, or complex128, chunk by chunk);
- **metadata**: run name, timestamp, versions, world size, kind, creation time, which optimizers and schedulers,
  how many ranks' RNG. The content hash is left out: it is a digest of everything compared here, so it differs
  exactly when something else does, and would only repeat that;
- **other state** (optimizer moments, schedulers, metrics, data position, callbacks, RNG): which entries differ,
  by ``/``-path.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from cairn.checkpoint.tools.listing import checkpoint_kind
from cairn.checkpoint.tree import CONTAINERS, leaves

__all__ = [
    "CheckpointDiff",
    "Difference",
    "TensorDifference",
    "compare_checkpoints",
    "compare_tensors",
    "max_abs_difference",
]

_CHUNK = 1 << 22  # elements compared at once: bounds the float64 copies to a few tens of MB per tensor
_MISSING = object()
_WALKED_INTO = (*CONTAINERS, torch.Tensor)  # a list holding one of these is walked into, not shown whole
_FACT_SECTIONS = ("model", "metadata", "timestamp", "run_name")  # compared as tensors or facts, not as other state


@dataclass(frozen=True)
class TensorDifference:
    """One model tensor that differs. ``a``/``b`` describe each side (``float32 (8, 4)``), ``None`` where absent."""

    name: str
    a: str | None
    b: str | None
    max_abs_diff: float | None = None  #: for tensors of one shape; 0.0 when only the bits differ (-0.0, NaN payloads)


@dataclass(frozen=True)
class Difference:
    """A value that differs: ``a`` and ``b`` as short text, ``None`` where one side lacks it."""

    key: str
    a: str | None
    b: str | None
    max_abs_diff: float | None = None  #: for two tensors of one shape


@dataclass
class CheckpointDiff:
    model: list[TensorDifference] = field(default_factory=list)
    metadata: list[Difference] = field(default_factory=list)
    #: the rest of the state, keyed by ``/``-path, e.g. ``optimizers/AdamW/state/0/exp_avg``
    other: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  #: what was not compared, and why
    model_tensors: int = 0  #: how many model tensor names were compared (both sides together)

    @property
    def identical(self) -> bool:
        return not (self.model or self.metadata or self.other)


def compare_checkpoints(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    a_model: Mapping[str, torch.Tensor] | None = None,
    b_model: Mapping[str, torch.Tensor] | None = None,
) -> CheckpointDiff:
    """Compare two checkpoints as :func:`~cairn.checkpoint.read_checkpoint` returns them.

    ``a_model``/``b_model`` give the model tensors when they are not in the checkpoint itself (a sharded folder's
    are in its shards: :func:`~cairn.checkpoint.load.sharded.read_whole_shards`).
    """
    a_state, b_state = a["state"], b["state"]
    sharded = bool(a_state["metadata"].get("sharded") or b_state["metadata"].get("sharded"))
    skip = ("optimizers",) if sharded else ()
    a_model = a_model if a_model is not None else a_state.get("model") or {}
    b_model = b_model if b_model is not None else b_state.get("model") or {}
    return CheckpointDiff(
        model=compare_tensors(a_model, b_model),
        model_tensors=len(set(a_model) | set(b_model)),
        metadata=_compare_values(_facts(a), _facts(b)),
        other=_compare_values(dict(_leaves(_rest(a, skip))), dict(_leaves(_rest(b, skip)))),
        notes=["optimizer state not compared: a sharded folder keeps it in its shards"] if sharded else [],
    )


def compare_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[TensorDifference]:
    """Every name whose tensor differs, in ``a``'s order, then the names only ``b`` has."""
    found = []
    for name in [*a, *(n for n in b if n not in a)]:
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            found.append(TensorDifference(name, _describe(x), _describe(y)))
        elif x.shape != y.shape:
            found.append(TensorDifference(name, _describe(x), _describe(y)))
        elif not _same_bits(x, y):
            found.append(TensorDifference(name, _describe(x), _describe(y), max_abs_difference(x, y)))
    return found


def _describe(tensor: torch.Tensor | None) -> str | None:
    if tensor is None:
        return None
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.dtype != y.dtype:
        return False
    if x.numel() == 0:
        return True
    return torch.equal(_as_bytes(x), _as_bytes(y))


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def max_abs_difference(x: torch.Tensor, y: torch.Tensor) -> float:
    """``max |x - y|`` over tensors of one shape, any dtypes, computed in float64 (complex128 for complex ones).

    Places where both are NaN count as equal; a NaN on one side only makes the answer NaN. Chunked, so that two
    large tensors never need whole float64 copies at once.
    """
    wide = torch.complex128 if x.is_complex() or y.is_complex() else torch.float64
    flat_x, flat_y = x.detach().cpu().reshape(-1), y.detach().cpu().reshape(-1)
    largest = 0.0
    for start in range(0, flat_x.numel(), _CHUNK):
        part_x = flat_x[start : start + _CHUNK].to(wide)
        part_y = flat_y[start : start + _CHUNK].to(wide)
        gap = (part_x - part_y).abs().masked_fill(part_x.isnan() & part_y.isnan(), 0.0)
        biggest = float(gap.max())
        if biggest != biggest:  # NaN: one side only
            return float("nan")
        largest = max(largest, biggest)
    return largest


def _facts(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata a person compares first, flattened to ``section.field`` keys."""
    state = checkpoint["state"]
    metadata = state["metadata"]
    facts: dict[str, Any] = {"kind": checkpoint_kind(checkpoint)}
    if "run_name" in state:
        facts["run_name"] = state["run_name"]
    for key, value in (state.get("timestamp") or {}).items():
        facts[f"timestamp.{key}"] = value
    for key, value in metadata.items():
        if key != "content_hash":
            facts[f"metadata.{key}"] = value
    in_shards = metadata.get("parameter_names") if metadata.get("sharded") else None  # their state is in the shards
    optimizers = state.get("optimizers", in_shards)
    if optimizers is not None:
        facts["optimizers"] = sorted(optimizers)
    if "schedulers" in state:
        facts["schedulers"] = sorted(state["schedulers"])
    facts["rng ranks"] = len(checkpoint.get("rng") or [])
    return facts


def _rest(checkpoint: Mapping[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """Everything not compared as model tensors or facts, nor skipped."""
    left_out = (*_FACT_SECTIONS, *skip)
    rest = {key: value for key, value in checkpoint["state"].items() if key not in left_out}
    if "rng" in checkpoint:
        rest["rng"] = checkpoint["rng"]
    return rest


def _leaves(node: Any) -> Iterator[tuple[str, Any]]:
    """``/``-paths to tensors and plain values. A list of plain values (a generator's state) is one leaf, so that a
    changed RNG reads as one difference, not hundreds."""
    return leaves(node, whole=_plain_sequence)


def _plain_sequence(node: Any) -> bool:
    return isinstance(node, (list, tuple)) and not any(isinstance(v, _WALKED_INTO) for v in node)


def _compare_values(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[Difference]:
    found = []
    for key in [*a, *(k for k in b if k not in a)]:
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if _equal(x, y):
            continue
        gap = max_abs_difference(x, y) if _same_shape_tensors(x, y) else None
        found.append(Difference(key, _show(x), _show(y), gap))
    return found


def _same_shape_tensors(x: Any, y: Any) -> bool:
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        both = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        return both and x.shape == y.shape and _same_bits(x, y)
    if type(x) is not type(y):
        return False
    try:
        return bool(x == y)
    except Exception:  # noqa: BLE001 - an exotic value that cannot be compared counts as different
        return False


def _show(value: Any, limit: int = 60) -> str | None:
    """Short text for a value; tensors by dtype and shape."""
    if value is _MISSING:
        return None
    if isinstance(value, torch.Tensor):
        return _describe(value)
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
