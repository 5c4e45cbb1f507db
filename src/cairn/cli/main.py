"""``cairn``: the console command. ``cairn demo`` trains the digits example; ``cairn ckpt ls / show / verify /
convert / diff`` look at, check and convert checkpoints (one module each in this package); ``cairn --version`` says
which versions are installed.

Exit status: 0 success, 1 failure (one line on stderr: ``cairn ckpt <command>: <what went wrong>``), 2 a usage
error (argparse's). ``diff`` follows ``diff``: 0 identical, 1 different, 2 trouble.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import cairn
from cairn.cli import convert, diff, ls, show, verify

__all__ = ["main"]

_EXAMPLES = """examples:
  cairn --version          print cairn's and torch's versions
  cairn demo               train a small CNN on handwritten digits
  cairn demo --epochs 3    a shorter run
  cairn ckpt ls runs       the checkpoints in a folder, newest first
  cairn ckpt show ep3.pt   what a checkpoint holds
  cairn ckpt verify runs   check every checkpoint in a folder
  cairn ckpt convert ckpt/ep3-ba24-rank0.pt --to single-file ep3.pt
                           join a sharded checkpoint folder into one file
  cairn ckpt diff ep2.pt ep3.pt
                           which tensors and metadata differ
"""

_CKPT_EXAMPLES = """examples:
  cairn ckpt ls runs/first                  list, newest first; * marks what latest points to
  cairn ckpt ls --json runs/first           the same as one JSON object, for scripts
  cairn ckpt show runs/first/latest-rank0.pt
  cairn ckpt show --json ep3.pt             one JSON object, for scripts
  cairn ckpt verify runs/first s3://bucket/run/
  cairn ckpt convert ep3.pt --to safetensors model.safetensors
  cairn ckpt diff ep2.pt ep3.pt

Each command has its own --help. Colours only on a terminal (NO_COLOR turns them off); reads of 64 MiB or
more show a progress bar on stderr unless --no-progress.
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
    ckpt = commands.add_parser(
        "ckpt",
        help="look at, check, convert and compare checkpoints",
        description="Look at, check, convert and compare checkpoints: local files, sharded folders, or URIs.",
        epilog=_CKPT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bars, even on a terminal"
    )
    for command in (ls, show, verify, convert, diff):
        command.add_parser(ckpt_commands, common)
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
        return _run_quietly_on_a_closed_pipe(args)
    parser.print_help(sys.stderr)
    return 2


def _run_quietly_on_a_closed_pipe(args: argparse.Namespace) -> int:
    """Run a ``cairn ckpt`` command; ``| head`` closing the pipe, or Ctrl-C, ends it without a traceback."""
    try:
        code = args.handler(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return 1
    except KeyboardInterrupt:
        print(f"cairn ckpt {args.ckpt_command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
