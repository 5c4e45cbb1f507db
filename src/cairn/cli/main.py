"""``cairn``: the console command. ``cairn demo`` trains the digits example; ``cairn --version`` says which."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import cairn

__all__ = ["main"]

_EXAMPLES = """examples:
  cairn --version          print cairn's and torch's versions
  cairn demo               train a small CNN on handwritten digits
  cairn demo --epochs 3    a shorter run
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
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
