"""The retention rules as one pure function (``cairn.checkpoint.save.retention.reasons_to_keep``): what it keeps, and
why, in the words ``cairn ckpt ls`` shows. Properties over generated folders, then the exact words."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cairn import Time
from cairn.checkpoint.save.retention import (
    RetentionCandidate,
    RetentionRules,
    best_ranking,
    check_keep_every,
    deletable,
    on_boundary,
    reasons_to_keep,
)

_VALUES = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False, width=32), st.integers(-3, 3))


@st.composite
def folders(draw: st.DrawFn) -> list[RetentionCandidate]:
    """Checkpoints at distinct (epoch, batch) points, with a metric value or none; ties in value are common."""
    count = draw(st.integers(0, 12))
    points = sorted(draw(st.sets(st.tuples(st.integers(0, 12), st.integers(0, 3)), min_size=count, max_size=count)))
    found = []
    for epoch, batch_in_epoch in points:
        progress = {"epoch": epoch, "batch_in_epoch": batch_in_epoch, "batch": epoch * 4 + batch_in_epoch}
        found.append(
            RetentionCandidate(
                name=f"ep{epoch}-ba{progress['batch']}.pt",
                order=(float(epoch), float(progress["batch"])),
                progress=progress,
                value=draw(_VALUES),
            )
        )
    return draw(st.permutations(found))  # the rules must not depend on the order they are given in


@st.composite
def rules(draw: st.DrawFn) -> RetentionRules:
    every = draw(st.one_of(st.none(), st.sampled_from(["1ep", "2ep", "3ep", "4ba", "6ba"])))
    return RetentionRules(
        recent=draw(st.integers(-1, 5)),
        best=draw(st.integers(0, 5)),
        mode=draw(st.sampled_from(["max", "min"])),
        every=None if every is None else check_keep_every(every),
    )


def _has_value(candidate: RetentionCandidate) -> bool:
    return candidate.value is not None and not math.isnan(candidate.value)


@settings(max_examples=300, deadline=None)
@given(folders(), rules(), st.data())
def test_a_checkpoint_a_link_names_is_never_deleted(found: list[RetentionCandidate], rule: RetentionRules, data):
    if not found:
        return
    linked = data.draw(st.sampled_from(found))
    other = data.draw(st.sampled_from(found))
    reasons = reasons_to_keep(found, rule, {"latest": linked.name, "best": other.name})
    assert "latest" in reasons[linked.name]
    assert "best" in reasons[other.name]
    assert linked.name not in deletable(found, rule, {"latest": linked.name})


@settings(max_examples=300, deadline=None)
@given(folders(), rules())
def test_the_newest_is_never_deleted_unless_no_recent_one_is_kept(found: list[RetentionCandidate], rule):
    if not found or rule.recent == 0:
        return  # num_checkpoints_to_keep=0: the saver deletes each once uploaded (the latest link goes with it)
    newest = max(found, key=lambda c: c.order)
    assert newest.name not in deletable(found, rule)
    assert f"recent 1/{'all' if rule.recent < 0 else rule.recent}" in reasons_to_keep(found, rule)[newest.name]


@settings(max_examples=300, deadline=None)
@given(folders(), rules())
def test_exactly_the_best_k_of_those_with_a_value_are_best(found: list[RetentionCandidate], rule: RetentionRules):
    reasons = reasons_to_keep(found, rule)
    best = [name for name, why in reasons.items() if any(w.startswith("best ") for w in why)]
    valued = [c for c in found if _has_value(c)]
    assert len(best) == min(rule.best, len(valued))
    worst_kept = None
    for candidate in valued:
        if candidate.name in best:
            worst_kept = candidate.value if worst_kept is None else (
                min(worst_kept, candidate.value) if rule.mode == "max" else max(worst_kept, candidate.value)
            )
    for candidate in found:  # nothing left out beats anything kept; one without a value is never best
        if candidate.name in best or worst_kept is None:
            continue
        if not _has_value(candidate):
            continue
        assert (candidate.value <= worst_kept) if rule.mode == "max" else (candidate.value >= worst_kept)


@settings(max_examples=300, deadline=None)
@given(folders(), rules())
def test_every_boundary_is_kept(found: list[RetentionCandidate], rule: RetentionRules):
    reasons = reasons_to_keep(found, rule)
    for candidate in found:
        if rule.every is not None and on_boundary(candidate.progress, rule.every):
            assert f"every {rule.every.value}{rule.every.unit.value}" in reasons[candidate.name]
            assert candidate.name not in deletable(found, rule)


@settings(max_examples=300, deadline=None)
@given(folders(), rules())
def test_a_checkpoint_is_deletable_exactly_when_no_rule_keeps_it(found: list[RetentionCandidate], rule):
    reasons = reasons_to_keep(found, rule)
    assert set(reasons) == {c.name for c in found}
    assert set(deletable(found, rule)) == {name for name, why in reasons.items() if not why}
    if rule.recent >= 0:
        recent = [name for name, why in reasons.items() if any(w.startswith("recent ") for w in why)]
        assert len(recent) == min(rule.recent, len(found))


def _checkpoint(epoch: int, value: float | None, batch_in_epoch: int = 0) -> RetentionCandidate:
    batch = epoch * 4 + batch_in_epoch
    progress = {"epoch": epoch, "batch": batch, "batch_in_epoch": batch_in_epoch}
    return RetentionCandidate(f"ep{epoch}-ba{batch}.pt", (float(epoch), float(batch)), progress, value)


def test_the_reasons_are_in_the_words_ls_shows():
    found = [_checkpoint(epoch, value) for epoch, value in enumerate([None, 0.5, 0.9, 0.7, 0.9, 0.2, 0.1], start=1)]
    rule = RetentionRules(recent=2, best=3, mode="max", every=check_keep_every("3ep"))
    reasons = reasons_to_keep(found, rule, {"latest": "ep7-ba28.pt", "best": "ep5-ba20.pt"})
    assert reasons == {
        "ep1-ba4.pt": (),  # no value: ranks last
        "ep2-ba8.pt": (),
        "ep3-ba12.pt": ("best 2/3", "every 3ep"),  # 0.9 tied with epoch 5: the newer ranks first
        "ep4-ba16.pt": ("best 3/3",),
        "ep5-ba20.pt": ("best", "best 1/3"),
        "ep6-ba24.pt": ("every 3ep", "recent 2/2"),
        "ep7-ba28.pt": ("latest", "recent 1/2"),
    }
    assert deletable(found, rule) == ["ep1-ba4.pt", "ep2-ba8.pt"]


def test_min_mode_ranks_the_smallest_first_and_nan_has_no_rank():
    found = [_checkpoint(1, 3.0), _checkpoint(2, float("nan")), _checkpoint(3, 1.0), _checkpoint(4, None)]
    assert [c.name for c in best_ranking(found, "min")] == ["ep3-ba12.pt", "ep1-ba4.pt"]
    assert [c.name for c in best_ranking(found, "max")] == ["ep1-ba4.pt", "ep3-ba12.pt"]


def test_an_epoch_boundary_is_an_epoch_end_and_a_batch_boundary_a_multiple():
    every = check_keep_every("2ep")
    assert on_boundary({"epoch": 4, "batch_in_epoch": 0}, every)
    assert not on_boundary({"epoch": 4, "batch_in_epoch": 2}, every)  # a save two batches into epoch 5
    assert not on_boundary({"epoch": 3, "batch_in_epoch": 0}, every)
    assert not on_boundary({"epoch": 0, "batch_in_epoch": 0}, every)
    assert not on_boundary({}, every)  # nothing known: no boundary
    assert on_boundary({"batch": 12}, check_keep_every("6ba"))
    assert on_boundary({"batch": 12}, check_keep_every(Time(4, "ba")))
    assert check_keep_every(3) == check_keep_every("3ep")  # an int counts epochs, as everywhere


@pytest.mark.parametrize(
    ("every", "error", "words"),
    [
        ("10 epochs", ValueError, "cannot read"),
        ("0.5dur", ValueError, "epochs, batches, samples or tokens"),
        ("30m", ValueError, "epochs, batches, samples or tokens"),
        ("0ep", ValueError, "1 or more"),
        (-1, ValueError, "1 or more"),
        (1.5, TypeError, "time string"),
    ],
)
def test_a_keep_every_that_marks_no_boundary_is_refused(every: object, error: type[Exception], words: str):
    with pytest.raises(error, match=words):
        check_keep_every(every)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"recent": -2}, "recent"), ({"best": True}, "best"), ({"mode": "maximum"}, "'max' or 'min'")],
)
def test_rules_that_cannot_work_are_refused(kwargs: dict, words: str):
    with pytest.raises(ValueError, match=words):
        RetentionRules(**kwargs)
