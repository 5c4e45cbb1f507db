"""``cairn ckpt convert``: write a checkpoint in another form; the source is never changed."""

from __future__ import annotations

import argparse

from cairn.checkpoint.tools.convert import FORMATS
from cairn.cli.output import fail, printable
from cairn.cli.sources import local_copy
from cairn.errors import CairnError

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  cairn ckpt convert ckpt/ep3-sharded --to single-file ep3.pt
                                         join a sharded checkpoint folder into one file
  cairn ckpt convert ep3.pt --to sharded ep3-sharded
                                         split a file into a folder of DCP shards
  cairn ckpt convert ep3.pt --to weights-only ep3-weights.pt
                                         keep the model and metadata, drop optimizer and RNG state
  cairn ckpt convert ep3.pt --to safetensors model.safetensors
                                         the model's tensors for other tools (pip install 'cairn[safetensors]')
  cairn ckpt convert s3://bucket/run/ep3.pt --to weights-only ep3-weights.pt
  cairn ckpt convert runs/first/ep3.pt --to single-file ep3-whole.pt
                                         an incremental checkpoint as one self-contained file (no chunk folder)

OUT must not exist. The source is read safely and verified first (an incremental checkpoint's every chunk against
its key); OUT appears complete or not at all.
"""


def add_parser(commands: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "convert",
        parents=[parent],
        help="write a checkpoint in another form",
        description="Write a checkpoint as a single file, weights only, a sharded folder, or safetensors.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="CKPT", help="a checkpoint file, sharded checkpoint folder or URI")
    parser.add_argument("--to", dest="target", required=True, choices=FORMATS, help="the form to write")
    parser.add_argument("out", metavar="OUT", help="where to write it (must not exist)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from cairn.checkpoint.tools.convert import check_output, convert

    try:
        check_output(args.out, args.target)  # before a download, not after
        with local_copy(args.source, progress=args.progress) as copy:
            print(printable(convert(copy.path, args.target, args.out, chunks=copy.chunks)))
    except (CairnError, OSError, ValueError) as err:
        return fail("convert", err)
    return 0
