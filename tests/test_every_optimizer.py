"""Every optimizer torch ships either trains, saves and resumes bit for bit, or is refused when the Trainer is built;
and a checkpoint whose tensors have another dtype than the run's is refused rather than silently rounded."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cairn import Trainer
from cairn.errors import CheckpointIncompatibleError
from cairn.models import Classifier
from conftest import TinyNet, make_loader

OPTIMIZERS = sorted(
    (
        cls
        for cls in vars(torch.optim).values()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
    ),
    key=lambda cls: cls.__name__,
)


def _needs_a_closure(cls: type[torch.optim.Optimizer]) -> bool:
    closure = inspect.signature(cls.step).parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


class SparseBag(nn.Module):
    """Token ids in, class scores out, through an embedding with sparse gradients (what SparseAdam is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 3, mode="mean", sparse=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(ids)


def _model_and_loader(cls: type[torch.optim.Optimizer]) -> tuple[nn.Module, DataLoader]:
    """A tiny problem each optimizer can work on: sparse gradients for SparseAdam, matrices only for Muon."""
    if cls.__name__ == "SparseAdam":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 10, (16, 4), generator=g)
        return SparseBag(), DataLoader(TensorDataset(ids, ids[:, 0] % 3), batch_size=4, shuffle=True)
    loader = make_loader(n=16, batch_size=4, shuffle=True)
    if cls.__name__ == "Muon":
        return nn.Sequential(nn.Linear(4, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)), loader
    return TinyNet(dropout=0.2), loader


def _trainer(cls: type[torch.optim.Optimizer], max_duration: str, **kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    net, loader = _model_and_loader(cls)
    return Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=loader,
        optimizers=cls(net.parameters()),
        max_duration=max_duration,
        device="cpu",
        seed=11,
        progress_bar=False,
        **kwargs,
    )


def _optimizer_tensors(trainer: Trainer) -> list[tuple[str, torch.Tensor]]:
    state = trainer.state.optimizers[0].state_dict()["state"]
    return [
        (f"{i}/{k}", v)
        for i, entry in sorted(state.items())
        for k, v in sorted(entry.items())
        if torch.is_tensor(v)
    ]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda cls: cls.__name__)
def test_every_torch_optimizer_resumes_bit_for_bit_or_is_refused_at_construction(
    tmp_path: Path, cls: type[torch.optim.Optimizer]
) -> None:
    if _needs_a_closure(cls):
        with pytest.raises(ValueError, match=f"{cls.__name__} needs a closure"):
            _trainer(cls, "6ba")
        return
    whole = _trainer(cls, "6ba")
    whole.fit()
    first = _trainer(cls, "3ba", save_folder=str(tmp_path), save_filename="ba{batch}.pt", save_interval="100ep")
    first.fit()
    resumed = _trainer(cls, "6ba", load_path=str(tmp_path / "ba3.pt"))
    assert resumed.state.timestamp.batch == 3
    resumed.fit()

    expected = whole.state.model.state_dict()
    got = resumed.state.model.state_dict()
    assert all(torch.equal(got[name], value) for name, value in expected.items()), f"{cls.__name__} weights differ"
    assert not all(torch.equal(first.state.model.state_dict()[n], v) for n, v in expected.items()), "it trained"
    expected_state, got_state = _optimizer_tensors(whole), _optimizer_tensors(resumed)
    assert [name for name, _ in got_state] == [name for name, _ in expected_state]
    for (name, want), (_, have) in zip(expected_state, got_state, strict=True):
        assert want.dtype == have.dtype and torch.equal(want, have), f"{cls.__name__} state {name} differs"


def test_adafactor_factored_state_of_another_shape_is_still_refused(tmp_path: Path) -> None:
    """Adafactor's (rows, 1) statistics are allowed, but a checkpoint of a wider layer is not."""
    _trainer(torch.optim.Adafactor, "2ba", save_folder=str(tmp_path), save_filename="ba{batch}.pt").fit()
    torch.manual_seed(0)
    wider = TinyNet(hidden=16)
    with pytest.raises(CheckpointIncompatibleError) as caught:
        Trainer(
            model=Classifier(wider, num_classes=3),
            train_dataloader=make_loader(n=16, batch_size=4),
            optimizers=torch.optim.Adafactor(wider.parameters()),
            max_duration="4ba",
            progress_bar=False,
            load_path=str(tmp_path / "ba2.pt"),
        )
    message = str(caught.value)
    assert "'layers.0.weight': checkpoint has shape (8, 4), model has (16, 4)" in message
    assert "optimizer Adafactor state 'row_var' of parameter 0: checkpoint shape (8, 1), parameter shape (16, 4)" in (
        message
    )


# -- dtypes -----------------------------------------------------------------------------------------------------


def _dtype_trainer(dtype: torch.dtype, tmp_path: Path, **kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    net = TinyNet().to(dtype)
    data = make_loader(n=16, batch_size=4).dataset.tensors
    loader = DataLoader(TensorDataset(data[0].to(dtype), data[1]), batch_size=4)
    return Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=loader,
        optimizers=torch.optim.Adam(net.parameters()),
        max_duration="2ba",
        device="cpu",
        seed=3,
        progress_bar=False,
        **kwargs,
    )


@pytest.fixture
def float64_checkpoint(tmp_path: Path) -> Path:
    _dtype_trainer(torch.float64, tmp_path, save_folder=str(tmp_path / "f64"), save_filename="ba{batch}.pt").fit()
    return tmp_path / "f64" / "ba2.pt"


def test_a_float64_checkpoint_is_refused_by_a_float32_run_and_every_rounded_tensor_is_named(
    tmp_path: Path, float64_checkpoint: Path
) -> None:
    with pytest.raises(CheckpointIncompatibleError) as caught:
        _dtype_trainer(torch.float32, tmp_path, load_path=str(float64_checkpoint))
    message = str(caught.value)
    for name in ("layers.0.weight", "layers.0.bias", "layers.3.weight", "layers.3.bias"):
        assert f"model weight {name!r}: checkpoint has dtype torch.float64, model has torch.float32" in message
    for index in range(4):
        for state in ("exp_avg", "exp_avg_sq"):
            assert (
                f"optimizer Adam state {state!r} of parameter {index}: checkpoint dtype torch.float64, "
                "parameter dtype torch.float32"
            ) in message
    assert "'step'" not in message, "step is float32 whatever the parameter's dtype"


def test_weights_only_loading_also_refuses_to_round(tmp_path: Path, float64_checkpoint: Path) -> None:
    with pytest.raises(CheckpointIncompatibleError, match="dtype torch.float64, model has torch.float32"):
        _dtype_trainer(torch.float32, tmp_path, load_path=str(float64_checkpoint), load_weights_only=True)


def test_a_float64_run_resumes_from_its_own_checkpoint(tmp_path: Path, float64_checkpoint: Path) -> None:
    """float64 parameters with a float32 ``step`` are what Adam itself writes: no false alarm."""
    resumed = _dtype_trainer(torch.float64, tmp_path, load_path=str(float64_checkpoint))
    assert resumed.state.timestamp.batch == 2
    assert resumed.state.model.module.layers[0].weight.dtype == torch.float64


def test_a_widening_load_is_exact_and_allowed(tmp_path: Path) -> None:
    """float32 weights into a float64 model lose nothing, so fine-tuning from a lower precision still works."""
    _dtype_trainer(torch.float32, tmp_path, save_folder=str(tmp_path / "f32"), save_filename="ba{batch}.pt").fit()
    wide = _dtype_trainer(torch.float64, tmp_path, load_path=str(tmp_path / "f32" / "ba2.pt"))
    assert wide.state.model.module.layers[0].weight.dtype == torch.float64
