"""Every Python example in the README and docs/ runs, and prints what its comments say it prints.

A line ``print(...)  # 3 24`` promises that the print writes ``3 24``; a block prints nothing it does not
promise. Blocks run in order, one namespace per page, each page in its own temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
PROMISE = re.compile(r"^\s*print\(.*\)\s+#\s?(.*)$")


def _blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def _promised_output(code: str) -> list[str]:
    return [m.group(1).rstrip() for line in code.splitlines() if (m := PROMISE.match(line))]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_examples_run_and_print_what_they_promise(page: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for code in _blocks(page):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(page), "exec"), namespace)  # noqa: S102 - our own documentation
        printed = [line.rstrip() for line in out.getvalue().splitlines()]
        assert printed == _promised_output(code), f"{page.name}: an example printed something other than promised"
