"""The State's plain-data form: what a checkpoint will hold, in the order the contract fixes."""

from __future__ import annotations

import torch

from cairn import Callback, State, Trainer
from cairn.models import Classifier
from conftest import TinyNet, make_loader

SERIALIZED = [
    "model",
    "optimizers",
    "schedulers",
    "algorithms",
    "callbacks",
    "scaler",
    "timestamp",
    "rank_zero_seed",
    "train_metrics",
    "eval_metrics",
    "run_name",
    "dataset_state",
]


class Counter(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def batch_end(self, state, logger) -> None:
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state) -> None:
        self.batches = state["batches"]


def _trainer(net: TinyNet, max_duration: str = "3ba", **kwargs) -> Trainer:
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
    return Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=make_loader(n=32),
        eval_dataloader=make_loader(n=16),
        eval_interval="1ba",
        max_duration=max_duration,
        optimizers=optimizer,
        schedulers=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9),
        precision="amp_fp16",
        run_name="state-test",
        seed=11,
        progress_bar=False,
        **kwargs,
    )


def test_serialized_attributes_are_the_contract() -> None:
    assert list(State.serialized_attributes) == SERIALIZED


def test_state_dict_keys_come_in_the_documented_order() -> None:
    trainer = _trainer(TinyNet())
    assert list(trainer.state.state_dict()) == [*SERIALIZED, "integrations"]


def test_state_dict_is_plain_data_that_weights_only_loading_accepts(tmp_path) -> None:
    trainer = _trainer(TinyNet(), callbacks=Counter())
    trainer.fit()
    path = tmp_path / "state.pt"
    torch.save(trainer.state.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["timestamp"]["batch"] == 3
    assert loaded["callbacks"]["Counter"] == {"batches": 3}
    assert set(loaded["optimizers"]) == {"AdamW"} and set(loaded["schedulers"]) == {"StepLR"}
    assert loaded["run_name"] == "state-test" and loaded["rank_zero_seed"] == 11


def test_the_model_entry_loads_into_the_bare_network() -> None:
    trainer = _trainer(TinyNet())
    weights = trainer.state.state_dict()["model"]
    assert not any(key.startswith("module.") for key in weights)
    bare = TinyNet()
    bare.load_state_dict(weights)  # strict: same names, same shapes
    assert all(torch.equal(bare.state_dict()[k], v.cpu()) for k, v in weights.items())


def test_load_state_dict_restores_every_serialized_attribute() -> None:
    source = _trainer(TinyNet(), callbacks=Counter())
    source.fit()
    saved = source.state.state_dict()

    counter = Counter()
    target = _trainer(TinyNet(), max_duration="5ba", callbacks=counter)
    target.state.load_state_dict(saved)
    restored = target.state.state_dict()

    for key, value in saved["model"].items():
        assert torch.equal(restored["model"][key], value)
    assert restored["timestamp"] == saved["timestamp"]
    assert restored["optimizers"]["AdamW"]["state"][0]["exp_avg"].equal(
        saved["optimizers"]["AdamW"]["state"][0]["exp_avg"]
    )
    assert restored["schedulers"] == saved["schedulers"]
    assert restored["scaler"] == saved["scaler"]
    assert counter.batches == 3
    for name, value in saved["eval_metrics"]["eval"]["MulticlassAccuracy"].items():
        assert torch.equal(
            torch.as_tensor(restored["eval_metrics"]["eval"]["MulticlassAccuracy"][name]), torch.as_tensor(value)
        )
    assert (
        target.state.eval_metrics["eval"]["MulticlassAccuracy"].compute()
        == source.state.eval_metrics["eval"]["MulticlassAccuracy"].compute()
    )

    target.fit()  # continues from batch 3 to the new max_duration
    assert target.state.timestamp.batch == 5 and counter.batches == 5


def test_two_optimizers_of_one_class_get_distinct_keys() -> None:
    net = TinyNet()
    first = torch.optim.SGD(net.layers[0].parameters(), lr=0.1)
    second = torch.optim.SGD(net.layers[3].parameters(), lr=0.2)
    trainer = Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(),
        max_duration="1ba",
        optimizers=[first, second],
        progress_bar=False,
    )
    trainer.fit()
    saved = trainer.state.state_dict()["optimizers"]
    assert list(saved) == ["SGD", "SGD#1"]
    assert saved["SGD#1"]["param_groups"][0]["lr"] == 0.2
