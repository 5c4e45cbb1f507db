"""The CUDA paths: skipped on machines without a GPU, run wherever one is visible."""

from __future__ import annotations

import pytest
import torch

from cairn import Trainer
from cairn.loggers import InMemoryLogger
from cairn.models import Classifier
from conftest import TinyNet, make_loader, params_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class DeviceSpy(InMemoryLogger):
    def __init__(self) -> None:
        super().__init__()
        self.batch_devices: set[str] = set()
        self.output_dtypes: set[torch.dtype] = set()

    def after_dataloader(self, state, logger) -> None:
        self.batch_devices.update(t.device.type for t in state.batch)

    def after_forward(self, state, logger) -> None:
        self.output_dtypes.add(state.outputs.dtype)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("amp_bf16", torch.bfloat16), ("amp_fp16", torch.float16)]
)
def test_training_on_the_gpu_by_default(precision: str, dtype: torch.dtype) -> None:
    spy = DeviceSpy()
    net = TinyNet()
    before = {k: v.cpu() for k, v in params_of(net).items()}
    trainer = Trainer(
        model=Classifier(net, num_classes=3),
        train_dataloader=make_loader(),
        eval_dataloader=make_loader(n=16),
        max_duration="2ep",
        precision=precision,
        loggers=spy,
        progress_bar=False,
    )
    trainer.fit()
    assert trainer.state.device.type == "cuda"
    assert spy.batch_devices == {"cuda"}
    assert spy.output_dtypes == {dtype}
    assert all(p.device.type == "cuda" for p in net.parameters())
    assert any(not torch.equal(before[k], v.cpu()) for k, v in net.state_dict().items())
    assert 0.0 <= spy.latest["metrics/eval/MulticlassAccuracy"] <= 1.0
    if precision == "amp_fp16":
        assert trainer.state.scaler is not None and trainer.state.scaler.get_scale() > 0


def test_gradient_accumulation_on_the_gpu_matches_one_batch() -> None:
    def one_step(microbatch_size):
        torch.manual_seed(0)
        net = TinyNet()
        Trainer(
            model=Classifier(net),
            train_dataloader=make_loader(n=12, batch_size=12),
            max_duration="1ba",
            optimizers=torch.optim.SGD(net.parameters(), lr=0.5),
            device="gpu",
            device_train_microbatch_size=microbatch_size,
            progress_bar=False,
        ).fit()
        return params_of(net)

    whole, pieces = one_step(None), one_step(5)
    for name in whole:
        torch.testing.assert_close(pieces[name], whole[name], rtol=1e-4, atol=1e-5)


def test_checkpoints_of_a_gpu_run_hold_cpu_tensors_and_resume_on_the_gpu(tmp_path) -> None:
    def trainer(max_duration: str, **kwargs) -> Trainer:
        torch.manual_seed(0)
        net = TinyNet()
        return Trainer(
            model=Classifier(net, num_classes=3),
            train_dataloader=make_loader(shuffle=True),
            max_duration=max_duration,
            precision="amp_fp16",
            device="gpu",
            seed=5,
            progress_bar=False,
            save_folder=str(tmp_path),
            save_interval="1ba",
            **kwargs,
        )

    first = trainer("6ba")
    first.fit()
    saved = torch.load(first.saved_checkpoints[-1], weights_only=True)
    devices = {v.device.type for v in saved["state"]["model"].values()}
    devices |= {v.device.type for s in saved["state"]["optimizers"]["AdamW"]["state"].values() for v in s.values()}
    assert devices == {"cpu"}
    assert saved["state"]["scaler"]["scale"] > 0
    resumed = trainer("2ep", autoresume=True)
    assert resumed.state.timestamp.batch == 6
    resumed.fit()
    assert resumed.state.timestamp.epoch == 2
    assert all(p.device.type == "cuda" for p in resumed.state.model.parameters())


def test_async_saves_stage_gpu_tensors_in_pinned_memory_and_match_sync_saves(tmp_path) -> None:
    from cairn.checkpoint import read_checkpoint
    from cairn.checkpoint.save.snapshot import SnapshotBuffers

    buffers = SnapshotBuffers()
    staged = buffers.take({"w": torch.arange(4.0, device="cuda")})
    assert staged["w"].device.type == "cpu" and staged["w"].is_pinned() and staged["w"].tolist() == [0, 1, 2, 3]

    files = {}
    for mode in ("sync", "async"):
        torch.manual_seed(0)
        Trainer(
            model=Classifier(TinyNet(), num_classes=3),
            train_dataloader=make_loader(),
            max_duration="2ep",
            seed=1,
            save_folder=str(tmp_path / mode),
            save_async=mode == "async",
            progress_bar=False,
        ).fit()
        files[mode] = read_checkpoint(str(tmp_path / mode / "latest-rank0.pt"))
    sync, background = files["sync"]["state"]["model"], files["async"]["state"]["model"]
    assert all(v.device.type == "cpu" and torch.equal(v, background[k]) for k, v in sync.items())
