"""A frozen copy of a checkpoint, taken in the time it takes to copy memory, so training can go on while it is written.

Every tensor is copied into a host buffer that is kept from one save to the next (pinned memory for GPU tensors, so
the device-to-host copy runs at full speed without blocking on page faults); buffers are reallocated only when a
tensor's shape or dtype changes. Containers are rebuilt and other leaves deep-copied, so later training cannot reach
into the snapshot. A snapshot stays valid until the next call to :meth:`SnapshotBuffers.take`.

The first copy would otherwise allocate every buffer and fault in every page on the training thread (0.75 GiB is
about 200 000 faults of 4 KiB, seconds on a VM). :meth:`SnapshotBuffers.prepare` does that work ahead, on a thread of
its own, from the tensors the run holds at the start of fit; an optimizer that has not stepped yet has no state
then, so its state is prepared right after its first step (:meth:`SnapshotBuffers.prepare_after_first_step`).
Prepared buffers are spares matched by shape, dtype and pinning, not by path: whichever tensor of that kind the
first :meth:`~SnapshotBuffers.take` meets first gets one, and spares no tensor claimed are freed after it.
"""

from __future__ import annotations

import copy
import logging
import math
import mmap
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import torch
from torch.utils.hooks import RemovableHandle

from cairn.checkpoint.tree import leaves, map_tree

__all__ = ["BufferKind", "SnapshotBuffers"]

log = logging.getLogger(__name__)

_IMMUTABLE = (str, int, float, bool, complex, bytes, type(None))


class BufferKind(NamedTuple):
    """What a buffer must be to hold a tensor's copy: any buffer of the same kind will do."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pinned: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> BufferKind:
        return cls(tuple(tensor.shape), tensor.dtype, tensor.device.type == "cuda")

    def allocate(self) -> torch.Tensor:
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        if self.pinned or nbytes < PAGE_ALIGNED_FROM:
            return torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pinned)  # pinned memory is page-aligned
        return _page_aligned(nbytes).view(self.dtype).view(self.shape)


PAGE_ALIGNED_FROM = 1 << 20
"""Host buffers of this size or more start on a page boundary, so a direct write (:mod:`~cairn.checkpoint.save.direct`)
hands them to the disk as they are, without a copy into its staging buffer; smaller ones are not worth a mapping."""


def _page_aligned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of private memory starting on a page boundary (torch's allocator aligns to 64 bytes): an anonymous
    mapping, kept alive by the tensor that views it and unmapped when the last view is gone."""
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


class SnapshotBuffers:
    """Host copies of a checkpoint's tensors, reused between saves (one save in flight at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._used: set[str] = set()
        self._copied_from_device = False
        self._spares: dict[BufferKind, list[torch.Tensor]] = {}  # filled by the preparing thread, taken by take()
        self._promised: Counter[BufferKind] = Counter()  # spares asked for and not yet claimed or freed
        self._preparer: ThreadPoolExecutor | None = None
        self._prepared: Future[None] | None = None  # the last preparation asked for (one worker: all before it done)
        self._step_hooks: dict[int, RemovableHandle] = {}  # by id(optimizer), until its first step

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(buffer) for buffer in self._buffers.values())

    @property
    def spare_nbytes(self) -> int:
        """Bytes prepared ahead and not yet claimed by a take (wait on :meth:`prepare`'s future first)."""
        return sum(_nbytes(buffer) for spares in self._spares.values() for buffer in spares)

    def prepare(self, tree: Any) -> Future[None]:
        """Allocate and fault in, on a thread of its own, buffers for the tensors of ``tree`` this object lacks.

        Call it on the training thread with the tree :meth:`take` will get (the tensors are only looked at: their
        kinds are read now, nothing is copied). The returned future is done once every buffer is resident; a take
        waits for it, so one that comes early only waits for what is left of the work.
        """
        return self._start_preparing(self._kinds_wanted(tree) - self._promised)  # a second call asks for no more

    def prepare_after_first_step(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """Prepare buffers for each optimizer's state right after its first step: an optimizer that has not stepped
        (AdamW, SGD with momentum) makes its state then, and that state is most of a checkpoint's bytes."""
        for optimizer in optimizers:
            if not optimizer.state and id(optimizer) not in self._step_hooks:
                self._step_hooks[id(optimizer)] = optimizer.register_step_post_hook(self._after_step)

    def take(self, tree: Any) -> Any:
        """A copy of ``tree`` whose tensors live in this object's buffers; returns once every copy has landed."""
        self.wait_until_prepared()
        self._used = set()
        self._copied_from_device = False
        snapshot = map_tree(tree, self._copy_leaf)
        if self._copied_from_device:
            torch.cuda.synchronize()  # the non-blocking device-to-host copies must land before a thread reads them
        for stale in set(self._buffers) - self._used:  # tensors that are gone (a changed model) free their memory
            del self._buffers[stale]
        self._free_spares()  # prepared for tensors this checkpoint does not hold (a key ignored, a model changed)
        return snapshot

    def release(self) -> None:
        for hook in self._step_hooks.values():
            hook.remove()
        self._step_hooks.clear()
        self.wait_until_prepared()
        if self._preparer is not None:
            self._preparer.shutdown(wait=True)
            self._preparer = None
        self._free_spares()
        self._buffers.clear()

    def _after_step(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        """An optimizer's first step just made its state: prepare buffers for it, once."""
        hook = self._step_hooks.pop(id(optimizer), None)
        if hook is not None:
            hook.remove()
        self._start_preparing(Counter(_kinds(list(optimizer.state.values()))))

    def _kinds_wanted(self, tree: Any) -> Counter[BufferKind]:
        """The kinds of buffer ``tree`` needs beyond those held for its paths."""
        wanted: Counter[BufferKind] = Counter()
        for path, leaf in leaves(tree):
            if not isinstance(leaf, torch.Tensor) or _copied_plainly(leaf):
                continue
            kind = BufferKind.of(leaf)
            held = self._buffers.get(path)
            if held is None or BufferKind(tuple(held.shape), held.dtype, held.is_pinned()) != kind:
                wanted[kind] += 1
        return wanted

    def _start_preparing(self, kinds: Counter[BufferKind]) -> Future[None]:
        self._promised += kinds
        if not kinds and self._prepared is not None:
            return self._prepared
        if self._preparer is None:
            self._preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-snapshot-buffers")
        self._prepared = self._preparer.submit(self._allocate_and_fault_in, list(kinds.elements()))
        return self._prepared

    def _allocate_and_fault_in(self, kinds: list[BufferKind]) -> None:
        """Runs on the preparing thread: each page is written once, so the kernel maps it now, not at the first copy
        (``torch.empty`` only reserves address space; pinned memory is resident at once, and filled all the same)."""
        for kind in sorted(kinds, key=lambda k: -_kind_nbytes(k)):  # the big ones first: a take may come early
            buffer = kind.allocate()
            buffer.zero_()
            self._spares.setdefault(kind, []).append(buffer)

    def wait_until_prepared(self) -> None:
        """Wait for the buffers asked for so far; if preparing failed (out of memory), take allocates on its own."""
        if self._prepared is None:
            return
        failure = self._prepared.exception()
        if failure is not None:
            log.warning("preparing the async save's host buffers failed (%s); the save allocates them itself", failure)
        self._prepared = None

    def _free_spares(self) -> None:
        self._spares.clear()
        self._promised.clear()

    def _copy_leaf(self, path: str, leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return self._copy_tensor(leaf, path)
        if isinstance(leaf, _IMMUTABLE):
            return leaf
        return copy.deepcopy(leaf)

    def _copy_tensor(self, tensor: torch.Tensor, path: str) -> torch.Tensor:
        tensor = tensor.detach()
        if _copied_plainly(tensor) or path in self._used:  # a second tensor at one path must not share its buffer
            return tensor.cpu().clone()
        kind = BufferKind.of(tensor)
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = self._spare(kind)
            self._buffers[path] = buffer
        self._used.add(path)
        on_device = tensor.device.type != "cpu"
        buffer.copy_(tensor, non_blocking=on_device and buffer.is_pinned())
        self._copied_from_device |= on_device
        return buffer

    def _spare(self, kind: BufferKind) -> torch.Tensor:
        """A prepared buffer of this kind, or a new one when none was prepared."""
        spares = self._spares.get(kind)
        if spares:
            return spares.pop()
        return kind.allocate()


def _kinds(states: Iterable[Any]) -> Iterable[BufferKind]:
    for _, leaf in leaves(list(states)):
        if isinstance(leaf, torch.Tensor) and not _copied_plainly(leaf):
            yield BufferKind.of(leaf)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _kind_nbytes(kind: BufferKind) -> int:
    count = 1
    for size in kind.shape:
        count *= size
    return count * kind.dtype.itemsize


def _copied_plainly(tensor: torch.Tensor) -> bool:
    """Rare kinds that a reused plain buffer cannot hold: sparse layouts, DTensors, and quantized tensors (an empty
    ``qint8`` buffer has no quantizer, and ``copy_`` into it fails inside torch)."""
    return tensor.is_sparse or tensor.is_quantized or getattr(tensor, "_local_tensor", None) is not None
