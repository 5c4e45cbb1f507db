"""``cairn ckpt ls / show / verify / convert / diff``, driven through the installed console script, as a person
(or a script) would run them on real checkpoints: local files, sharded folders, and objects in moto's S3 server."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import zipfile
from pathlib import Path

import boto3
import pytest
import torch

from cairn import Trainer
from cairn.checkpoint import read_checkpoint
from cairn.models import Classifier
from conftest import TinyNet, make_loader

CAIRN = str(Path(sys.executable).parent / "cairn")
ANSI = "\x1b["
COMMANDS = ("ls", "show", "verify", "convert", "diff")


def cairn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | (env or {})  # as on a plain terminal
    return subprocess.run([CAIRN, *args], capture_output=True, text=True, timeout=120, env=environment, check=False)


def _train(save_folder: str, max_duration: str = "3ep") -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(
        model=Classifier(TinyNet(dropout=0.2), num_classes=3),
        train_dataloader=make_loader(n=32, shuffle=True),
        max_duration=max_duration,
        seed=3,
        run_name="cli-run",
        save_folder=save_folder,
        progress_bar=False,
    )
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's folder: ep1, ep2, ep3 (full; latest-rank0.pt -> ep3), ep1-weights.pt and ep2-sharded/ (converted)."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    _train(str(folder))
    conversions = (
        ("ep2-ba8-rank0.pt", "sharded", "ep2-sharded"),
        ("ep1-ba4-rank0.pt", "weights-only", "ep1-weights.pt"),
    )
    for source, form, out in conversions:
        result = cairn("ckpt", "convert", str(folder / source), "--to", form, str(folder / out))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(folder / out)
    return folder


def _damaged_copy(source: Path, target: Path) -> Path:
    """A copy of ``source`` with one byte of one tensor's data flipped: still a valid archive, wrong content."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    with zipfile.ZipFile(target) as archive:
        record = next(r for r in archive.infolist() if re.search(r"/data/\d+$", r.filename) and r.file_size)
    with open(target, "r+b") as file:
        file.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        start = record.header_offset + 30 + name_length + extra_length
        file.seek(start)
        byte = file.read(1)[0]
        file.seek(start)
        file.write(bytes([byte ^ 0xFF]))
    return target


def _rows(stdout: str) -> list[list[str]]:
    """``cairn ckpt ls`` lines as cells, the header left out."""
    return [line.split() for line in stdout.splitlines()[1:]]


# -- ls -----------------------------------------------------------------------------------------------------------


def test_ls_lists_newest_first_with_kind_progress_and_latest(run_dir: Path) -> None:
    result = cairn("ckpt", "ls", str(run_dir))
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["CREATED", "SIZE", "EPOCH", "BATCH", "KIND", "NAME"]
    names = [re.search(r"(\S+)(  <- .*)?$", line).group(1) for line in lines]
    # a converted copy is as far into training as its source, and written later; a weights-only file records no
    # progress, so it sorts as the oldest
    assert names == ["ep3-ba12-rank0.pt", "ep2-sharded", "ep2-ba8-rank0.pt", "ep1-ba4-rank0.pt", "ep1-weights.pt"]
    assert lines[0].startswith("*") and lines[0].endswith("ep3-ba12-rank0.pt  <- latest-rank0.pt")
    assert not any(line.startswith("*") for line in lines[1:])
    kinds = dict(re.search(r"\s(full|sharded|weights-only)\s+(\S+)", line).group(2, 1) for line in lines)
    assert kinds == {
        "ep3-ba12-rank0.pt": "full",
        "ep2-sharded": "sharded",
        "ep2-ba8-rank0.pt": "full",
        "ep1-weights.pt": "weights-only",
        "ep1-ba4-rank0.pt": "full",
    }
    progress = [re.search(r"\s(\d+|-)\s+(\d+|-)\s+(full|sharded|weights-only)\s", line).group(1, 2) for line in lines]
    assert progress == [("3", "12"), ("2", "8"), ("2", "8"), ("1", "4"), ("-", "-")]
    assert "latest-rank0.pt  " not in result.stdout.replace("<- latest-rank0.pt", "")  # the link is not an entry
    assert ANSI not in result.stdout, "piped output stays plain text"


def test_ls_shows_a_damaged_file_and_skips_temporaries_and_other_files(run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copyfile(run_dir / "ep1-ba4-rank0.pt", folder / "ep1.pt")
    (folder / "truncated.pt").write_bytes((run_dir / "ep2-ba8-rank0.pt").read_bytes()[:1000])
    (folder / "notes.txt").write_text("not a checkpoint")
    (folder / ".ep2.pt.cairn-tmp-123-abcd").write_bytes(b"half a file")
    result = cairn("ckpt", "ls", str(folder))
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert [row[-1] for row in rows] == ["ep1.pt", "truncated.pt"]
    assert rows[1][-2] == "unreadable"


def test_ls_of_a_missing_folder_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = cairn("ckpt", "ls", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr.startswith("cairn ckpt ls: no folder or checkpoint at") and result.stderr.count("\n") == 1


# -- show ---------------------------------------------------------------------------------------------------------


def test_show_summarizes_what_a_person_needs(run_dir: Path) -> None:
    result = cairn("ckpt", "show", str(run_dir / "latest-rank0.pt"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.splitlines()[0] == f"{run_dir / 'latest-rank0.pt'} -> ep3-ba12-rank0.pt"
    for expected in (
        "kind        full",
        "run name    cli-run",
        "epoch 3, batch 12, sample 96",
        "world size  1",
        "optimizers  AdamW",
        "schedulers  none",
        "rng         saved for 1 rank",
        "hash        OK xxh3-128:",
        f"torch {torch.__version__}",
    ):
        assert expected in out, (expected, out)
    assert re.search(r"^\s+layers\s+67\s+268 B$", out, re.M), out
    assert ANSI not in out


def test_show_json_counts_every_parameter(run_dir: Path) -> None:
    model = read_checkpoint(str(run_dir / "ep3-ba12-rank0.pt"))["state"]["model"]
    elements = sum(t.numel() for t in model.values())
    nbytes = sum(t.numel() * t.element_size() for t in model.values())
    for path, kind in ((run_dir / "ep3-ba12-rank0.pt", "full"), (run_dir / "ep2-sharded", "sharded")):
        result = cairn("ckpt", "show", "--json", str(path))
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["kind"] == kind and summary["run_name"] == "cli-run"
        assert summary["parameters"] == elements and summary["parameter_bytes"] == nbytes
        assert summary["modules"] == {"layers": {"parameters": elements, "bytes": nbytes}}
        assert summary["optimizers"] == ["AdamW"] and summary["schedulers"] == []
        assert summary["rng"] == {"present": True, "ranks": 1}
        assert summary["hash"]["status"] == "ok" and summary["hash"]["value"].startswith("xxh3-128:")
        assert summary["versions"]["torch"] == torch.__version__ and summary["world_size"] == 1
    assert summary["timestamp"]["epoch"] == 2 and summary["timestamp"]["batch"] == 8


def test_show_of_a_damaged_checkpoint_fails_with_the_reason(run_dir: Path, tmp_path: Path) -> None:
    bad = _damaged_copy(run_dir / "ep1-ba4-rank0.pt", tmp_path / "bad.pt")
    result = cairn("ckpt", "show", "--json", str(bad))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("cairn ckpt show: ") and "fails its content hash" in result.stderr
    assert result.stderr.count("\n") == 1


# -- verify -------------------------------------------------------------------------------------------------------


def test_verify_reports_each_checkpoint_and_fails_if_any_is_damaged(run_dir: Path, tmp_path: Path) -> None:
    good = run_dir / "ep2-ba8-rank0.pt"
    bad = _damaged_copy(run_dir / "ep1-ba4-rank0.pt", tmp_path / "bad.pt")
    bad_shards = shutil.copytree(run_dir / "ep2-sharded", tmp_path / "bad-sharded")
    with open(bad_shards / "__0_0.distcp", "r+b") as shard:
        shard.seek(100)
        byte = shard.read(1)[0]
        shard.seek(100)
        shard.write(bytes([byte ^ 0xFF]))
    result = cairn("ckpt", "verify", str(good), str(bad), str(run_dir / "ep2-sharded"), str(bad_shards))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("OK") and str(good) in lines[0]
    assert lines[1].startswith(f"FAILED  {bad}: ") and "fails its content hash" in lines[1]
    assert lines[2].startswith("OK") and "ep2-sharded" in lines[2]
    assert lines[3].startswith(f"FAILED  {bad_shards}: ")
    assert "2 of 4 intact" in result.stderr

    intact = cairn("ckpt", "verify", str(good))
    assert intact.returncode == 0 and intact.stdout.startswith("OK")


def test_verify_a_folder_checks_every_checkpoint_in_it(run_dir: Path, tmp_path: Path) -> None:
    result = cairn("ckpt", "verify", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    checked = sorted(Path(line.split()[1]).name for line in result.stdout.splitlines())
    assert checked == sorted(
        ["ep1-ba4-rank0.pt", "ep1-weights.pt", "ep2-ba8-rank0.pt", "ep2-sharded", "ep3-ba12-rank0.pt"]
    ), "each once; the latest link is not checked twice"

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cairn("ckpt", "verify", str(empty))
    assert nothing.returncode == 1 and "holds no checkpoints" in nothing.stdout


# -- object stores ------------------------------------------------------------------------------------------------


@pytest.fixture
def s3_run(moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """``s3://<bucket>/run``: ep1 and ep2 uploaded by a Trainer, its latest pointer, and a note that is no
    checkpoint."""
    monkeypatch.setenv("S3_ENDPOINT_URL", moto_endpoint)
    monkeypatch.chdir(tmp_path)
    _train(f"s3://{s3_bucket}/run", max_duration="2ep")
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="run/notes.txt", Body=b"lr sweep 3")
    return f"s3://{s3_bucket}/run"


def test_ls_of_a_bucket_prefix_downloads_nothing(s3_run: str) -> None:
    result = cairn("ckpt", "ls", s3_run)
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert [row[0] for row in rows] == ["*", "-"]
    assert rows[0][-3:] == ["ep2-ba8-rank0.pt", "<-", "latest-rank0.pt"] and rows[1][-1] == "ep1-ba4-rank0.pt"
    assert rows[0][-6:-3] == ["2", "8", "?"], "epoch and batch from the name; kind unknown without a download"
    assert "1 other object(s) not listed" in result.stderr


def test_verify_and_show_objects_in_a_store(s3_run: str, moto_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
    good = tmp_path / "run" / "ep1-ba4-rank0.pt"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.upload_file(str(_damaged_copy(good, tmp_path / "damaged" / "bad.pt")), s3_bucket, "run/bad.pt")
    client.upload_file(str(good), s3_bucket, "run/../escape.pt")  # a name that must never become a local path

    result = cairn("ckpt", "verify", "-r", f"{s3_run}/ep1-ba4-rank0.pt", f"{s3_run}/")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    digest = read_checkpoint(str(good))["state"]["metadata"]["content_hash"]
    assert lines[0] == f"OK      {s3_run}/ep1-ba4-rank0.pt  {digest}"
    failed = [line for line in lines if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED  {s3_run}/bad.pt: ")
    assert "fails its content hash" in failed[0]
    assert "cairn-cli-" not in result.stdout, "errors name the object, not the temporary download"
    assert f"OK      {s3_run}/../escape.pt  {digest}" in lines
    assert sum(line.startswith("OK") for line in lines) == 4  # ep1 alone, then ep1, ep2 and ../escape.pt
    assert not (tmp_path / "escape.pt").exists() and not (tmp_path.parent / "escape.pt").exists()

    shown = cairn("ckpt", "show", "--json", f"{s3_run}/latest-rank0.pt")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["source"] == f"{s3_run}/ep2-ba8-rank0.pt", "the latest pointer is followed"
    assert summary["timestamp"]["epoch"] == 2 and summary["kind"] == "full"


# -- convert ------------------------------------------------------------------------------------------------------


def test_convert_to_safetensors_writes_the_model_bit_for_bit(run_dir: Path, tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    out = tmp_path / "model.safetensors"
    result = cairn("ckpt", "convert", str(run_dir / "ep3-ba12-rank0.pt"), "--to", "safetensors", str(out))
    assert result.returncode == 0, result.stderr
    expected = read_checkpoint(str(run_dir / "ep3-ba12-rank0.pt"))["state"]["model"]
    written = load_file(str(out))
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    with safetensors.safe_open(str(out), framework="pt") as file:
        header = file.metadata()
    assert header["format"] == "pt" and header["cairn_run_name"] == "cli-run"
    assert json.loads(header["cairn_timestamp"])["epoch"] == 3

    again = cairn("ckpt", "convert", str(run_dir / "ep3-ba12-rank0.pt"), "--to", "safetensors", str(out))
    assert (
        again.returncode == 1 and again.stderr.startswith("cairn ckpt convert: ") and "already exists" in again.stderr
    )


def test_convert_a_sharded_folder_to_safetensors(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    out = tmp_path / "from-shards.safetensors"
    result = cairn("ckpt", "convert", str(run_dir / "ep2-sharded"), "--to", "safetensors", str(out))
    assert result.returncode == 0, result.stderr
    expected = read_checkpoint(str(run_dir / "ep2-ba8-rank0.pt"))["state"]["model"]
    written = load_file(str(out))
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], v) for k, v in expected.items())
    assert not [p for p in tmp_path.iterdir() if p.name != out.name], "no temporary file left behind"


def test_a_weights_only_conversion_keeps_only_the_model(run_dir: Path) -> None:
    result = cairn("ckpt", "show", "--json", str(run_dir / "ep1-weights.pt"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["kind"] == "weights-only" and summary["weights_only"] is True
    assert summary["optimizers"] == [] and summary["rng"] == {"present": False, "ranks": 0}
    assert summary["parameters"] == 67


# -- diff ---------------------------------------------------------------------------------------------------------


def test_diff_names_the_tensors_and_metadata_that_changed(run_dir: Path) -> None:
    result = cairn("ckpt", "diff", str(run_dir / "ep1-ba4-rank0.pt"), str(run_dir / "ep2-ba8-rank0.pt"))
    assert result.returncode == 1, result.stderr
    out = result.stdout
    assert out.startswith(f"--- {run_dir / 'ep1-ba4-rank0.pt'}\n+++ {run_dir / 'ep2-ba8-rank0.pt'}\n")
    for name, shape in (("layers.0.weight", "(8, 4)"), ("layers.0.bias", "(8,)"), ("layers.3.weight", "(3, 8)")):
        assert re.search(rf"^  ~\s+{re.escape(name)}\s+float32 {re.escape(shape)}\s+max abs diff \d", out, re.M), out
    assert re.search(r"^  ~\s+timestamp\.epoch\s+1 -> 2$", out, re.M)
    assert re.search(r"^  optimizers: \d+ entries differ$", out, re.M)
    assert "content_hash" not in out


def test_diff_of_a_checkpoint_with_itself_is_silent_and_exit_0(run_dir: Path) -> None:
    same = cairn("ckpt", "diff", str(run_dir / "ep2-ba8-rank0.pt"), str(run_dir / "ep2-ba8-rank0.pt"))
    assert (same.returncode, same.stdout, same.stderr) == (0, "", "")


def test_diff_of_a_file_and_its_sharded_copy_finds_the_same_weights(run_dir: Path) -> None:
    result = cairn("ckpt", "diff", str(run_dir / "ep2-ba8-rank0.pt"), str(run_dir / "ep2-sharded"))
    assert result.returncode == 1
    assert "model tensors" not in result.stdout, "the shards hold the same weights, bit for bit"
    assert re.search(r"kind\s+'full' -> 'sharded'", result.stdout)


def test_diff_of_an_unreadable_checkpoint_is_trouble_exit_2(run_dir: Path, tmp_path: Path) -> None:
    result = cairn("ckpt", "diff", str(run_dir / "ep2-ba8-rank0.pt"), str(tmp_path / "missing.pt"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("cairn ckpt diff: no checkpoint at") and result.stderr.count("\n") == 1


# -- help and terminals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    result = cairn("ckpt", command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and f"cairn ckpt {command} " in result.stdout


def test_usage_errors_exit_2() -> None:
    result = cairn("ckpt", "convert", "a.pt", "--to", "onnx", "b")
    assert result.returncode == 2 and "invalid choice: 'onnx'" in result.stderr


def _on_a_terminal(*args: str, env: dict[str, str], stderr_too: bool = False) -> str:
    """What the command writes to stdout (and stderr, when asked) when it is a terminal (a pseudo-terminal here)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a window, as terminals have
    stderr = follower if stderr_too else subprocess.DEVNULL
    process = subprocess.Popen([CAIRN, *args], stdout=follower, stderr=stderr, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the command has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    os.close(leader)
    return b"".join(chunks).decode()


def test_colours_only_on_a_terminal_and_never_with_no_color(run_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"TERM": "xterm"}
    coloured = _on_a_terminal("ckpt", "verify", str(run_dir / "ep1-ba4-rank0.pt"), env=env)
    assert f"{ANSI}32mOK{ANSI}0m" in coloured
    plain = _on_a_terminal("ckpt", "verify", str(run_dir / "ep1-ba4-rank0.pt"), env=env | {"NO_COLOR": "1"})
    assert plain.startswith("OK") and ANSI not in plain


@pytest.mark.slow
def test_a_large_read_shows_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """A checkpoint over the 64 MiB threshold (it is 260 MiB): a bar on a terminal, none with --no-progress."""
    from cairn.checkpoint.save.commit import write_checkpoint
    from cairn.checkpoint.save.content import seal

    big = tmp_path / "big.pt"
    model = {"w": torch.zeros(65 << 20)}  # 260 MiB of float32
    write_checkpoint(seal({"state": {"model": model, "metadata": {"weights_only": True}}}), str(big))
    shown = _on_a_terminal("ckpt", "verify", str(big), env=dict(os.environ), stderr_too=True)
    assert "read big.pt:" in shown and "260M" in shown and "OK" in shown
    quiet = _on_a_terminal("ckpt", "verify", "--no-progress", str(big), env=dict(os.environ), stderr_too=True)
    assert "read big.pt" not in quiet and "OK" in quiet


# -- the library under the commands (in-process: no console script needed) ----------------------------------------


def test_tensor_comparison_is_exact_and_reports_the_largest_gap() -> None:
    from cairn.checkpoint.tools.compare import compare_tensors

    nan = float("nan")
    a = {
        "same": torch.tensor([1.0, nan]),
        "moved": torch.tensor([1.0, 2.0]),
        "signed_zero": torch.tensor([0.0]),
        "ints": torch.tensor([3, 7]),
        "flags": torch.tensor([True, False]),
        "grown": torch.zeros(2),
        "gone": torch.zeros(1),
    }
    b = {
        "same": torch.tensor([1.0, nan]),
        "moved": torch.tensor([1.0, 2.5]),
        "signed_zero": torch.tensor([-0.0]),
        "ints": torch.tensor([3, 2]),
        "flags": torch.tensor([True, True]),
        "grown": torch.zeros(3),
        "new": torch.zeros(1),
    }
    found = {d.name: d for d in compare_tensors(a, b)}
    assert sorted(found) == ["flags", "gone", "grown", "ints", "moved", "new", "signed_zero"]
    assert found["moved"].max_abs_diff == 0.5 and found["ints"].max_abs_diff == 5.0 and found["flags"].max_abs_diff == 1
    assert found["signed_zero"].max_abs_diff == 0.0, "the bits differ, the values do not"
    assert (found["grown"].a, found["grown"].b, found["grown"].max_abs_diff) == ("float32 (2,)", "float32 (3,)", None)
    assert found["gone"].b is None and found["new"].a is None


def test_progress_is_read_from_default_names() -> None:
    from cairn.checkpoint.tools.listing import progress_from_name

    assert progress_from_name("run/checkpoints/ep3-ba24-rank0.pt") == (3, 24)
    assert progress_from_name("ep12.pt") == (12, None)
    assert progress_from_name("step100.pt") == (None, None)
    assert progress_from_name("deep/ba7-ep1/model.pt") == (None, None), "only the last part of a name counts"


def test_names_with_control_characters_are_printed_escaped() -> None:
    from cairn.cli.output import human_size, printable

    assert printable("ep1.pt") == "ep1.pt"
    assert printable("\x1b[31mred.pt") == "\\x1b[31mred.pt"
    assert [human_size(n) for n in (0, 1023, 38627, 5 << 30)] == ["0 B", "1023 B", "37.7 KiB", "5 GiB"]


def test_tied_and_viewed_tensors_are_written_to_safetensors_as_copies(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from cairn.checkpoint.save.commit import write_checkpoint
    from cairn.checkpoint.save.content import seal
    from cairn.checkpoint.tools.convert import convert

    shared, row = torch.randn(4, 3), torch.arange(10.0)
    model = {"embed.weight": shared, "lm_head.weight": shared, "transposed": shared.t(), "part": row[2:5]}
    metadata = {"format_version": 1, "weights_only": True, "sharded": False}
    write_checkpoint(seal({"state": {"model": model, "metadata": metadata}}), str(tmp_path / "tied.pt"))
    convert(str(tmp_path / "tied.pt"), "safetensors", str(tmp_path / "tied.safetensors"))
    written = load_file(str(tmp_path / "tied.safetensors"))
    assert sorted(written) == sorted(model) and all(torch.equal(written[k], v) for k, v in model.items())
