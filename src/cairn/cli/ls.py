"""``cairn ckpt ls``: the checkpoints in a folder or bucket prefix, newest first, and which one ``latest`` names."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from cairn.checkpoint.save.retention import RetentionRules, check_keep_every
from cairn.checkpoint.tools.listing import (
    ListedCheckpoint,
    Listing,
    list_checkpoints_at,
    recorded_metric_names,
    retention_reasons,
)
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
  cairn ckpt ls --keep 1 --keep-best 2 --keep-every 3ep runs/first
                                              why each would be kept under these rules

columns: * marks the checkpoint a latest link or pointer names (links are shown after its name);
CREATED is when the run wrote it (local only); SIZE is its bytes on disk; KIND is full, weights-only,
sharded, unreadable (a damaged file: run cairn ckpt verify on it), or ? in a store (run cairn ckpt show
on it), with ", inc" for an incremental checkpoint (a manifest whose large tensors are chunks in the
folder's .cairn-chunks). When one is listed, OWN and SHARED show each checkpoint's own bytes (what
deleting it frees: the file, and for an incremental one the chunks no other checkpoint names) and its
shared bytes (chunks other checkpoints name too); a full checkpoint's own bytes are its size.
When the checkpoints recorded a metric (the saver's best_metric), a column shows its value
(local only; --metric picks one when they recorded several). With any of --keep, --keep-best,
--keep-every, KEPT BY shows why retention under those rules keeps each checkpoint: latest or
best (a link names it), best 1/2, every 3ep, recent 1/1; "-" means a save would delete it; "?" (a store's
checkpoint, with --keep-best) means its recorded value is not read by a listing, so it cannot be told.

--json prints one object: {"target", "checkpoints": [{"name", "location", "kind", "size_bytes",
"incremental", "own_bytes", "shared_bytes", "created_at", "epoch", "batch", "latest": [...],
"metrics": {...}, "kept_by": [...] or null}, ...] newest first, "notes": [...]}; unknown values are
null (in a store: incremental, own_bytes, shared_bytes); kept_by is null without rule options.
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
    rules = parser.add_argument_group("retention rules (show why each checkpoint would be kept)")
    rules.add_argument("--keep", type=int, metavar="N", help="the N most recent (-1: all); the saver's default")
    rules.add_argument("--keep-best", type=int, default=0, metavar="K", help="the K best by the recorded metric")
    rules.add_argument("--best-mode", choices=("max", "min"), default="max", help="higher or lower is better")
    rules.add_argument("--keep-every", metavar="TIME", help="checkpoints on this boundary ('10ep', '5000ba')")
    rules.add_argument("--metric", metavar="NAME", help="the recorded metric to show and rank by")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        rules = _rules(args)
        listing = list_checkpoints_at(args.target, recursive=args.recursive)
    except (CairnError, ValueError, TypeError, OSError) as err:
        return fail("ls", err)
    metric, note = _metric(args, listing)
    notes = [*listing.notes, *([note] if note else [])]
    kept = None if rules is None else retention_reasons(listing, rules, metric=metric)
    if args.json:
        data = listing_json(args.target, listing, kept)
        data["notes"] = notes
        print(json.dumps(data, indent=2))  # ASCII only: an escape comes out as \u001b
        return 0
    for line in notes:
        print(f"cairn ckpt ls: {printable(line)}", file=sys.stderr)
    if not listing.entries:
        print(f"cairn ckpt ls: no checkpoints in {printable(args.target)}", file=sys.stderr)
        return 0
    columns = _Columns(metric, kept, sharing=any(entry.incremental for entry in listing.entries))
    style = Style.for_stream(sys.stdout)
    header = columns.header()
    plain = [header, *(columns.cells(entry) for entry in listing.entries)]
    painted = [[style(cell, "bold") for cell in header], *(columns.painted(entry, style) for entry in listing.entries)]
    for line in table(painted, right=columns.right(), widths_from=plain):
        print(line)
    return 0


def _rules(args: argparse.Namespace) -> RetentionRules | None:
    """The retention rules the options ask to show, or None when none is given."""
    if args.keep is None and not args.keep_best and args.keep_every is None:
        return None
    every = None if args.keep_every is None else check_keep_every(args.keep_every, argument="--keep-every")
    if args.keep is not None and args.keep < -1:
        raise ValueError(f"--keep={args.keep}: use -1 (all), 0, or more")
    if args.keep_best < 0:
        raise ValueError(f"--keep-best={args.keep_best}: use 0 or more")
    recent = -1 if args.keep is None else args.keep
    return RetentionRules(recent=recent, best=args.keep_best, mode=args.best_mode, every=every)


def _metric(args: argparse.Namespace, listing: Listing) -> tuple[str | None, str | None]:
    """The recorded metric to show and rank by (``--metric``, else the only one recorded), and a note when the
    choice is not clear."""
    names = recorded_metric_names(listing)
    if args.metric is not None:
        if names and args.metric not in names:
            return args.metric, f"no listed checkpoint recorded {args.metric!r}; they recorded {', '.join(names)}"
        return args.metric, None
    if len(names) > 1:
        return None, f"the checkpoints recorded several metrics ({', '.join(names)}): pick one with --metric"
    return (names[0] if names else None), None


class _Columns:
    """The table's columns: the fixed ones, then the metric's value and the reasons to keep when asked for."""

    def __init__(self, metric: str | None, kept: dict[str, tuple[str, ...]] | None, *, sharing: bool) -> None:
        self.metric = metric
        self.kept = kept
        self.sharing = sharing  #: OWN and SHARED columns: shown when an incremental checkpoint is listed

    def header(self) -> list[str]:
        sizes = ["OWN", "SHARED"] if self.sharing else []
        extra = [self.metric.rsplit("/", 1)[-1].upper()] if self.metric else []
        extra += ["KEPT BY"] if self.kept is not None else []
        return ["", "CREATED", "SIZE", *sizes, "EPOCH", "BATCH", *extra, "KIND", "NAME"]

    def right(self) -> tuple[int, ...]:
        numbers = 3 + (2 if self.sharing else 0) + (1 if self.metric else 0)
        return tuple(range(2, 2 + numbers))

    def cells(self, entry: ListedCheckpoint) -> list[str]:
        base = _cells(entry)
        if self.sharing:
            base[3:3] = [_bytes(entry.own), _bytes(entry.shared)]
        extra = []
        if self.metric:
            value = entry.metrics.get(self.metric)
            extra.append("-" if value is None else f"{value:.6g}")
        if self.kept is not None:
            extra.append(", ".join(self.kept.get(entry.location, ())) or "-")
        return [*base[:-2], *extra, *base[-2:]]

    def painted(self, entry: ListedCheckpoint, style: Style) -> list[str]:
        cells = self.cells(entry)
        if _names_latest(entry):
            cells[0], cells[-1] = style(cells[0], "green", "bold"), style(cells[-1], "green")
        if entry.kind == "unreadable":
            cells[-2] = style(cells[-2], "red")
        return cells


def _names_latest(entry: ListedCheckpoint) -> bool:
    """Whether a ``latest`` link or pointer names the checkpoint (a link whose name starts with ``best`` is the
    ``best`` link, shown after the name but not starred: a resume does not pick it)."""
    return any(not link.rsplit("/", 1)[-1].startswith("best") for link in entry.latest)


def listing_json(target: str, listing: Listing, kept: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """What ``ls`` prints, as data: the strings exact (JSON escapes them), the notes in the object, not on stderr."""
    return {
        "target": target,
        "checkpoints": [
            {
                "name": entry.name,
                "location": entry.location,
                "kind": entry.kind,
                "size_bytes": entry.size,
                "incremental": entry.incremental,
                "own_bytes": entry.own,
                "shared_bytes": entry.shared,
                "created_at": entry.created_at,
                "epoch": entry.epoch,
                "batch": entry.batch,
                "latest": list(entry.latest),
                "metrics": dict(entry.metrics),
                "kept_by": None if kept is None else list(kept.get(entry.location, ())),
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
        "*" if _names_latest(entry) else "",
        local_time(entry.created_at),
        human_size(entry.size),
        "-" if entry.epoch is None else str(entry.epoch),
        "-" if entry.batch is None else str(entry.batch),
        entry.kind + (", inc" if entry.incremental else ""),
        name,
    ]


def _bytes(count: int | None) -> str:
    return "?" if count is None else human_size(count)
