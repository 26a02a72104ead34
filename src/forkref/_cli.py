"""The ``forkref`` command line: ``forkref demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forkref", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="map over a big DataFrame on fork workers: pickled vs forkref.share()",
    )
    demo.add_argument("--size", default="1GiB", help="DataFrame size, e.g. 256MiB, 1GiB (default)")
    demo.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    demo.add_argument("--tasks", type=int, default=8, help="number of tasks (default 8)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forkref`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from forkref._demo import parse_size, run_demo

        try:
            size = parse_size(args.size)
        except ValueError as err:
            print(f"forkref demo: {err}", file=sys.stderr)
            return 2
        if args.workers < 1 or args.tasks < 1:
            print("forkref demo: --workers and --tasks must be at least 1", file=sys.stderr)
            return 2
        run_demo(size, args.workers, args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
