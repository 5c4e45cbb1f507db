"""The moments of a training run at which algorithms, callbacks and loggers may act."""

from __future__ import annotations

import enum

__all__ = ["Event"]


class Event(str, enum.Enum):
    """Points in the training loop, in the order they fire.

    A run fires ``INIT`` once when the Trainer is built, then for ``fit()``::

        FIT_START
        per epoch:  EPOCH_START
            per batch:  BEFORE_DATALOADER, AFTER_DATALOADER, BATCH_START, BEFORE_TRAIN_BATCH,
                        per microbatch: BEFORE_FORWARD, AFTER_FORWARD, BEFORE_LOSS, AFTER_LOSS,
                                        BEFORE_BACKWARD, AFTER_BACKWARD
                        AFTER_TRAIN_BATCH, BATCH_END, [evaluation], BATCH_CHECKPOINT
            EPOCH_END, [evaluation], EPOCH_CHECKPOINT
        FIT_END

    An evaluation fires ``EVAL_START``, then per batch ``EVAL_BATCH_START, EVAL_BEFORE_FORWARD,
    EVAL_AFTER_FORWARD, EVAL_BATCH_END``, then ``EVAL_END``. Checkpoints are decided at the two ``*_CHECKPOINT``
    events, after evaluation, so a checkpoint holds the metrics of the moment it was taken.
    """

    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BEFORE_DATALOADER = "before_dataloader"
    AFTER_DATALOADER = "after_dataloader"
    BATCH_START = "batch_start"
    BEFORE_TRAIN_BATCH = "before_train_batch"
    BEFORE_FORWARD = "before_forward"
    AFTER_FORWARD = "after_forward"
    BEFORE_LOSS = "before_loss"
    AFTER_LOSS = "after_loss"
    BEFORE_BACKWARD = "before_backward"
    AFTER_BACKWARD = "after_backward"
    AFTER_TRAIN_BATCH = "after_train_batch"
    BATCH_END = "batch_end"
    BATCH_CHECKPOINT = "batch_checkpoint"
    EPOCH_END = "epoch_end"
    EPOCH_CHECKPOINT = "epoch_checkpoint"
    EVAL_START = "eval_start"
    EVAL_BATCH_START = "eval_batch_start"
    EVAL_BEFORE_FORWARD = "eval_before_forward"
    EVAL_AFTER_FORWARD = "eval_after_forward"
    EVAL_BATCH_END = "eval_batch_end"
    EVAL_END = "eval_end"
    FIT_END = "fit_end"

    def __str__(self) -> str:
        return self.value
