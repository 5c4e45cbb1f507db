"""The first async save costs the training thread one memory copy, like later ones: its host buffers are allocated
and faulted in ahead, on a thread of their own (``SnapshotBuffers.prepare``, ``Writer.prepare`` at the start of fit).

Page faults are counted with ``getrusage`` (the whole process: torch may copy on several threads); a buffer that a
take faults in costs one minor fault per 4 KiB page, one that was prepared costs none.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.save.snapshot import SnapshotBuffers
from cairn.checkpoint.save.writers import AsyncSingleFileWriter, SingleFileWriter
from cairn.core import Time
from cairn.core.state import State

_MIB = 1 << 20
_PAGES = 16 * _MIB // 4096  # of one 16 MiB tensor


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _take_counting_faults(buffers: SnapshotBuffers, tree: Any) -> tuple[Any, int]:
    before = _minor_faults()
    snapshot = buffers.take(tree)
    return snapshot, _minor_faults() - before


def _addresses(buffers: SnapshotBuffers) -> set[int]:
    return {spare.data_ptr() for spares in buffers._spares.values() for spare in spares}


def test_a_prepared_take_fills_the_prepared_buffers_without_faulting_pages_in() -> None:
    tree = {"w": torch.randn(4 * _MIB), "b": torch.randn(7), "step": 3}
    buffers = SnapshotBuffers()
    buffers.prepare(tree).result()
    prepared = _addresses(buffers)
    assert buffers.spare_nbytes == (4 * _MIB + 7) * 4 and buffers.nbytes == 0

    snapshot, faults = _take_counting_faults(buffers, tree)

    assert {snapshot["w"].data_ptr(), snapshot["b"].data_ptr()} == prepared, "no buffer of its own was allocated"
    assert faults < _PAGES // 8, f"{faults} minor faults: the take faulted the buffer's pages in itself"
    assert torch.equal(snapshot["w"], tree["w"]) and torch.equal(snapshot["b"], tree["b"])
    assert buffers.nbytes == (4 * _MIB + 7) * 4 and buffers.spare_nbytes == 0


def test_a_second_prepare_of_the_same_tree_asks_for_nothing_more() -> None:
    tree = {"w": torch.randn(1024)}
    buffers = SnapshotBuffers()
    buffers.prepare(tree)
    buffers.prepare(tree).result()
    assert buffers.spare_nbytes == 1024 * 4
    buffers.take(tree)
    buffers.prepare(tree).result()
    assert buffers.spare_nbytes == 0, "the buffers held for its paths already fit"


def test_take_without_prepare_works_and_a_changed_shape_takes_a_prepared_buffer() -> None:
    buffers = SnapshotBuffers()
    first = buffers.take({"w": torch.ones(6)})
    kept = first["w"].data_ptr()
    assert buffers.take({"w": torch.full((6,), 2.0)})["w"].data_ptr() == kept

    grown = {"w": torch.full((4, 4), 3.0)}
    buffers.prepare(grown).result()
    prepared = _addresses(buffers)
    snapshot = buffers.take(grown)
    assert snapshot["w"].data_ptr() in prepared and torch.equal(snapshot["w"], grown["w"])
    assert buffers.nbytes == 16 * 4, "the buffer of the old shape was freed"
    assert torch.equal(buffers.take({"w": torch.zeros(2)})["w"], torch.zeros(2)), "unprepared: allocated in take"


def test_spares_that_no_tensor_claims_are_freed_by_the_take() -> None:
    buffers = SnapshotBuffers()
    buffers.prepare({"w": torch.ones(8), "gone": torch.ones(1000)}).result()
    buffers.take({"w": torch.ones(8)})
    assert buffers.spare_nbytes == 0 and buffers.nbytes == 8 * 4


def test_an_optimizers_state_is_prepared_after_its_first_step() -> None:
    """AdamW makes its moments at its first step, after the start of fit: they are prepared right then."""
    model = torch.nn.Linear(1024, 1024)
    optimizer = torch.optim.AdamW(model.parameters())
    buffers = SnapshotBuffers()
    buffers.prepare_after_first_step([optimizer])
    buffers.wait_until_prepared()
    assert buffers.spare_nbytes == 0, "nothing to prepare before the first step"

    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    buffers.wait_until_prepared()
    moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert buffers.spare_nbytes == moments

    snapshot, faults = _take_counting_faults(buffers, {"optimizer": optimizer.state_dict()})
    assert faults < 2 * (4 * _MIB // 4096) // 8, f"{faults} minor faults for prepared moments"
    assert torch.equal(snapshot["optimizer"]["state"][0]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
    optimizer.step()
    buffers.wait_until_prepared()
    assert buffers.spare_nbytes == 0, "only the first step prepares"


def test_release_forgets_an_optimizer_that_has_not_stepped() -> None:
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    buffers = SnapshotBuffers()
    buffers.prepare_after_first_step([optimizer])
    buffers.release()
    model(torch.randn(1, 4)).sum().backward()
    optimizer.step()
    buffers.wait_until_prepared()
    assert buffers.spare_nbytes == 0


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> State:
    return State(
        model=model,
        run_name="warm",
        rank_zero_seed=0,
        max_duration=Time.from_timestring("1ep"),
        device=torch.device("cpu"),
        optimizers=[optimizer],
    )


def test_the_async_writers_first_save_takes_only_prepared_buffers(tmp_path: Path) -> None:
    """What the saver does at the start of fit (``writer.prepare(state)``) and at its first save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.Linear(2048, 512))
    optimizer = torch.optim.AdamW(model.parameters())
    state = _state(model, optimizer)
    writer = AsyncSingleFileWriter(weights_only=False, ignore_keys=(), overwrite=False)
    assert SingleFileWriter(weights_only=False, ignore_keys=(), overwrite=False).prepare(state) is None  # a no-op
    writer.prepare(state)
    model(torch.randn(2, 512)).sum().backward()
    optimizer.step()
    snapshot = writer._snapshot
    snapshot.wait_until_prepared()
    prepared = _addresses(snapshot)

    finish = writer.start(state, str(tmp_path / "ep0.pt"))
    finish()

    assert snapshot.spare_nbytes == 0 and {b.data_ptr() for b in snapshot._buffers.values()} <= prepared
    assert snapshot.nbytes >= 3 * 4 * sum(p.numel() for p in model.parameters()), "weights and both moments"
    saved = read_checkpoint(str(tmp_path / "ep0.pt"))
    assert torch.equal(saved["state"]["model"]["0.weight"], model[0].weight)
    writer.close()
