"""Models the Trainer understands: a :class:`Model` subclass, a :class:`Classifier`, or a plain ``nn.Module``."""

from cairn.models.base import Model
from cairn.models.classifier import Classifier

__all__ = ["Classifier", "Model"]
