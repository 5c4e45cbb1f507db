"""Events fire in the documented order, so callbacks can rely on where they run."""

from __future__ import annotations

from cairn import Event, Trainer
from cairn.models import Classifier
from conftest import EventRecorder, TinyNet, make_loader

E = Event

MICROBATCH = [E.BEFORE_FORWARD, E.AFTER_FORWARD, E.BEFORE_LOSS, E.AFTER_LOSS, E.BEFORE_BACKWARD, E.AFTER_BACKWARD]
EVAL = [E.EVAL_START, E.EVAL_BATCH_START, E.EVAL_BEFORE_FORWARD, E.EVAL_AFTER_FORWARD, E.EVAL_BATCH_END, E.EVAL_END]


def batch_events(microbatches: int) -> list[Event]:
    return [
        E.BEFORE_DATALOADER,
        E.AFTER_DATALOADER,
        E.BATCH_START,
        E.BEFORE_TRAIN_BATCH,
        *(MICROBATCH * microbatches),
        E.AFTER_TRAIN_BATCH,
        E.BATCH_END,
        E.BATCH_CHECKPOINT,
    ]


def test_events_fire_in_order(recorder: EventRecorder) -> None:
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=16, batch_size=8),  # 2 batches an epoch
        eval_dataloader=make_loader(n=8, batch_size=8),  # 1 eval batch
        max_duration="2ep",
        device_train_microbatch_size=4,  # 2 microbatches a batch
        callbacks=recorder,
        progress_bar=False,
    )
    trainer.fit()
    epoch = [E.EPOCH_START, *batch_events(2), *batch_events(2), E.EPOCH_END, *EVAL, E.EPOCH_CHECKPOINT]
    assert recorder.events == [E.INIT, E.FIT_START, *epoch, *epoch, E.FIT_END]


def test_batch_interval_evaluation_runs_between_batch_end_and_checkpoint(recorder: EventRecorder) -> None:
    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=24, batch_size=8),
        eval_dataloader=make_loader(n=8, batch_size=8),
        max_duration="3ba",
        eval_interval="2ba",
        callbacks=recorder,
        progress_bar=False,
    )
    trainer.fit()
    ends = [i for i, e in enumerate(recorder.events) if e is E.BATCH_END]
    assert recorder.events[ends[1] + 1 : ends[1] + 1 + len(EVAL) + 1] == [*EVAL, E.BATCH_CHECKPOINT]
    assert recorder.count(E.EVAL_START) == 1  # at batch 2 only: batch 3 ends the run mid-epoch
    assert recorder.batches[recorder.events.index(E.EVAL_START)] == 2


def test_callable_eval_interval_sees_state_and_event(recorder: EventRecorder) -> None:
    seen: list[tuple[int, Event]] = []

    def every_odd_batch(state, event) -> bool:
        seen.append((state.timestamp.batch, event))
        return event is E.BATCH_END and state.timestamp.batch % 2 == 1

    trainer = Trainer(
        model=Classifier(TinyNet(), num_classes=3),
        train_dataloader=make_loader(n=32, batch_size=8),
        eval_dataloader=make_loader(n=8, batch_size=8),
        max_duration="1ep",
        eval_interval=every_odd_batch,
        callbacks=recorder,
        progress_bar=False,
    )
    trainer.fit()
    assert recorder.count(E.EVAL_START) == 2
    assert (4, E.EPOCH_END) in seen


def test_algorithms_run_before_callbacks() -> None:
    from cairn import Algorithm

    order: list[str] = []

    class Marker(Algorithm):
        def match(self, event, state) -> bool:
            return event is E.FIT_START

        def apply(self, event, state, logger) -> None:
            order.append("algorithm")

    class Watcher(EventRecorder):
        def fit_start(self, state, logger) -> None:
            order.append("callback")

    Trainer(
        model=Classifier(TinyNet()),
        train_dataloader=make_loader(),
        max_duration="1ba",
        algorithms=Marker(),
        callbacks=Watcher(),
        progress_bar=False,
    ).fit()
    assert order == ["algorithm", "callback"]
