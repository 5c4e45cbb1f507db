"""``cairn ckpt diff``: which tensors and which metadata differ between two checkpoints.

Exit status as ``diff`` and ``git diff --exit-code`` give it: 0 when the checkpoints are identical (and nothing is
printed), 1 when they differ, 2 when one could not be read.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from cairn.checkpoint.load.sharded import read_whole_shards
from cairn.checkpoint.tools.compare import CheckpointDiff, Difference, TensorDifference, compare_checkpoints
from cairn.cli.output import Style, fail, printable, table
from cairn.cli.sources import Opened, opened
from cairn.errors import CairnError

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  cairn ckpt diff runs/first/ep1.pt runs/first/ep2.pt
                                   what training changed between two epochs
  cairn ckpt diff ep3.pt ep3-sharded/
                                   a file against its converted form
  cairn ckpt diff --all a.pt b.pt  also list each differing optimizer, metric and RNG entry
  cairn ckpt diff --quiet a.pt b.pt && echo same
                                   only the exit status

Compared: model tensors (names, dtypes, shapes, max abs difference of values), metadata (run name, timestamp,
versions, kind...; not the content hash, which differs exactly when something else does), and all other state.
exit status: 0 identical (nothing printed), 1 different, 2 trouble (as diff and git diff --exit-code).
"""


def add_parser(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "diff",
        parents=[parent],
        help="show which tensors and metadata differ between two checkpoints (exit 1 if any)",
        description="Compare two checkpoints (files, sharded folders or URIs), each read safely and verified.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("a", metavar="A", help="the first checkpoint")
    parser.add_argument("b", metavar="B", help="the second checkpoint")
    parser.add_argument("--all", action="store_true", help="list every differing entry of the other state")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing; the exit status tells")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        with contextlib.ExitStack() as stack:
            a = stack.enter_context(opened(args.a, progress=args.progress))
            b = stack.enter_context(opened(args.b, progress=args.progress))
            diff = compare_checkpoints(a.checkpoint, b.checkpoint, a_model=_shards(a), b_model=_shards(b))
            labels = (a.label, b.label)
    except (CairnError, ValueError, OSError) as err:
        return fail("diff", err, code=2)
    if diff.identical:
        return 0
    if not args.quiet:
        print("\n".join(_report(diff, labels, Style.for_stream(sys.stdout), every=args.all)))
        for note in diff.notes:
            print(f"cairn ckpt diff: {note}", file=sys.stderr)
    return 1


def _shards(source: Opened) -> dict[str, Any] | None:
    """A sharded folder's model, read from its shards; ``None`` when the model is in the checkpoint itself."""
    sharded = source.checkpoint["state"]["metadata"].get("sharded")
    return read_whole_shards(source.path)["model"] if sharded else None


def _report(diff: CheckpointDiff, labels: tuple[str, str], style: Style, *, every: bool) -> list[str]:
    lines = [style(f"--- {printable(labels[0])}", "red"), style(f"+++ {printable(labels[1])}", "green")]
    if diff.model:
        lines.append(f"model tensors ({len(diff.model)} of {diff.model_tensors} differ):")
        lines += _tensor_lines(diff.model, style)
    if diff.metadata:
        lines += ["metadata:", *_value_lines(diff.metadata, style)]
    if diff.other and every:
        lines += ["other state:", *_value_lines(diff.other, style)]
    elif diff.other:
        lines += ["other state (--all lists each entry):", *_section_counts(diff.other)]
    return lines


def _tensor_lines(found: Sequence[TensorDifference], style: Style) -> list[str]:
    rows = []
    for item in found:
        if item.b is None:
            rows.append(["-", printable(item.name), item.a or "", "only in A"])
        elif item.a is None:
            rows.append(["+", printable(item.name), item.b or "", "only in B"])
        elif item.max_abs_diff is None or item.a != item.b:
            rows.append(["~", printable(item.name), f"{item.a} -> {item.b}", _gap(item.max_abs_diff)])
        else:
            rows.append(["~", printable(item.name), item.a, _gap(item.max_abs_diff)])
    return _marked(rows, style)


def _value_lines(found: Sequence[Difference], style: Style) -> list[str]:
    rows = []
    for item in found:
        if item.b is None:
            rows.append(["-", printable(item.key), printable(item.a or ""), "only in A"])
        elif item.a is None:
            rows.append(["+", printable(item.key), printable(item.b), "only in B"])
        elif item.max_abs_diff is not None:
            rows.append(["~", printable(item.key), item.a, _gap(item.max_abs_diff)])
        else:
            rows.append(["~", printable(item.key), f"{printable(item.a)} -> {printable(item.b)}", ""])
    return _marked(rows, style)


def _marked(rows: list[list[str]], style: Style) -> list[str]:
    colours = {"-": "red", "+": "green", "~": "yellow"}
    painted = [[style(row[0], colours[row[0]]), *row[1:]] for row in rows]
    return ["  " + line for line in table(painted, widths_from=rows)]


def _gap(value: float | None) -> str:
    if value is None:
        return ""
    if math.isnan(value):
        return "max abs diff nan (NaN on one side)"
    if value == 0:
        return "same values, other bits (-0.0 or NaN payloads)"
    return f"max abs diff {value:.6g}"


def _section_counts(found: Sequence[Difference]) -> list[str]:
    counts = Counter(item.key.split("/", 1)[0] for item in found)
    return [
        f"  {printable(section)}: {count} {'entry differs' if count == 1 else 'entries differ'}"
        for section, count in counts.items()
    ]
