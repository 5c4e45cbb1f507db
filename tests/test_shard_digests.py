"""A sharded folder's digests are taken while DCP writes its files, not by reading them back afterwards: the save
reads none of them, and every digest it records is the file's (a reader checks them all)."""

from __future__ import annotations

import sys
from pathlib import Path

from cairn.checkpoint import read_checkpoint
from cairn.checkpoint.format import file_digest
from cairn.checkpoint.tools.convert import convert
from conftest import build_trainer

_OPENED_FOR_READING: list[str] | None = None


def _record_reads(event: str, args: tuple) -> None:
    if _OPENED_FOR_READING is not None and event == "open" and isinstance(args[0], str):
        mode = args[1] if isinstance(args[1], str) else "r"
        if "r" in mode and "+" not in mode:
            _OPENED_FOR_READING.append(args[0])


sys.addaudithook(_record_reads)  # stays for the session (audit hooks cannot be removed): idle unless recording


def test_a_sharded_save_reads_none_of_its_files_back_and_records_their_digests(tmp_path: Path) -> None:
    global _OPENED_FOR_READING
    build_trainer(tmp_path, save_folder=str(tmp_path / "saved"), save_filename="ep{epoch}.pt", max_duration="1ep").fit()
    folder = tmp_path / "ep1-sharded"
    _OPENED_FOR_READING = []
    try:
        convert(str(tmp_path / "saved" / "ep1.pt"), "sharded", str(folder))
        opened = list(_OPENED_FOR_READING)
    finally:
        _OPENED_FOR_READING = None
    written = [path for path in opened if path.endswith((".distcp", ".metadata"))]
    assert written == [], f"the save read its own shard files back: {written}"
    recorded = read_checkpoint(str(folder))["state"]["metadata"]["shards"]  # every digest checked against its file
    assert sorted(recorded) == sorted(p.name for p in folder.iterdir() if p.name != "cairn.pt")
    assert all(recorded[name] == file_digest(str(folder / name)) for name in recorded)
