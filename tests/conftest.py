"""Small models and data shared by the tests: fast on two CPU cores, real enough to learn."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cairn.core import Callback, Event, State
from cairn.loggers import Logger


class TinyNet(nn.Module):
    """A two-layer MLP with dropout, so that RNG handling matters."""

    num_classes = 3

    def __init__(self, in_features: int = 4, hidden: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, self.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def make_dataset(n: int = 32, in_features: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # a learnable rule with 3 classes
    return TensorDataset(x, y)


class IndexedDataset(Dataset):
    """:func:`make_dataset`'s samples, each with its own index, so that a rank can say exactly which it trained."""

    def __init__(self, n: int = 64) -> None:
        self.inner = make_dataset(n=n)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        x, y = self.inner[index]
        return x, y, index


def make_loader(n: int = 32, batch_size: int = 8, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(make_dataset(n, seed=seed), batch_size=batch_size, shuffle=shuffle)


class EventRecorder(Callback):
    """Remembers every event it saw, with the timestamp's batch count at that moment."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.batches: list[int] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        self.events.append(event)
        self.batches.append(state.timestamp.batch)
        super().run_event(event, state, logger)

    def count(self, event: Event) -> int:
        return self.events.count(event)


@pytest.fixture
def recorder() -> EventRecorder:
    return EventRecorder()


def params_of(module: nn.Module) -> dict[str, Any]:
    """A CPU copy of the weights, comparable whichever device the run trained on."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def build_trainer(tmp_path: Any, **kwargs: Any) -> Any:
    """A small trainer saving into ``tmp_path/ckpt`` unless told otherwise; nothing is trained until ``fit()``."""
    from cairn import Trainer
    from cairn.models import Classifier

    kwargs.setdefault("save_folder", str(tmp_path / "ckpt"))
    kwargs.setdefault("max_duration", "2ba")
    kwargs.setdefault("model", Classifier(TinyNet()))
    kwargs.setdefault("train_dataloader", make_loader())
    kwargs.setdefault("progress_bar", False)
    kwargs.setdefault("run_name", "run")
    return Trainer(**kwargs)


def refused_at_construction(tmp_path: Any, error: type[Exception], argument: str, value: Any, **kwargs: Any) -> str:
    """Build a trainer with ``argument=value``; assert the constructor raises ``error`` naming both in one sentence
    and writes nothing; return the message."""
    before = set(tmp_path.rglob("*"))
    with pytest.raises(error) as info:
        build_trainer(tmp_path, **{argument: value}, **kwargs)
    message = str(info.value)
    assert f"{argument}={value!r}" in message, message
    assert "\n" not in message, "one sentence"
    assert set(tmp_path.rglob("*")) == before, "a refused trainer wrote something"
    return message


@contextlib.contextmanager
def fifo_writer(fifo: Path) -> Iterator[threading.Event]:
    """A writer waiting on ``fifo``: its open returns only when someone opens it to read, which sets the event
    (a reader that must never open a FIFO asserts the event stays unset)."""
    connected = threading.Event()

    def writer() -> None:
        with contextlib.suppress(BrokenPipeError), open(fifo, "wb") as pipe:
            connected.set()
            pipe.write(b"not a shard")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield connected
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # lets the writer's open return, so it ends
        thread.join(timeout=10)


def s3_run_trainer(max_duration: str = "3ep", init_seed: int = 0, **kwargs: Any) -> Any:
    """The store tests' run: TinyNet on 32 samples in batches of 8 (4 batches an epoch), on the CPU, seed 7."""
    from cairn import Trainer
    from cairn.models import Classifier

    torch.manual_seed(init_seed)
    return Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8),
        max_duration=max_duration,
        device="cpu",
        seed=7,
        progress_bar=False,
        **kwargs,
    )


class FrozenBody(nn.Module):
    """A fine-tune for the incremental tests: a frozen body of 160 KiB (a 128 KiB weight, a 32 KiB bias), a
    trained head of 96 KiB; with :func:`small_chunks` (64 KiB chunks) its tensors span several chunks."""

    num_classes = 3

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8192)
        self.body.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(8192, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(torch.relu(self.body(x))))


def frozen_body_trainer(max_duration: str, *, init_seed: int = 0, **kwargs: Any) -> Any:
    """A :class:`FrozenBody` fine-tune (AdamW on the head only) on 32 shuffled samples in batches of 8, seed 7."""
    from cairn import Trainer
    from cairn.models import Classifier

    torch.manual_seed(init_seed)  # a resumed run starts from other weights: the checkpoint must replace them
    net = FrozenBody()
    return Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8, shuffle=True),
        max_duration=max_duration,
        optimizers=torch.optim.AdamW(net.head.parameters(), lr=0.01),
        device="cpu",
        seed=7,
        progress_bar=False,
        **kwargs,
    )


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 64 KiB instead of 8 MiB, so that small test models span several."""
    import cairn.checkpoint.incremental.manifest as manifest

    monkeypatch.setattr(manifest, "CHUNK_BYTES", 64 << 10)


# Object-store servers on 127.0.0.1, started by fixtures (each module documents its server).
class ScriptedMetric(Callback):
    """Logs ``values[epoch - 1]`` under the metric ``name`` at each epoch's end, as an evaluation would, before that
    epoch's checkpoint (which records it for ``save_best_metric``): retention's tests script what is best."""

    def __init__(self, name: str, values: list[float]) -> None:
        self.name, self.values = name, values

    def epoch_end(self, state: State, logger: Logger) -> None:
        logger.log_metrics({self.name: self.values[state.timestamp.epoch - 1]})


def scripted_store_trainer(bucket: str, epochs: int, metric: str, values: list[float], **kwargs: Any) -> Any:
    """The store-retention tests' run: TinyNet saved to ``s3://<bucket>/run`` as ``ep{epoch}.pt`` each epoch, with
    ``metric`` logged from ``values`` at each epoch's end (:class:`ScriptedMetric`) and recorded as the best metric."""
    from cairn import Trainer
    from cairn.models import Classifier

    return Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(16),
        max_duration=f"{epochs}ep",
        progress_bar=False,
        run_name="r",
        callbacks=[ScriptedMetric(metric, values)],
        save_folder=f"s3://{bucket}/run",
        save_filename="ep{epoch}.pt",
        save_interval="1ep",
        save_best_metric=metric,
        **kwargs,
    )


@pytest.fixture
def sharded_folder(tmp_path: Path) -> Path:
    """A small trained checkpoint written as a sharded folder (one process, as ``cairn ckpt convert`` writes it)."""
    from cairn.checkpoint.tools.convert import convert

    saved = str(tmp_path / "saved")
    build_trainer(tmp_path, save_folder=saved, save_filename="ep{epoch}.pt", max_duration="1ep").fit()
    folder = tmp_path / "ep1-sharded"
    convert(str(tmp_path / "saved" / "ep1.pt"), "sharded", str(folder))
    return folder


def upload_folder(folder: Path, store: Any, name: str) -> None:
    """Upload a sharded folder's files under ``name/`` in ``store``, ``cairn.pt`` last, as a save does."""
    for file in sorted(os.listdir(folder), key=lambda f: f == "cairn.pt"):
        store.upload_object(f"{name}/{file}", str(folder / file))


from store_servers.azurite import *  # noqa: E402, F403
from store_servers.faulty_proxy import *  # noqa: E402, F403
from store_servers.gcs import *  # noqa: E402, F403
from store_servers.moto import *  # noqa: E402, F403
from store_servers.oci import *  # noqa: E402, F403
