"""``cairn ckpt show``: what one checkpoint holds, for a person or (``--json``) for a script."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from cairn.checkpoint.tools.listing import (
    CheckpointSummary,
    ChunkSharing,
    chunk_sharing,
    model_tensor_sizes,
    summarize,
)
from cairn.cli.output import Style, fail, human_size, local_time, printable, table
from cairn.cli.sources import Opened, opened
from cairn.errors import CairnError
from cairn.storage.uri import is_uri

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  cairn ckpt show runs/first/ep3.pt           a readable summary
  cairn ckpt show runs/first/latest-rank0.pt  the one latest points to
  cairn ckpt show s3://bucket/run/latest-rank0.pt
                                              downloads it (following the latest pointer) and reads it
  cairn ckpt show --json ep3.pt | jq .parameters
                                              one JSON object, for scripts

The checkpoint is read safely and its content hash checked: show fails (exit 1) on a damaged file, with the reason.
An incremental checkpoint's chunks are each read and checked against their key; show says how many there are, and
its own bytes (the manifest and the chunks no other checkpoint names: what deleting it frees) and its shared bytes
(chunks other checkpoints of its chunk folder name too; unknown for one in a store).
"""


def add_parser(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "show",
        parents=[parent],
        help="summarize one checkpoint: progress, versions, sizes per module, optimizers",
        description="Summarize a checkpoint file, sharded folder or object (read safely, hash verified).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="CKPT", help="a checkpoint file, sharded folder or URI")
    parser.add_argument("--json", action="store_true", help="print one JSON object (keys in docs/cli.md)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        with opened(args.target, progress=args.progress) as source:
            sizes = model_tensor_sizes(source.path) if source.checkpoint["state"]["metadata"].get("sharded") else None
            sharing, notes = _sharing(args.target, source)
            summary = summarize(
                source.checkpoint,
                source=source.label,
                size=source.size,
                tensor_sizes=sizes,
                incremental=sharing,
                chunks_checked=len(source.chunks.checked) if source.chunks else 0,
            )
    except (CairnError, ValueError, OSError) as err:
        return fail("show", err)
    for note in notes:
        print(f"cairn ckpt show: {printable(note)}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2, default=repr))  # ASCII only: an escape comes out as \u001b
    else:
        print("\n".join(_report(summary, Style.for_stream(sys.stdout))))
    return 0


def _sharing(target: str, source: Opened) -> tuple[ChunkSharing | None, list[str]]:
    """An incremental checkpoint's chunks and how many other checkpoints share; ``None`` for any other. Sharing is
    told from the other manifests of a local chunk folder; in a store it is unknown (every manifest there would have
    to be downloaded)."""
    if source.chunks is None:
        return None, []
    if not is_uri(target):
        found, notes = chunk_sharing([source.path])
        if source.path in found:
            return dataclasses.replace(found[source.path], folder=source.chunks.folder), notes  # as the user named it
    checked = source.chunks.checked
    return ChunkSharing(source.chunks.folder, source.size, len(checked), sum(checked.values()), None, None), []


def _report(summary: CheckpointSummary, style: Style) -> list[str]:
    """Every value from the checkpoint is shown through :func:`printable`: a run name or an optimizer's key holding
    terminal escapes is shown escaped, not obeyed."""
    facts = [
        ("kind", _kind(summary)),
        ("size", _size(summary)),
        *([("chunks", _chunks(summary.incremental))] if summary.incremental else []),
        ("created", local_time(summary.created_at)),
        ("run name", printable(summary.run_name or "-")),
        ("timestamp", printable(_timestamp(summary.timestamp))),
        ("versions", printable(_versions(summary.versions))),
        ("world size", printable("-" if summary.world_size is None else summary.world_size)),
        ("optimizers", ", ".join(printable(name) for name in summary.optimizers) or "none"),
        ("schedulers", ", ".join(printable(name) for name in summary.schedulers) or "none"),
        ("rng", f"saved for {_count(summary.rng_ranks, 'rank')}" if summary.rng_ranks else "none"),
        ("loader", _loader(summary.loader_parts)),
        ("hash", style("OK", "green") + f" {printable(summary.content_hash)}" + _hash_scope(summary)),
    ]
    width = max(len(key) for key, _ in facts)
    title = printable(summary.source)
    if os.path.islink(summary.source):
        title += f" -> {printable(os.readlink(summary.source))}"
    lines = [style(title, "bold")]
    lines += [f"  {key:<{width}}  {value}" for key, value in facts]
    return [*lines, "", *_modules(summary, style)]


def _kind(summary: CheckpointSummary) -> str:
    kind = summary.kind + (" (weights only)" if summary.weights_only and summary.kind == "sharded" else "")
    return kind + (", incremental" if summary.incremental else "")


def _size(summary: CheckpointSummary) -> str:
    """The size on disk; for an incremental checkpoint, the manifest's, then its own and its shared bytes."""
    sharing = summary.incremental
    if sharing is None:
        return human_size(summary.size)
    if sharing.shared_bytes is None:
        return f"{human_size(sharing.manifest_bytes)} manifest + {human_size(sharing.chunk_bytes)} of chunks"
    return (
        f"{human_size(sharing.manifest_bytes)} manifest; own {human_size(sharing.own_bytes)}, "
        f"shared {human_size(sharing.shared_bytes)}"
    )


def _chunks(sharing: ChunkSharing) -> str:
    text = f"{_count(sharing.chunks, 'chunk')} ({human_size(sharing.chunk_bytes)}) in {printable(sharing.folder)}"
    if sharing.shared_chunks is None:
        return text + "; shared with other checkpoints: unknown in a store"
    return text + f"; {sharing.shared_chunks} of them also named by other checkpoints"


def _loader(parts: list[list[str]]) -> str:
    """Whether a mid-epoch resume continues the data loader from its state or replays the epoch's first batches."""
    saved = [names for names in parts if names]
    if not saved:
        return "no state saved (a mid-epoch resume skips from the epoch's start)"
    kinds = sorted({", ".join(names) for names in saved})
    return f"state saved for {_count(len(saved), 'rank')} ({printable('; '.join(kinds))})"


def _timestamp(timestamp: dict[str, object]) -> str:
    if not timestamp:
        return "-"
    order = ("epoch", "batch", "sample", "token")
    shown = [
        key for key in order if key in timestamp and (timestamp[key] or key != "token")
    ]  # most runs count no tokens
    text = ", ".join(f"{key} {timestamp[key]}" for key in shown)
    within = [
        f"{key.removesuffix('_in_epoch')} {timestamp[key]}"
        for key in ("batch_in_epoch", "sample_in_epoch")
        if timestamp.get(key)
    ]
    if within:
        text += f" ({', '.join(within)} into the epoch)"
    seconds = timestamp.get("total_wct")
    if isinstance(seconds, (int, float)):
        text += f"; {seconds:.1f} s of training"
    return text


def _versions(versions: dict[str, object]) -> str:
    cairn, torch, form = (versions.get(key) or "?" for key in ("cairn", "torch", "format"))
    return f"cairn {cairn}, torch {torch}, format {form}"


def _hash_scope(summary: CheckpointSummary) -> str:
    """A sharded folder's hash covers its cairn.pt, which records a digest of each shard file (all checked); a
    manifest's covers each chunk's key, and each chunk was checked against its key."""
    if summary.incremental is not None:
        return f" (the manifest; each of its {_count(summary.chunks_checked, 'chunk')} checked against its key)"
    if summary.kind != "sharded":
        return ""
    return f" (cairn.pt, and {_count(summary.shard_files, 'shard file')} by digest)"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _modules(summary: CheckpointSummary, style: Style) -> list[str]:
    header = ["module", "parameters", "bytes"]
    rows = [[printable(name), f"{size.parameters:,}", human_size(size.bytes)] for name, size in summary.modules.items()]
    rows.append(["total", f"{summary.parameters:,}", human_size(summary.parameter_bytes)])
    plain = [header, *rows]
    painted = [[style(cell, "bold") for cell in header], *rows[:-1], [style(cell, "bold") for cell in rows[-1]]]
    return ["  " + line for line in table(painted, right=(1, 2), widths_from=plain)]
