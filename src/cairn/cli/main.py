"""``cairn``: the console command. ``cairn demo`` trains the digits example; ``cairn ckpt convert`` changes a
checkpoint's form; ``cairn --version`` says which versions are installed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import cairn
from cairn.checkpoint.convert import FORMATS

__all__ = ["main"]

_EXAMPLES = """examples:
  cairn --version          print cairn's and torch's versions
  cairn demo               train a small CNN on handwritten digits
  cairn demo --epochs 3    a shorter run
  cairn ckpt convert ckpt/ep3-ba24-rank0.pt --to single-file ep3.pt
                           join a sharded checkpoint folder into one file
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cairn",
        description="PyTorch training with checkpoints you can trust.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="train a small CNN on scikit-learn's handwritten digits")
    from cairn.demo import add_arguments

    add_arguments(demo)
    ckpt = commands.add_parser("ckpt", help="look at and convert checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)
    convert = ckpt_commands.add_parser(
        "convert",
        help="write a checkpoint in another form",
        epilog="example: cairn ckpt convert ckpt/ep3-ba24-rank0.pt --to single-file ep3.pt",
    )
    convert.add_argument("source", help="a checkpoint file or sharded checkpoint folder")
    convert.add_argument("--to", dest="target", required=True, choices=FORMATS, help="the form to write")
    convert.add_argument("out", help="where to write it (must not exist)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import torch

        print(f"cairn {cairn.__version__} (torch {torch.__version__})")
        return 0
    if args.command == "demo":
        from cairn.demo import run

        return run(args)
    if args.command == "ckpt":
        return _convert(args)
    parser.print_help(sys.stderr)
    return 2


def _convert(args: argparse.Namespace) -> int:
    from cairn.checkpoint.convert import convert
    from cairn.errors import CairnError

    try:
        print(convert(args.source, args.target, args.out))
    except (CairnError, FileExistsError, ValueError) as err:
        print(f"cairn ckpt convert: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
