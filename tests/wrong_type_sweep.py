"""Every field of a real checkpoint replaced, in turn, by each of eleven values of other types, re-hashed, and loaded
into a fresh run: the exhaustive companion of the hypothesis test in ``test_poison_fuzz.py`` (which draws 300 of
these per ``make test``). Run it by hand: ``.venv/bin/python tests/wrong_type_sweep.py``; it prints one line per
case that was neither refused nor harmless, then the counts (docs/reliability.md quotes them).
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cairn.checkpoint import load_checkpoint  # noqa: E402
from cairn.checkpoint.format import content_hash  # noqa: E402
from cairn.errors import CairnError  # noqa: E402
from conftest import TinyNet  # noqa: E402
from test_checkpoint_errors import make_trainer, save_real_checkpoint  # noqa: E402
from test_poison_fuzz import WRONG  # noqa: E402 - the same eleven values the hypothesis test draws from


def fields(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(node, dict):
        if path:  # a whole section can be replaced too
            yield path, node
        for key, value in node.items():
            yield from fields(value, (*path, key))
    elif isinstance(node, list) and node:
        yield path, node
        for index, value in enumerate(node):
            yield from fields(value, (*path, index))
    else:
        yield path, node


def main() -> int:
    folder = Path(tempfile.mkdtemp(prefix="cairn-sweep-"))
    original = torch.load(save_real_checkpoint(folder / "real"), weights_only=True)
    counts = {"refused": 0, "harmless": 0, "broken": 0}
    for path, value in list(fields(original)):
        if path[-1] == "content_hash":
            continue
        for wrong in (w for w in WRONG if type(w) is not type(value)):
            checkpoint = copy.deepcopy(original)
            parent = checkpoint
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = wrong
            if path not in {("state",), ("state", "metadata")}:  # otherwise there is nowhere left to keep a hash
                checkpoint["state"]["metadata"]["content_hash"] = content_hash(checkpoint)
            torch.save(checkpoint, folder / "case.pt")
            trainer = make_trainer(TinyNet(), max_duration="4ba")
            try:
                load_checkpoint(str(folder / "case.pt"), trainer.state)
                trainer.fit()
                counts["harmless"] += 1
            except CairnError:
                counts["refused"] += 1
            except Exception as err:  # noqa: BLE001 - what the sweep is looking for
                counts["broken"] += 1
                print(f"BROKEN {'/'.join(map(str, path))} = {wrong!r:.20}: {type(err).__name__}: {err!s:.100}")
    print(
        f"{sum(counts.values())} cases: {counts['refused']} refused before anything changed, "
        f"{counts['harmless']} accepted and trained on, {counts['broken']} broken"
    )
    return 1 if counts["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
