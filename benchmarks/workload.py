"""The workload every tool in the benchmark saves and loads, and the instruments that measure it.

Plain torch only: this file is imported by cairn's benchmark and by the peer drivers, each in its own venv.
The state is an MLP of 4096-wide linear layers plus its AdamW state (two moments per parameter), so the checkpoint
is three times the parameters' bytes; ``layers_for`` picks the depth for a requested size.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

WIDTH = 4096


def layers_for(size_gib: float) -> int:
    """Layers whose parameters plus AdamW's two moments come closest to ``size_gib``."""
    per_layer = (WIDTH * WIDTH + WIDTH) * 4 * 3
    return max(1, round(size_gib * 2**30 / per_layer))


def build_model(size_gib: float) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers_for(size_gib))])


def build_finetune(size_gib: float) -> tuple[nn.Sequential, nn.Linear]:
    """A fine-tune whose checkpoint comes closest to ``size_gib``: a frozen body of 4096-wide linear layers (no
    optimizer state) and a trained head with 1% of the parameters (AdamW on the head only). Returns the whole
    network and its head; ``finetune_optimizer`` builds the optimizer."""
    layers = max(1, round(size_gib * 2**30 / ((WIDTH * WIDTH + WIDTH) * 4)))
    torch.manual_seed(0)
    body = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    body.requires_grad_(False)
    head = nn.Linear(WIDTH, max(1, round(layers * WIDTH / 99)))  # head params / all params = 1%
    return nn.Sequential(body, head), head


def finetune_optimizer(head: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(head.parameters(), lr=1e-3)


def take_one_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One real AdamW step, so the optimizer holds its moments (what a checkpoint mid-run holds)."""
    x = torch.randn(2, WIDTH, device=next(model.parameters()).device)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values())
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_bytes() -> int:
    """Resident anonymous memory: what a process really takes. File pages it maps (``mmap`` loads) are left out:
    they are the page cache, shared and dropped by the kernel under pressure, and a plain read fills it too."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


@dataclass
class PeakRSS:
    """Samples this process's resident anonymous memory every millisecond; ``extra`` is peak minus start."""

    start: int = 0
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.start)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())


@contextmanager
def peak_rss() -> Iterator[PeakRSS]:
    meter = PeakRSS(start=rss_bytes())
    meter.peak = meter.start
    sampler = threading.Thread(target=meter._sample, daemon=True)
    sampler.start()
    try:
        yield meter
    finally:
        meter._stop.set()
        sampler.join()
        meter.peak = max(meter.peak, rss_bytes())


def evict_from_page_cache(path: str) -> None:
    """Make the next read come from the disk, not memory: drop the (clean, fsynced) pages of every file under path."""
    paths = [path] if os.path.isfile(path) else [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
    for name in paths:
        descriptor = os.open(name, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def fsync_path(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class Measurement:
    seconds: list[float] = field(default_factory=list)
    extra_rss: list[int] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_extra_rss(self) -> int:
        return int(statistics.median(self.extra_rss))

    def as_dict(self) -> dict[str, object]:
        return {"seconds": self.seconds, "extra_rss": self.extra_rss}


def measure(action: Callable[[], object], runs: int, before: Callable[[], object] | None = None) -> Measurement:
    """Time ``action`` ``runs`` times (``before`` runs untimed first each time, e.g. evicting a file from cache)."""
    result = Measurement()
    for _ in range(runs):
        if before is not None:
            before()
        with peak_rss() as memory:
            started = time.perf_counter()
            action()
            result.seconds.append(time.perf_counter() - started)
        result.extra_rss.append(memory.extra)
    return result
