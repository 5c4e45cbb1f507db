"""``cairn ckpt ls``: the checkpoints in a folder or bucket prefix, newest first, and which one ``latest`` names."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cairn.checkpoint.tools.listing import ListedCheckpoint, Listing, list_checkpoints_at
from cairn.cli.output import Style, fail, human_size, local_time, printable, table
from cairn.errors import CairnError

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  cairn ckpt ls runs/first                    the checkpoints in a folder, newest first
  cairn ckpt ls -r runs                       also in its subfolders
  cairn ckpt ls s3://bucket/my-run/checkpoints
                                              objects under a prefix (nothing is downloaded)
  cairn ckpt ls --json runs/first | jq -r '.checkpoints[0].location'
                                              the newest checkpoint's path, for scripts

columns: * marks the checkpoint a latest link or pointer names (shown after its name);
CREATED is when the run wrote it (local only); KIND is full, weights-only, sharded, unreadable
(a damaged file: run cairn ckpt verify on it), or ? in a store (run cairn ckpt show on it).

--json prints one object: {"target", "checkpoints": [{"name", "location", "kind", "size_bytes",
"created_at", "epoch", "batch", "latest": [...]}, ...] newest first, "notes": [...]}; unknown values are null.
"""


def add_parser(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "ls",
        parents=[parent],
        help="list the checkpoints in a folder or bucket prefix, newest first",
        description="List the checkpoints in a local folder or under a store prefix (s3://, gs://, az://, ...).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="PATH_OR_URI", help="a folder, a bucket prefix, or one checkpoint")
    parser.add_argument("-r", "--recursive", action="store_true", help="also list checkpoints in subfolders")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys below and in docs/cli.md)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        listing = list_checkpoints_at(args.target, recursive=args.recursive)
    except (CairnError, ValueError, OSError) as err:
        return fail("ls", err)
    if args.json:
        print(json.dumps(listing_json(args.target, listing), indent=2))  # ASCII only: an escape comes out as \u001b
        return 0
    for note in listing.notes:
        print(f"cairn ckpt ls: {printable(note)}", file=sys.stderr)
    if not listing.entries:
        print(f"cairn ckpt ls: no checkpoints in {printable(args.target)}", file=sys.stderr)
        return 0
    style = Style.for_stream(sys.stdout)
    header = ["", "CREATED", "SIZE", "EPOCH", "BATCH", "KIND", "NAME"]
    plain = [header, *(_cells(entry) for entry in listing.entries)]
    painted = [[style(cell, "bold") for cell in header], *(_painted(entry, style) for entry in listing.entries)]
    for line in table(painted, right=(2, 3, 4), widths_from=plain):
        print(line)
    return 0


def listing_json(target: str, listing: Listing) -> dict[str, Any]:
    """What ``ls`` prints, as data: the strings exact (JSON escapes them), the notes in the object, not on stderr."""
    return {
        "target": target,
        "checkpoints": [
            {
                "name": entry.name,
                "location": entry.location,
                "kind": entry.kind,
                "size_bytes": entry.size,
                "created_at": entry.created_at,
                "epoch": entry.epoch,
                "batch": entry.batch,
                "latest": list(entry.latest),
            }
            for entry in listing.entries
        ],
        "notes": list(listing.notes),
    }


def _cells(entry: ListedCheckpoint) -> list[str]:
    name = printable(entry.name)
    if entry.latest:
        name += "  <- " + ", ".join(printable(link) for link in entry.latest)
    return [
        "*" if entry.latest else "",
        local_time(entry.created_at),
        human_size(entry.size),
        "-" if entry.epoch is None else str(entry.epoch),
        "-" if entry.batch is None else str(entry.batch),
        entry.kind,
        name,
    ]


def _painted(entry: ListedCheckpoint, style: Style) -> list[str]:
    cells = _cells(entry)
    if entry.latest:
        cells[0], cells[6] = style(cells[0], "green", "bold"), style(cells[6], "green")
    if entry.kind == "unreadable":
        cells[5] = style(cells[5], "red")
    return cells
