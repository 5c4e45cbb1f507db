"""Models: a Classifier wraps any network; checkpoints of it hold the network's own weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cairn.core.state import model_weights_module
from cairn.models import Classifier, Model
from conftest import TinyNet


def test_classifier_runs_inputs_through_the_module_and_scores_with_the_loss() -> None:
    net = TinyNet()
    model = Classifier(net)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    outputs = model((x, y))
    assert torch.equal(outputs, net(x))
    assert torch.isclose(model.loss(outputs, (x, y)), nn.functional.cross_entropy(net(x), y))


def test_classifier_takes_num_classes_from_the_module() -> None:
    assert Classifier(TinyNet()).num_classes == 3
    assert set(Classifier(TinyNet()).get_metrics()) == {"MulticlassAccuracy"}
    assert Classifier(nn.Linear(4, 2)).get_metrics() == {}


def test_classifier_explains_a_bad_batch() -> None:
    with pytest.raises(ValueError, match=r"\(inputs, targets\).*got dict"):
        Classifier(TinyNet())({"x": torch.randn(2, 4)})


def test_the_saved_module_is_the_users_network_even_inside_wrappers() -> None:
    net = TinyNet()
    assert model_weights_module(Classifier(net)) is net
    assert model_weights_module(nn.DataParallel(Classifier(net))) is net
    plain = nn.Linear(2, 2)
    assert model_weights_module(plain) is plain


def test_a_model_subclass_must_say_how_to_run() -> None:
    with pytest.raises(NotImplementedError, match="forward"):
        Model()(None)
