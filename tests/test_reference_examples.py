"""The reference checkpointing guide's examples, run with ``cairn`` where the guide says ``composer``.

Every example that does not touch an object store is here, nearly verbatim, each in its own temporary folder.
The guide's ``model`` is a ``cairn.models.Classifier`` around the user's own ``Model(num_channels, num_classes)``;
its ``train_dataloader`` is a small shuffled DataLoader of 4 batches per epoch. The asserts check what a user
running the example would notice: files on disk, what ``torch.load`` gives back, and where training stands.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cairn import Event, State, Time, TimeUnit, Trainer
from cairn.callbacks import CheckpointSaver
from cairn.errors import CheckpointIncompatibleError
from cairn.models import Classifier
from conftest import params_of

HIDDEN = 16
STATE_KEYS = [
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
    "integrations",
    "metadata",
]


class Model(nn.Module):
    """The user's own network: what the guide's ``Model(num_channels, num_classes)`` stands for."""

    def __init__(self, num_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(num_channels, HIDDEN), nn.ReLU())
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class FineTuneModel(nn.Module):
    """The same body under the same name, with a new head under another name (so strict loading must fail)."""

    def __init__(self, num_channels: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(num_channels, HIDDEN), nn.ReLU())
        self.classifier = nn.Linear(HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def labelled_data(num_channels: int, num_classes: int, n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, num_channels, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return TensorDataset(x, y)


@pytest.fixture(autouse=True)
def in_tmp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def num_channels() -> int:
    return 4


@pytest.fixture
def num_classes() -> int:
    return 3


@pytest.fixture
def model(num_channels: int, num_classes: int) -> Classifier:
    return Classifier(Model(num_channels, num_classes), num_classes=num_classes)


@pytest.fixture
def train_dataloader(num_channels: int, num_classes: int) -> DataLoader:
    return DataLoader(labelled_data(num_channels, num_classes), batch_size=8, shuffle=True)


def files_in(folder: str) -> set[str]:
    return set(os.listdir(folder))


def on_cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.cpu() for name, tensor in weights.items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return not differing_weights(a, b)


def differing_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names present on one side only, or holding other values: an assert on it fails with a short message."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k].cpu(), b[k].cpu()))


def save_one_epoch(model: nn.Module, train_dataloader: DataLoader) -> Trainer:
    """The guide's ``Save Interval`` example, which its later sections also use as their ``testsetup``."""
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="1ep",
        save_filename="ep{epoch}.pt",
        save_folder="./path/to/checkpoints",
        save_overwrite=True,
        save_interval="1ep",  # Save checkpoints every epoch
    )
    trainer.fit()
    return trainer


# -- the introduction --------------------------------------------------------------------------------------------


def test_intro_example_saves_every_epoch_under_its_name_and_links_the_latest(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="2ep",
        save_folder="./path/to/checkpoints",
        save_filename="ep{epoch}",
        save_latest_filename="latest",
        save_overwrite=True,
    )

    trainer.fit()

    assert trainer.saved_checkpoints == ["./path/to/checkpoints/ep1", "./path/to/checkpoints/ep2"]
    assert files_in("path/to/checkpoints") == {"ep1", "ep2", "latest"}
    assert os.path.islink("path/to/checkpoints/latest")
    assert os.path.realpath("path/to/checkpoints/latest") == os.path.realpath("path/to/checkpoints/ep2")


def test_default_names_are_epoch_batch_rank_with_a_latest_rank_link(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    trainer = Trainer(model=model, train_dataloader=train_dataloader, max_duration="1ep", save_folder="checkpoints")

    trainer.fit()

    assert files_in("checkpoints") == {"ep1-ba4-rank0.pt", "latest-rank0.pt"}
    assert os.readlink("checkpoints/latest-rank0.pt") == "ep1-ba4-rank0.pt"


# -- Save Interval -----------------------------------------------------------------------------------------------


def test_save_interval_example_trains_one_epoch_and_saves_one_checkpoint(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    trainer = save_one_epoch(model, train_dataloader)

    assert trainer.state.timestamp.epoch == 1
    assert files_in("path/to/checkpoints") == {"ep1.pt", "latest-rank0.pt"}


@pytest.mark.parametrize(
    ("save_interval", "saved"),
    [
        (1, ["ep1.pt", "ep2.pt", "ep3.pt", "ep4.pt", "ep5.pt"]),
        ("2ep", ["ep2.pt", "ep4.pt", "ep5.pt"]),
        (Time(2, TimeUnit.EPOCH), ["ep2.pt", "ep4.pt", "ep5.pt"]),
    ],
    ids=["int-means-epochs", "time-string", "Time"],
)
def test_save_interval_in_epochs_and_the_end_of_training_is_always_saved(
    model: Classifier, train_dataloader: DataLoader, save_interval: Any, saved: list[str]
) -> None:
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="5ep",
        save_folder="checkpoints",
        save_filename="ep{epoch}.pt",
        save_interval=save_interval,
    )

    trainer.fit()

    assert trainer.saved_checkpoints == [f"checkpoints/{name}" for name in saved]


def test_save_interval_in_batches_saves_mid_epoch(model: Classifier, train_dataloader: DataLoader) -> None:
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="3ep",
        save_folder="checkpoints",
        save_filename="ba{batch}.pt",
        save_interval="5ba",  # the guide's "500ba", scaled to a 4-batch epoch
    )

    trainer.fit()

    assert trainer.saved_checkpoints == ["checkpoints/ba5.pt", "checkpoints/ba10.pt", "checkpoints/ba12.pt"]
    assert torch.load("checkpoints/ba5.pt")["state"]["timestamp"]["batch_in_epoch"] == 1


def test_save_interval_callable_from_the_guide_saves_every_epoch_after_the_50th(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="53ep",
        save_folder="checkpoints",
        save_filename="ep{epoch}.pt",
        save_interval=lambda state, event: state.timestamp.epoch > 50 and event == Event.EPOCH_CHECKPOINT,
        progress_bar=False,  # 53 progress bars would take longer than the training
    )

    trainer.fit()

    assert trainer.saved_checkpoints == ["checkpoints/ep51.pt", "checkpoints/ep52.pt", "checkpoints/ep53.pt"]


def test_a_callable_that_never_says_yes_still_saves_the_end_of_training(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    seen: list[Event] = []

    def never(state: State, event: Event) -> bool:
        seen.append(event)
        return False

    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="2ep",
        save_folder="checkpoints",
        save_filename="ep{epoch}.pt",
        save_interval=never,
    )

    trainer.fit()

    assert trainer.saved_checkpoints == ["checkpoints/ep2.pt"]
    assert set(seen) == {Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT}


# -- Anatomy of a Checkpoint -------------------------------------------------------------------------------------


def test_anatomy_of_a_checkpoint_matches_the_guides_doctest(model: Classifier, train_dataloader: DataLoader) -> None:
    trainer = save_one_epoch(model, train_dataloader)

    assert trainer.saved_checkpoints == ["./path/to/checkpoints/ep1.pt"]
    latest_checkpoint = trainer.saved_checkpoints[-1]
    state_dict = torch.load(latest_checkpoint)
    assert list(state_dict) == ["state", "rng"]
    assert list(state_dict["state"].keys()) == STATE_KEYS


def test_serialized_attributes_are_the_twelve_the_guide_lists() -> None:
    assert list(State.serialized_attributes) == STATE_KEYS[:12]


def test_a_checkpoint_records_where_training_stood_and_every_generator(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    trainer = save_one_epoch(model, train_dataloader)

    state_dict = torch.load(trainer.saved_checkpoints[-1])

    assert state_dict["state"]["timestamp"]["epoch"] == 1
    assert state_dict["state"]["timestamp"]["batch"] == 4
    assert state_dict["state"]["run_name"] == trainer.state.run_name
    assert list(state_dict["state"]["optimizers"]) == ["AdamW"]
    assert len(state_dict["rng"]) == 1
    assert {"python", "numpy", "torch"} <= set(state_dict["rng"][0])
    metadata = state_dict["state"]["metadata"]
    assert metadata["torch_version"] == torch.__version__
    assert metadata["world_size"] == 1
    assert metadata["content_hash"].startswith("xxh3-128:")


# -- Resume training ---------------------------------------------------------------------------------------------


def copy_checkpoint_as(name: str) -> str:
    """The guide's testsetup: a one-epoch checkpoint copied under a later epoch's name."""
    assert os.path.exists("./path/to/checkpoints/ep1.pt")
    if not os.path.exists(f"./path/to/checkpoints/{name}"):
        shutil.copy2("./path/to/checkpoints/ep1.pt", f"./path/to/checkpoints/{name}")
    assert os.path.exists(f"./path/to/checkpoints/{name}")
    return f"./path/to/checkpoints/{name}"


def test_resume_example_starts_at_the_checkpoints_timestamp_and_trains_to_90_epochs(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    save_one_epoch(model, train_dataloader)
    copy_checkpoint_as("ep25.pt")
    saved = torch.load("./path/to/checkpoints/ep25.pt")

    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="90ep",
        save_overwrite=True,
        load_path="./path/to/checkpoints/ep25.pt",
        progress_bar=False,  # 89 progress bars would take several times longer than the training
    )
    assert trainer.state.timestamp.state_dict() == saved["state"]["timestamp"]
    assert trainer.state.run_name == saved["state"]["run_name"]
    trainer.fit()

    assert trainer.state.timestamp.epoch == 90
    assert trainer.state.timestamp.batch == 90 * 4


def test_resumed_trainer_holds_the_checkpoint_weights_before_fit(
    model: Classifier, train_dataloader: DataLoader, num_channels: int, num_classes: int
) -> None:
    save_one_epoch(model, train_dataloader)
    fresh = Classifier(Model(num_channels, num_classes))

    trainer = Trainer(
        model=fresh, train_dataloader=train_dataloader, max_duration="2ep", load_path="./path/to/checkpoints/ep1.pt"
    )

    assert same_weights(params_of(fresh.module), params_of(model.module))
    assert trainer.state.model is fresh
    assert trainer.state.optimizers[0].state  # AdamW's moments came back too


def test_resume_into_a_model_of_other_shapes_raises_and_names_the_mismatch(
    model: Classifier, train_dataloader: DataLoader, num_channels: int
) -> None:
    save_one_epoch(model, train_dataloader)

    with pytest.raises(CheckpointIncompatibleError, match=r"'head\.weight'"):
        Trainer(
            model=Classifier(Model(num_channels, num_classes=5)),
            train_dataloader=train_dataloader,
            max_duration="2ep",
            load_path="./path/to/checkpoints/ep1.pt",
        )


def test_resume_with_another_optimizer_raises_and_names_both(
    model: Classifier, train_dataloader: DataLoader, num_channels: int, num_classes: int
) -> None:
    save_one_epoch(model, train_dataloader)
    fresh = Classifier(Model(num_channels, num_classes))

    with pytest.raises(CheckpointIncompatibleError, match=r"AdamW.*SGD"):
        Trainer(
            model=fresh,
            train_dataloader=train_dataloader,
            max_duration="2ep",
            optimizers=torch.optim.SGD(fresh.parameters(), lr=0.1),
            load_path="./path/to/checkpoints/ep1.pt",
        )


def train_with_checkpoints(model: nn.Module, loader: DataLoader, *, load_path: str | None = None) -> Trainer:
    """Three epochs of 4 batches, saved every 3 batches; a resumed run only trains (its saves would collide)."""
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration="3ep",
        device="cpu",
        seed=7,
        save_folder="run" if load_path is None else None,
        save_filename="ba{batch}.pt",
        save_interval="3ba",
        load_path=load_path,
        progress_bar=False,
    )
    trainer.fit()
    return trainer


@pytest.mark.parametrize("checkpoint", ["run/ba6.pt", "run/ba9.pt"], ids=["mid-epoch", "other-mid-epoch"])
def test_a_resumed_run_ends_with_the_same_weights_as_the_run_never_stopped(
    num_channels: int, num_classes: int, checkpoint: str
) -> None:
    def loader() -> DataLoader:
        return DataLoader(labelled_data(num_channels, num_classes), batch_size=8, shuffle=True)

    uninterrupted = Classifier(Model(num_channels, num_classes))
    train_with_checkpoints(uninterrupted, loader())
    resumed = Classifier(Model(num_channels, num_classes))

    train_with_checkpoints(resumed, loader(), load_path=checkpoint)

    assert differing_weights(params_of(resumed), params_of(uninterrupted)) == []


@pytest.mark.parametrize("checkpoint", ["run/ba3.pt", "run/ba6.pt"], ids=["first-epoch", "second-epoch"])
def test_a_resumed_run_with_a_seeded_loader_generator_sees_the_same_data(
    num_channels: int, num_classes: int, checkpoint: str
) -> None:
    """A restarted script builds its DataLoader (and its generator, seeded as before) afresh, then resumes.

    The uninterrupted run's loader generator has advanced once per epoch; the resumed run's must be brought to the
    same point, or every epoch after the first is shuffled differently.
    """

    def loader() -> DataLoader:
        generator = torch.Generator().manual_seed(5)
        return DataLoader(labelled_data(num_channels, num_classes), batch_size=8, shuffle=True, generator=generator)

    uninterrupted = Classifier(Model(num_channels, num_classes))
    train_with_checkpoints(uninterrupted, loader())
    resumed = Classifier(Model(num_channels, num_classes))

    train_with_checkpoints(resumed, loader(), load_path=checkpoint)

    assert differing_weights(params_of(resumed), params_of(uninterrupted)) == []


# -- Saving for Inference ----------------------------------------------------------------------------------------


def test_saving_for_inference_stores_only_the_model_weights(model: Classifier, train_dataloader: DataLoader) -> None:
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="1ep",
        save_folder="checkpoints",
        save_weights_only=True,
        save_overwrite=True,
    )

    trainer.fit()

    state_dict = torch.load(trainer.saved_checkpoints[-1])
    assert list(state_dict) == ["state"]
    assert set(state_dict["state"]) == {"model", "metadata"}
    assert same_weights(on_cpu(state_dict["state"]["model"]), params_of(model.module))


def test_a_weights_only_checkpoint_loads_as_weights_only_even_without_asking(
    model: Classifier, train_dataloader: DataLoader, num_channels: int, num_classes: int
) -> None:
    Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="1ep",
        save_folder="checkpoints",
        save_weights_only=True,
    ).fit()
    fresh = Classifier(Model(num_channels, num_classes))

    trainer = Trainer(
        model=fresh,
        train_dataloader=train_dataloader,
        max_duration="2ep",
        load_path="checkpoints/ep1-ba4-rank0.pt",
        load_weights_only=False,
    )

    assert same_weights(params_of(fresh.module), params_of(model.module))
    assert trainer.state.timestamp.epoch == 0
    trainer.fit()
    assert trainer.state.timestamp.epoch == 2


# -- Saving Multiple Checkpoint Types ----------------------------------------------------------------------------


def test_two_savers_keep_the_latest_full_checkpoint_and_every_weights_only_one(
    model: Classifier, train_dataloader: DataLoader
) -> None:
    trainer = Trainer(
        model=model,
        train_dataloader=train_dataloader,
        max_duration="10ep",
        callbacks=[
            CheckpointSaver(
                folder="full_checkpoints",
                save_interval="5ep",
                overwrite=True,
                num_checkpoints_to_keep=1,  # only keep the latest, full checkpoint
            ),
            CheckpointSaver(
                folder="weights_only_checkpoints",
                weights_only=True,
                overwrite=True,
            ),
        ],
    )

    trainer.fit()

    assert files_in("full_checkpoints") == {"ep10-ba40-rank0.pt", "latest-rank0.pt"}
    assert files_in("weights_only_checkpoints") == {f"ep{e}-ba{4 * e}-rank0.pt" for e in range(1, 11)} | {
        "latest-rank0.pt"
    }
    assert list(torch.load("full_checkpoints/latest-rank0.pt")["state"]) == STATE_KEYS
    assert set(torch.load("weights_only_checkpoints/latest-rank0.pt")["state"]) == {"model", "metadata"}
    assert "full_checkpoints/ep5-ba20-rank0.pt" in trainer.saved_checkpoints  # saved, then pruned
    assert len(trainer.saved_checkpoints) == 2 + 10


# -- Fine-tuning -------------------------------------------------------------------------------------------------


@pytest.fixture
def finetune_model(num_channels: int) -> Classifier:
    return Classifier(FineTuneModel(num_channels, num_classes=5), num_classes=5)


@pytest.fixture
def finetune_dataloader(num_channels: int) -> DataLoader:
    return DataLoader(labelled_data(num_channels, num_classes=5, seed=1), batch_size=8, shuffle=True)


def test_fine_tuning_loads_only_the_shared_weights_and_trains_from_zero(
    model: Classifier, train_dataloader: DataLoader, finetune_model: Classifier, finetune_dataloader: DataLoader
) -> None:
    save_one_epoch(model, train_dataloader)
    copy_checkpoint_as("ep50.pt")
    untouched_head = params_of(finetune_model.module.classifier)

    ft_trainer = Trainer(
        model=finetune_model,
        train_dataloader=finetune_dataloader,
        max_duration="10ep",
        load_path="./path/to/checkpoints/ep50.pt",
        load_weights_only=True,
        load_strict_model_weights=False,
    )
    assert same_weights(params_of(finetune_model.module.body), params_of(model.module.body))
    assert same_weights(params_of(finetune_model.module.classifier), untouched_head)
    assert ft_trainer.state.timestamp.epoch == 0
    assert not ft_trainer.state.optimizers[0].state  # the checkpoint's optimizer state does not apply

    ft_trainer.fit()

    assert ft_trainer.state.timestamp.epoch == 10


def test_fine_tuning_strictly_names_the_weights_missing_on_either_side(
    model: Classifier, train_dataloader: DataLoader, finetune_model: Classifier, finetune_dataloader: DataLoader
) -> None:
    save_one_epoch(model, train_dataloader)

    with pytest.raises(CheckpointIncompatibleError) as raised:
        Trainer(
            model=finetune_model,
            train_dataloader=finetune_dataloader,
            max_duration="10ep",
            load_path="./path/to/checkpoints/ep1.pt",
            load_weights_only=True,
        )
    for name in ("head.weight", "head.bias", "classifier.weight", "classifier.bias"):
        assert name in str(raised.value)


def test_non_strict_loading_still_refuses_a_same_named_weight_of_another_shape(
    model: Classifier, train_dataloader: DataLoader, num_channels: int
) -> None:
    save_one_epoch(model, train_dataloader)

    with pytest.raises(CheckpointIncompatibleError, match=r"'head\.weight'.*\(3, 16\).*\(5, 16\)"):
        Trainer(
            model=Classifier(Model(num_channels, num_classes=5)),
            train_dataloader=train_dataloader,
            max_duration="10ep",
            load_path="./path/to/checkpoints/ep1.pt",
            load_weights_only=True,
            load_strict_model_weights=False,
        )


# -- Loading Weights Externally ----------------------------------------------------------------------------------


def test_loading_weights_externally_into_the_users_own_module(
    model: Classifier, train_dataloader: DataLoader, num_channels: int, num_classes: int
) -> None:
    save_one_epoch(model, train_dataloader)
    trained = params_of(model.module)

    model = Model(num_channels, num_classes)
    state_dict = torch.load("./path/to/checkpoints/ep1.pt")
    result = model.load_state_dict(state_dict["state"]["model"])

    assert not result.missing_keys and not result.unexpected_keys
    assert same_weights(params_of(model), trained)
