"""Hostile sharded folders, hostile strings, and awkward outputs, as ``cairn ckpt`` meets them.

- a sharded folder's DCP index (``.metadata``) whose sizes, offsets, dtypes or byte ranges lie (its ``cairn.pt``
  re-sealed to vouch for it, as an attacker would): refused with CheckpointCorruptError before anything is
  allocated or written, never turned into a file of uninitialised memory;
- run names, optimizer keys, metric and parameter names and metadata holding terminal escapes, bells, carriage
  returns, newlines and right-to-left overrides: no control character reaches the terminal, from any command;
- a full disk on one rank of a sharded save, quantized buffers, and ``convert`` onto ``out/`` or a dangling symlink.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.format import file_digest
from cairn.checkpoint.save.content import seal
from cairn.checkpoint.tools.convert import convert
from cairn.cli.main import main as cairn_main
from cairn.errors import CheckpointCorruptError
from cairn.models import Classifier
from conftest import TinyNet, make_loader

CAIRN = str(Path(sys.executable).parent / "cairn")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
WEIGHT = "model.layers.0.weight"  # float32 (8, 4), one chunk


def _trainer(**kwargs: object) -> Trainer:
    torch.manual_seed(0)
    kwargs.setdefault("model", Classifier(TinyNet(), num_classes=3))
    return Trainer(train_dataloader=make_loader(), max_duration="2ba", progress_bar=False, seed=1, **kwargs)


@pytest.fixture(scope="module")
def real_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("real")
    trainer = _trainer(save_folder=str(folder), save_filename="c.pt", run_name="plain")
    trainer.fit()
    trainer.close()
    return folder / "c.pt"


# -- item 10: a shard index that lies about sizes ------------------------------------------------------------------


def _index(folder: Path) -> object:
    with open(folder / ".metadata", "rb") as file:
        return pickle.load(file)  # the test's own, genuine file


def _reseal(folder: Path, index: object) -> None:
    """Write ``index`` and make ``cairn.pt`` vouch for every file as it now is, as a forger would."""
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    checkpoint = torch.load(folder / "cairn.pt", weights_only=True)
    checkpoint["state"]["metadata"]["shards"] = {
        p.name: file_digest(str(p)) for p in folder.iterdir() if p.name != "cairn.pt"
    }
    torch.save(seal(checkpoint), folder / "cairn.pt")


def _sized(size: list[int], chunk: list[int]) -> Callable[[object, Path], None]:
    def edit(index: object, folder: Path) -> None:
        entry = index.state_dict_metadata[WEIGHT]
        entry.size, entry.chunks[0].sizes = torch.Size(size), torch.Size(chunk)

    return edit


def _dtype(dtype: object) -> Callable[[object, Path], None]:
    def edit(index: object, folder: Path) -> None:
        index.state_dict_metadata[WEIGHT].properties.dtype = dtype

    return edit


def _overlapping_chunks(index: object, folder: Path) -> None:
    """Two chunks that cover rows 4-7 twice and rows 8-11 never, each with bytes of its own."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    entry = index.state_dict_metadata[WEIGHT]
    stored = next(info for key, info in index.storage_data.items() if key.fqn == WEIGHT)
    shard = folder / stored.relative_path
    blob = shard.read_bytes()[stored.offset : stored.offset + stored.length]
    extra = type(stored)(stored.relative_path, shard.stat().st_size, len(blob))
    with open(shard, "ab") as file:
        file.write(blob)
    entry.size = torch.Size([12, 4])
    entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size([4, 0]), sizes=torch.Size([8, 4])))
    index.storage_data[MetadataIndex(WEIGHT, [4, 0])] = extra


def _shared_bytes(index: object, folder: Path) -> None:
    """Adam's first moment of the weight reads the weight's own bytes."""
    keys = {key.fqn: key for key in index.storage_data}
    moment = keys["optimizers.AdamW.state.layers.0.weight.exp_avg"]
    index.storage_data[moment] = index.storage_data[keys[WEIGHT]]


def _huge_list_index(index: object, folder: Path) -> None:
    """DCP rebuilds nested state by growing a list one element at a time up to each index it is given."""
    key = "optimizers.AdamW.param_groups.0.lr"
    index.planner_data[key] = ("optimizers", "AdamW", "param_groups", 10**6, "lr")


HOSTILE_INDEXES = {
    "size-larger-than-the-chunks": _sized([8, 4 << 20], [8, 4]),  # base: a 128 MiB file of zeros, exit 0
    "chunk-and-size-larger-than-the-bytes": _sized([8, 4 << 20], [8, 4 << 20]),
    "size-smaller-than-the-chunk": _sized([4, 4], [8, 4]),
    "chunk-smaller-than-the-size": _sized([8, 4], [4, 4]),  # base: uninitialised memory in the output
    "overlapping-chunks": _overlapping_chunks,
    "a-dtype-that-is-not-one": _dtype("float32"),
    "a-quantized-dtype": _dtype(torch.qint8),
    "bytes-of-another-dtype": _dtype(torch.float64),  # base: the float32 bytes silently widened
    "two-entries-sharing-bytes": _shared_bytes,
    "a-huge-list-index": _huge_list_index,
}


@pytest.mark.parametrize("attack", list(HOSTILE_INDEXES))
def test_a_shard_index_that_lies_about_sizes_is_refused_before_anything_is_written(
    real_file: Path, tmp_path: Path, attack: str
) -> None:
    folder = tmp_path / "sharded"
    convert(str(real_file), "sharded", str(folder))
    index = _index(folder)
    HOSTILE_INDEXES[attack](index, folder)
    _reseal(folder, index)
    out = tmp_path / "out" / "joined.pt"
    start = time.perf_counter()
    with pytest.raises(CheckpointCorruptError) as info:
        convert(str(folder), "single-file", str(out))
    assert time.perf_counter() - start < 2.0, "refused before anything large was allocated"
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    assert not (tmp_path / "out").exists(), "nothing written, not even the folder"


def test_the_cli_refuses_a_lying_index_with_one_line_and_exit_1(real_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sharded"
    convert(str(real_file), "sharded", str(folder))
    index = _index(folder)
    _sized([8, 4 << 20], [8, 4])(index, folder)
    _reseal(folder, index)
    out = tmp_path / "joined.pt"
    result = subprocess.run(
        [CAIRN, "ckpt", "convert", str(folder), "--to", "single-file", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1 and not out.exists(), result.stdout + result.stderr
    assert result.stderr.startswith("cairn ckpt convert: ") and result.stderr.count("\n") == 1
    assert "do not cover exactly once" in result.stderr and "Traceback" not in result.stderr


# -- item 11: strings from a file never steer the terminal ---------------------------------------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2J\r\n\u202eevil\x85\u2028"  # title, bell, clear screen, CR, LF, RTL override, NEL, LS


def _controls(text: str) -> set[str]:
    """Characters a terminal would obey rather than show (a line break between lines is the only one allowed)."""
    return {ch for ch in text if ch != "\n" and unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")}


@pytest.fixture(scope="module")
def evil(real_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a re-sealed checkpoint whose every name and string carries EVIL, its sharded form, a file
    named with EVIL, and one whose pickle names a global spelled with EVIL (refused, and quoted in the error)."""
    folder = tmp_path_factory.mktemp("evil")
    checkpoint = torch.load(real_file, weights_only=True)
    state = checkpoint["state"]
    state["run_name"] = "run" + EVIL
    (optimizer,) = state["optimizers"].values()
    state["optimizers"] = {"Adam" + EVIL: optimizer}
    (names,) = state["metadata"]["parameter_names"].values()
    state["metadata"]["parameter_names"] = {"Adam" + EVIL: [name + EVIL for name in names]}
    state["model"] = {name + EVIL: tensor for name, tensor in state["model"].items()}
    state["train_metrics"] = {name + EVIL: metric for name, metric in state["train_metrics"].items()}
    state["schedulers"] = {"Sched" + EVIL: {}}
    state["metadata"].update(cairn_version="0.1" + EVIL, torch_version="2" + EVIL)
    torch.save(seal(checkpoint), folder / "evil.pt")
    torch.save(seal(checkpoint), folder / f"named{EVIL.replace(chr(10), '')}.pt")
    convert(str(folder / "evil.pt"), "sharded", str(folder / "evil-sharded"))
    shutil.copytree(folder / "evil-sharded", folder / "global-sharded")
    (folder / "global-sharded" / ".metadata").write_bytes(b"cos\x1b]0;pwned\x07\nsystem\n(S'true'\ntR.")
    return folder


def _run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cairn_main(["ckpt", *args])
    captured = capfd.readouterr()
    return code, captured.out, captured.err


def test_no_command_lets_a_string_from_a_file_reach_the_terminal(
    evil: Path, real_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    runs = {
        "ls": ("ls", str(evil)),
        "show": ("show", str(evil / "evil.pt")),
        "show sharded": ("show", str(evil / "evil-sharded")),
        "verify": ("verify", str(evil)),
        "diff": ("diff", "--all", str(evil / "evil.pt"), str(real_file)),
        "diff sharded": ("diff", str(evil / "evil-sharded"), str(real_file)),
        "convert": ("convert", str(evil / "evil.pt"), "--to", "weights-only", str(tmp_path / f"w{EVIL[:3]}.pt")),
        "show a refused folder": ("show", str(evil / "global-sharded")),
        "convert refused": ("convert", str(evil / "global-sharded"), "--to", "single-file", str(tmp_path / "x")),
    }
    seen = ""
    for name, args in runs.items():
        code, out, err = _run(capfd, *args)
        assert not _controls(out) and not _controls(err), f"{name}: {out!r} {err!r}"
        assert code in (0, 1), f"{name}: {err}"
        seen += out + err
    assert "run\\x1b]0;pwned\\x07" in seen and "\\u202eevil" in seen, "the bytes are shown, escaped"
    assert (
        "Adam\\x1b]0;pwned" in seen and "MulticlassAccuracy\\x1b]0;pwned" in seen and "layers.0.weight\\x1b]0" in seen
    )
    assert "os\\x1b]0;pwned\\x07.system" in seen, "an error quoting the file's content is escaped too"


def test_show_json_keeps_the_exact_strings_as_json_escapes(evil: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capfd, "show", "--json", str(evil / "evil.pt"))
    assert code == 0 and not _controls(out) and not err
    summary = json.loads(out)
    assert summary["run_name"] == "run" + EVIL and summary["optimizers"] == ["Adam" + EVIL]


@pytest.mark.slow
def test_show_through_the_console_script_prints_no_control_character(evil: Path) -> None:
    result = subprocess.run(
        [CAIRN, "ckpt", "show", str(evil / "evil.pt")], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert not _controls(result.stdout) and not _controls(result.stderr) and "run name    run\\x1b" in result.stdout


# -- item 21b: quantized buffers ---------------------------------------------------------------------------------


class QuantizedNet(TinyNet):
    """The tiny MLP with a ``qint8`` lookup table as a buffer, as a partly quantized model carries."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("codes", torch.quantize_per_tensor(torch.linspace(-1, 1, 6), 0.05, 3, torch.qint8))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same short run saved in the foreground and in the background."""
    folder = tmp_path_factory.mktemp("quantized")
    saved = {}
    with pytest.warns(UserWarning, match="quantize"):
        for mode in ("sync", "async"):
            torch.manual_seed(0)
            model = Classifier(QuantizedNet(), num_classes=3)
            trainer = _trainer(
                model=model, save_folder=str(folder / mode), save_filename="c.pt", save_async=mode == "async"
            )
            trainer.fit()
            trainer.close()
            saved[mode] = folder / mode / "c.pt"
    return saved


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")  # torch rebuilding a quantized tensor
def test_an_async_save_of_a_model_with_a_qint8_buffer_holds_what_a_sync_save_holds(quantized: dict[str, Path]) -> None:
    sync, background = (torch.load(quantized[mode], weights_only=True)["state"]["model"] for mode in ("sync", "async"))
    codes = background["codes"]
    assert codes.dtype == torch.qint8 and codes.q_scale() == 0.05 and codes.q_zero_point() == 3
    assert torch.equal(codes.int_repr(), sync["codes"].int_repr())
    assert all(torch.equal(sync[name], background[name]) for name in sync if name != "codes")


@pytest.mark.parametrize("form", ["safetensors", "sharded"])
def test_converting_a_qint8_buffer_to_a_form_that_cannot_hold_it_names_the_tensor_and_dtype(
    quantized: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str], form: str
) -> None:
    out = tmp_path / "out" / "model"
    code, stdout, stderr = _run(capfd, "convert", str(quantized["sync"]), "--to", form, str(out))
    assert code == 1 and not stdout and stderr.count("\n") == 1, stderr
    assert "'codes'" in stderr and "qint8" in stderr and "single-file" in stderr
    assert not (tmp_path / "out").exists(), "nothing left behind"


# -- item 21c: convert onto out/ or a dangling symlink, through the console script ---------------------------------


def _convert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CAIRN, "ckpt", "convert", *args], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_convert_onto_a_trailing_slash_or_a_dangling_symlink(real_file: Path, tmp_path: Path) -> None:
    one_file = _convert(str(real_file), "--to", "single-file", f"{tmp_path / 'out'}/")
    assert one_file.returncode == 1 and one_file.stderr.count("\n") == 1, one_file.stderr
    assert "ends with a slash" in one_file.stderr and "Traceback" not in one_file.stderr
    assert not (tmp_path / "out").exists(), "no empty folder left behind"

    folder = _convert(str(real_file), "--to", "sharded", f"{tmp_path / 'sharded'}/")  # a folder: the slash is fine
    assert folder.returncode == 0 and folder.stdout.strip() == str(tmp_path / "sharded"), folder.stderr
    assert read_checkpoint(str(tmp_path / "sharded"))["state"]["metadata"]["sharded"] is True

    dangling = tmp_path / "dangling.pt"
    dangling.symlink_to(tmp_path / "nowhere" / "x.pt")
    onto_link = _convert(str(real_file), "--to", "single-file", str(dangling))
    assert onto_link.returncode == 1 and onto_link.stderr.count("\n") == 1, onto_link.stderr
    assert "is a symlink" in onto_link.stderr and "save_overwrite" not in onto_link.stderr
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists(), "the link and its target untouched"


def test_convert_to_a_folder_onto_a_dangling_symlink_is_refused_in_cli_terms(
    real_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, stdout, stderr = _run(capfd, "convert", str(real_file), "--to", "sharded", str(dangling))
    assert code == 1 and not stdout and "is a symlink" in stderr and "save_overwrite" not in stderr
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling"], "no temporary folder left beside it"


# -- item 21a: a full disk on one rank of a sharded save -----------------------------------------------------------

FULL_DISK_ON_RANK_ONE = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    sys.path.insert(0, {tests!r})
    from cairn import Trainer
    from cairn.callbacks import CheckpointSaver
    from cairn.models import Classifier
    from conftest import TinyNet, make_loader

    folder, rank = {folder!r}, int(os.environ["RANK"])
    trainer = Trainer(
        model=Classifier(TinyNet(hidden=256), num_classes=3), train_dataloader=make_loader(n=32, batch_size=8),
        max_duration="1ep", device="cpu", progress_bar=False, run_name="full", seed=1, save_folder=folder,
        save_filename="ep{{epoch}}", parallelism_config={{"fsdp": {{"state_dict_type": "sharded"}}}},
    )
    trainer.fit()  # ep1/, and latest-rank0.pt naming it
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    report = {{}}
    try:
        CheckpointSaver(folder=folder, filename="next").save(trainer.state)
    except Exception as err:
        report = {{"error": type(err).__name__, "message": str(err)}}
    with open(os.path.join({out!r}, f"rank{{rank}}.json"), "w") as file:
        json.dump(report, file)
    """
)


@pytest.mark.slow
def test_a_full_disk_on_rank_one_of_a_sharded_save_is_a_write_error_on_both_ranks(tmp_path: Path) -> None:
    folder, out = tmp_path / "ckpt", tmp_path / "reports"
    out.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK_ON_RANK_ONE.format(tests=str(Path(__file__).parent), folder=str(folder), out=str(out)))
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        assert report.get("error") == "CheckpointWriteError", report
        assert "__1_0.distcp" in report["message"] and "MiB free there" in report["message"], report
    assert sorted(p.name for p in folder.iterdir()) == ["ep1", "latest-rank0.pt"], "no temporary folder left"
    assert os.readlink(folder / "latest-rank0.pt") == "ep1"
    assert read_checkpoint(str(folder / "ep1"))["state"]["timestamp"]["epoch"] == 1, "the previous one is intact"
