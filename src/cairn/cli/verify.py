"""``cairn ckpt verify``: is each checkpoint intact? One line per checkpoint, exit 1 if any is not."""

from __future__ import annotations

import argparse
import os
import sys

from cairn.checkpoint.shards import is_sharded_folder
from cairn.checkpoint.tools.listing import list_local_checkpoints, list_remote_checkpoints
from cairn.cli.output import Style, printable
from cairn.cli.sources import opened, store_for
from cairn.errors import CairnError
from cairn.storage.uri import is_uri

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  cairn ckpt verify runs/first/ep3.pt         check one file
  cairn ckpt verify runs/first                every checkpoint in a folder (what cairn ckpt ls lists)
  cairn ckpt verify a.pt b.pt sharded-folder/ several at once
  cairn ckpt verify s3://bucket/run/ep3.pt    downloads and checks an object
  cairn ckpt verify s3://bucket/run/          every .pt/.pth/.ckpt object under a prefix

Each checkpoint is read without running code from it, its structure checked, and its content hash recomputed;
a sharded folder's shard index is checked against its shard files; every chunk of an incremental checkpoint is
read from its chunk folder (a store's, for a URI) and checked against its key, and the OK line says how many. A
missing or damaged chunk fails the checkpoint, naming the chunk. Prints OK or FAILED (with the reason) per
checkpoint. Exit status: 0 when all are intact, 1 when any failed (or a folder held none).
"""


def add_parser(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "verify",
        parents=[parent],
        help="check checkpoints' structure and content hash (exit 1 if any failed)",
        description="Check that checkpoints are intact: safe to load, well formed, and matching their content hash.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", metavar="CKPT", nargs="+", help="checkpoint files, folders or URIs")
    parser.add_argument("-r", "--recursive", action="store_true", help="in a folder, also verify its subfolders")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    style = Style.for_stream(sys.stdout)
    results: list[bool] = []
    chunks: list[int] = []
    for target in args.targets:
        try:
            checkpoints = _expand(target, recursive=args.recursive)
        except Exception as err:  # noqa: BLE001 - reported; the other targets are still checked
            _report(style, target, err)
            results.append(False)
            continue
        for checkpoint in checkpoints:
            checked = _verify(checkpoint, style, progress=args.progress)
            results.append(checked is not None)
            chunks.append(checked or 0)
    if len(results) > 1:
        with_chunks = f" ({sum(chunks)} chunks checked)" if sum(chunks) else ""
        print(f"cairn ckpt verify: {results.count(True)} of {len(results)} intact{with_chunks}", file=sys.stderr)
    return 0 if all(results) else 1


def _expand(target: str, *, recursive: bool) -> list[str]:
    """The checkpoints ``target`` stands for: itself, or every checkpoint a folder or prefix holds.

    A folder that is not itself a sharded checkpoint means what ``cairn ckpt ls`` lists in it: its checkpoint files
    (damaged ones included, so that they fail here) and sharded folders, not links or temporary files.
    """
    if is_uri(target):
        store, name = store_for(target)
        if name and not name.endswith("/") and not store.list_objects(name + "/"):
            return [target]
        entries = list_remote_checkpoints(store, name, recursive=recursive).entries
    elif os.path.isdir(target) and not is_sharded_folder(target):
        entries = list_local_checkpoints(target, recursive=recursive).entries
    else:
        return [target]
    if not entries:
        raise ValueError("holds no checkpoints")
    return [entry.location for entry in entries]


def _verify(target: str, style: Style, *, progress: bool) -> int | None:
    """Check one checkpoint; the number of chunks checked (0 for anything but an incremental checkpoint), or
    ``None`` when it failed. Whatever goes wrong with it (a damaged file, a missing chunk, an object whose download
    keeps breaking off) is its own FAILED line: the checkpoints after it in a folder or prefix are still checked."""
    try:
        with opened(target, progress=progress) as source:
            label, digest = source.label, source.checkpoint["state"]["metadata"]["content_hash"]
            checked = None if source.chunks is None else len(source.chunks.checked)
    except Exception as err:  # noqa: BLE001 - reported as this checkpoint's failure, see above
        _report(style, target, err)
        return None
    chunks = "" if checked is None else f"  incremental: {checked} chunk{'' if checked == 1 else 's'} checked"
    print(f"{style('OK', 'green')}      {printable(label)}  {digest}{chunks}")
    return checked or 0


def _report(style: Style, target: str, error: BaseException) -> None:
    message = " ".join(_reason(error).split())
    print(f"{style('FAILED', 'red', 'bold')}  {printable(target)}: {printable(message)}")


def _reason(error: BaseException) -> str:
    """cairn's own errors (and the OS's) say what happened in their message; anything else also needs its type."""
    if isinstance(error, (CairnError, ValueError, OSError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
