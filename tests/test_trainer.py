"""The training loop: how long it runs, what one step does, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from cairn import Event, Time, Trainer
from cairn.loggers import InMemoryLogger
from cairn.models import Classifier, Model
from conftest import EventRecorder, TinyNet, make_dataset, make_loader, params_of

# -- max_duration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_duration", "batches", "epochs"),
    [
        ("2ep", 8, 2),  # 4 batches of 8 an epoch
        (2, 8, 2),  # an int counts epochs
        (Time(3, "ba"), 3, 0),
        ("6ba", 6, 1),
        ("4ba", 4, 1),  # the last batch of an epoch completes that epoch
        ("20sp", 3, 0),  # 8, 16, 24: the third batch reaches 20 samples
        ("24sp", 3, 0),
        ("25sp", 4, 1),
    ],
)
def test_max_duration_stops_at_the_right_batch(max_duration, batches: int, epochs: int) -> None:
    trainer = Trainer(
        model=Classifier(TinyNet()), train_dataloader=make_loader(n=32), max_duration=max_duration, progress_bar=False
    )
    trainer.fit()
    assert trainer.state.timestamp.batch == batches
    assert trainer.state.timestamp.epoch == epochs
    assert trainer.state.timestamp.sample == 8 * batches


class TokenModel(Model):
    """A toy language model: batches are dicts of input_ids, 5 tokens per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 4)
        self.out = nn.Linear(4, 16)

    def forward(self, batch):
        return self.out(self.embed(batch["input_ids"]))

    def loss(self, outputs, batch):
        return F.cross_entropy(outputs.flatten(0, 1), batch["input_ids"].flatten())


def test_max_duration_in_tokens_counts_input_ids() -> None:
    data = [{"input_ids": torch.randint(0, 16, (5,))} for _ in range(12)]
    loader = DataLoader(data, batch_size=4)  # 20 tokens a batch
    trainer = Trainer(model=TokenModel(), train_dataloader=loader, max_duration="50tok", progress_bar=False)
    trainer.fit()
    assert trainer.state.timestamp.token == 60 and trainer.state.timestamp.batch == 3


def test_max_duration_in_tokens_without_tokens_is_an_error() -> None:
    trainer = Trainer(
        model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration="10tok", progress_bar=False
    )
    with pytest.raises(ValueError, match="input_ids"):
        trainer.fit()


@pytest.mark.parametrize(
    ("value", "message"),
    [("10 epochs", "max_duration='10 epochs'"), ("0.5dur", "counted in"), ("0ba", "greater than zero"), ("30m", "sec")],
)
def test_bad_max_duration_is_refused_with_the_reason(value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=value, progress_bar=False)


def test_fit_again_after_the_end_does_nothing() -> None:
    trainer = Trainer(
        model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration="2ba", progress_bar=False
    )
    trainer.fit()
    weights = params_of(trainer.state.model)
    trainer.fit()
    assert trainer.state.timestamp.batch == 2
    assert all(torch.equal(weights[k], v) for k, v in params_of(trainer.state.model).items())


def test_stop_training_ends_after_the_current_batch() -> None:
    class StopAtThree(EventRecorder):
        def batch_end(self, state, logger) -> None:
            if state.timestamp.batch == 3:
                state.stop_training()

    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(),
        max_duration="5ep",
        callbacks=StopAtThree(),
        progress_bar=False,
    )
    trainer.fit()
    assert trainer.state.timestamp.batch == 3


# -- one optimization step ----------------------------------------------------------------------------------------


def _one_step(microbatch_size: int | None, precision: str | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = TinyNet()
    trainer = Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(n=12, batch_size=12),
        max_duration="1ba",
        optimizers=torch.optim.SGD(net.parameters(), lr=0.5),
        device_train_microbatch_size=microbatch_size,
        precision=precision,
        seed=1,
        progress_bar=False,
    )
    trainer.fit()
    return params_of(net)


@pytest.mark.parametrize("microbatch_size", [1, 4, 5, 12])
def test_gradient_accumulation_matches_one_large_batch(microbatch_size: int) -> None:
    whole = _one_step(None)
    accumulated = _one_step(microbatch_size)
    initial = (torch.manual_seed(0), params_of(TinyNet()))[1]
    for name in whole:
        assert not torch.equal(whole[name], initial[name]), "the step must change the weights"
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-6)


def test_the_default_optimizer_is_adamw_with_lr_1e_3() -> None:
    trainer = Trainer(
        model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration="1ba", progress_bar=False
    )
    (optimizer,) = trainer.state.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_schedulers_step_once_per_batch() -> None:
    net = TinyNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    trainer = Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(n=24),
        max_duration="3ba",
        optimizers=optimizer,
        schedulers=scheduler,
        progress_bar=False,
    )
    trainer.fit()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.125)


# -- precision ----------------------------------------------------------------------------------------------------


class DtypeSpy(EventRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def after_forward(self, state, logger) -> None:
        self.dtypes.append(state.outputs.dtype)


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("amp_bf16", torch.bfloat16)])
def test_precision_sets_the_forward_dtype_on_cpu(precision: str, dtype: torch.dtype) -> None:
    spy = DtypeSpy()
    net = TinyNet()
    before = params_of(net)
    trainer = Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(),
        max_duration="2ba",
        precision=precision,
        device="cpu",
        callbacks=spy,
        progress_bar=False,
    )
    trainer.fit()
    assert spy.dtypes == [dtype, dtype]
    assert all(p.dtype == torch.float32 for p in net.parameters()), "weights stay in fp32"
    assert any(not torch.equal(before[k], v) for k, v in params_of(net).items())
    assert trainer.state.scaler is None


def test_amp_fp16_uses_a_grad_scaler_that_is_checkpointed() -> None:
    spy = DtypeSpy()
    trainer = Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(),
        max_duration="2ba",
        precision="amp_fp16",
        device="cpu",
        callbacks=spy,
        progress_bar=False,
    )
    trainer.fit()
    assert spy.dtypes == [torch.float16, torch.float16]
    assert isinstance(trainer.state.scaler, torch.amp.GradScaler)
    assert trainer.state.state_dict()["scaler"]["scale"] > 0


def test_unknown_precision_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'fp32', 'amp_bf16', 'amp_fp16'"):
        Trainer(model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, precision="fp8")


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device='tpu'"):
        Trainer(model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
def test_gpu_without_a_gpu_says_so() -> None:
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        Trainer(model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, device="gpu")


def test_default_device_is_cpu_without_a_gpu() -> None:
    trainer = Trainer(model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, progress_bar=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert trainer.state.device.type == expected


# -- evaluation ---------------------------------------------------------------------------------------------------


def test_eval_metrics_match_a_hand_computed_accuracy() -> None:
    history = InMemoryLogger()
    net = TinyNet()
    eval_data = make_dataset(n=40, seed=5)
    trainer = Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=make_loader(n=64),
        eval_dataloader=DataLoader(eval_data, batch_size=16),  # 16 + 16 + 8: uneven on purpose
        max_duration="2ep",
        loggers=history,
        progress_bar=False,
    )
    trainer.fit()
    net.cpu().eval()
    with torch.no_grad():
        expected = (net(eval_data.tensors[0]).argmax(dim=1) == eval_data.tensors[1]).float().mean().item()
    assert [step for step, _ in history.data["metrics/eval/MulticlassAccuracy"]] == [8, 16]
    assert history.latest["metrics/eval/MulticlassAccuracy"] == pytest.approx(expected)
    assert "metrics/train/MulticlassAccuracy" in history.latest
    assert len(history.data["loss/train/total"]) == 16


def test_training_learns_the_rule() -> None:
    history = InMemoryLogger()
    net = TinyNet(hidden=16)
    trainer = Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=make_loader(n=256, batch_size=32, shuffle=True),
        eval_dataloader=make_loader(n=256, batch_size=64, seed=1),
        max_duration="15ep",
        optimizers=torch.optim.AdamW(net.parameters(), lr=0.02),
        seed=3,
        loggers=history,
        progress_bar=False,
    )
    trainer.fit()
    losses = [v for _, v in history.data["loss/train/total"]]
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 * 0.6
    assert history.latest["metrics/eval/MulticlassAccuracy"] > 0.8


def test_trainer_eval_returns_the_metrics() -> None:
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(),
        eval_dataloader=make_loader(n=16),
        max_duration=1,
        progress_bar=False,
    )
    results = trainer.eval()
    assert set(results) == {"metrics/eval/MulticlassAccuracy"}
    assert 0.0 <= results["metrics/eval/MulticlassAccuracy"] <= 1.0


# -- plain modules ------------------------------------------------------------------------------------------------


class LossReturningNet(nn.Module):
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.net = TinyNet()
        self.as_dict = as_dict

    def forward(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return {"loss": loss} if self.as_dict else loss


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_plain_module_returning_its_loss_trains_and_reports_eval_loss(as_dict: bool) -> None:
    model = LossReturningNet(as_dict)
    history = InMemoryLogger()
    before = params_of(model)
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(),
        eval_dataloader=make_loader(n=16),
        max_duration="1ep",
        loggers=history,
        progress_bar=False,
    )
    trainer.fit()
    assert any(not torch.equal(before[k], v) for k, v in params_of(model).items())
    assert history.latest["metrics/eval/loss"] > 0
    assert set(trainer.state.state_dict()["model"]) == set(model.state_dict())


def test_a_module_that_returns_logits_gets_a_clear_error() -> None:
    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyNet()

        def forward(self, batch):
            return self.net(batch[0])

    trainer = Trainer(model=Logits(), train_dataloader=make_loader(), max_duration=1, progress_bar=False)
    with pytest.raises(ValueError, match=r"single-number tensor, got a tensor of shape \(8, 3\)"):
        trainer.fit()


# -- seeds, names, arguments --------------------------------------------------------------------------------------


def _train_shuffled_with_dropout(seed: int | None) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(123)
    net = TinyNet(dropout=0.5)
    trainer = Trainer(
        model=Classifier(net),
        train_dataloader=make_loader(shuffle=True),
        max_duration="2ep",
        seed=seed,
        progress_bar=False,
    )
    trainer.fit()
    return params_of(net), trainer.state.rank_zero_seed


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first, seed = _train_shuffled_with_dropout(7)
    again, _ = _train_shuffled_with_dropout(7)
    other, _ = _train_shuffled_with_dropout(8)
    assert seed == 7
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_without_a_seed_one_is_drawn_and_stored() -> None:
    _, seed_a = _train_shuffled_with_dropout(None)
    _, seed_b = _train_shuffled_with_dropout(None)
    assert isinstance(seed_a, int) and seed_a != seed_b


def test_run_name_is_generated_when_absent_and_kept_when_given() -> None:
    make = lambda **kw: Trainer(  # noqa: E731
        model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, progress_bar=False, **kw
    )
    generated = make().state.run_name
    assert generated.count("-") == 2 and generated.split("-")[0].isdigit()
    assert make(run_name="my-run").state.run_name == "my-run"


def test_passing_the_wrong_kind_of_object_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="callbacks: expected Callback"):
        Trainer(model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, callbacks=[print])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Trainer(model=lambda b: b, train_dataloader=make_loader(), max_duration=1)
    with pytest.raises(ValueError, match="device_train_microbatch_size=0"):
        Trainer(
            model=Classifier(TinyNet()), train_dataloader=make_loader(), max_duration=1, device_train_microbatch_size=0
        )


def test_the_trainer_keeps_the_objects_it_was_given() -> None:
    net = TinyNet()
    model = Classifier(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    recorder = EventRecorder()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(),
        max_duration=1,
        optimizers=[optimizer],
        callbacks=[recorder],
        progress_bar=False,
    )
    assert trainer.state.model is model
    assert trainer.state.optimizers == [optimizer]
    assert recorder in trainer.state.callbacks
    assert recorder.events == [Event.INIT]
    copy.deepcopy(trainer.state.state_dict())  # plain data: copies without special handling
