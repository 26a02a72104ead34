"""The forkref command line: bench, doctor and demo.

Exit codes (the same for every subcommand, for scripts):

    0    everything ran and every check passed
    1    a check failed: a bench answer was WRONG or a method failed with an
         error; doctor found a capability that does not work here
    2    usage error: a bad option or value, or an optional package the
         requested output needs is missing (the message names the install)
    130  interrupted (Ctrl-C); every process the bench started is ended
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_EPILOG = """\
exit codes: 0 all checks passed; 1 a check failed (a WRONG bench result, a
method error, a capability doctor found broken); 2 usage error or a missing
optional package; 130 interrupted.

Run 'forkref COMMAND --help' for a command's options."""

# --quick: the short run `make demo` does (about a minute on 2 cores).
_QUICK = {
    "size": "256MiB",
    "items": 500_000,
    "late_iters": 2,
    "result_size": "64MiB",
    "tiny": 20_000,
    "pickled_tasks": 2,
}
_FULL = {
    "size": "1GiB",
    "items": 2_000_000,
    "late_iters": 3,
    "result_size": "256MiB",
    "tiny": 100_000,
    "pickled_tasks": 4,
}


def _version() -> str:
    import forkref

    return forkref.__version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkref",
        description="forkref: hand big objects to process-pool workers by reference.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"forkref {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(commands)
    doctor = commands.add_parser(
        "doctor",
        help="what matters for forkref on this machine, with a verdict per capability",
        description="Print the facts that matter for forkref here (Python, start methods, "
        "shared memory, huge pages, threads, packages, notebook) and a verdict per "
        "capability with the fix where one applies. Exit status 1 if a capability fails.",
    )
    doctor.add_argument("--json", action="store_true", help="print JSON instead of text")
    demo = commands.add_parser(
        "demo",
        help="one map over a big DataFrame on fork workers: pickled vs forkref.share()",
        description="Map over a big DataFrame on a stdlib fork Pool twice: the frame "
        "pickled per task, then forkref.share(frame). See 'forkref bench' for the full matrix.",
    )
    demo.add_argument("--size", default="1GiB", help="DataFrame size, e.g. 256MiB, 1GiB (default)")
    demo.add_argument("--workers", type=int, default=2, help="pool size (default 2)")
    demo.add_argument("--tasks", type=int, default=8, help="number of tasks (default 8)")
    return parser


def _add_bench(commands: Any) -> None:
    from forkref._tools.bench.catalog import load
    from forkref._tools.bench.registry import METHODS, WORKLOADS, Config

    load()
    bench = commands.add_parser(
        "bench",
        help="forkref against the stdlib, joblib, mpire and Ray on this machine",
        description=textwrap.fill(
            "Run each workload with each method, each run in a fresh process; check every "
            "answer against a serial computation (WRONG when it differs); report wall time, "
            "the ratio to forkref.Pool + share(), and each worker's peak USS and PSS. "
            "Methods whose package is missing are listed as skipped, with the install command.",
            78,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads:\n"
        + "".join(f"  {name:<14}{w.title(Config())}\n" for name, w in WORKLOADS.items())
        + "methods:\n"
        + "".join(f"  {name:<14}{m.label}\n" for name, m in METHODS.items()),
    )
    add = bench.add_argument
    add("--quick", action="store_true",
        help="the short run of 'make demo': 256MiB frame, 500000 dicts, 2 late iterations, "
        "64MiB results, 20000 tiny tasks, 2 pickled tasks (options given explicitly win)")
    add("--size", help=f"DataFrame size (default {_FULL['size']})")
    add("--items", type=int, help=f"small dicts in the list (default {_FULL['items']})")
    add("--late-iters", type=int,
        help=f"new frames in the late loop (default {_FULL['late_iters']})")
    add("--result-size", help=f"bytes of results, all tasks (default {_FULL['result_size']})")
    add("--tiny", type=int, help=f"trivial tasks (default {_FULL['tiny']})")
    add("--workers", type=int, default=2, help="processes per pool (default 2)")
    add("--pickled-tasks", type=int,
        help="tasks run by methods that pickle the data per task; their time is scaled "
        f"to the full count (default {_FULL['pickled_tasks']})")
    add("--timeout", type=float, default=120.0,
        help="seconds per method and workload (default 120)")
    add("--rounds", type=int, default=1,
        help="runs per method, best time kept; methods that pickle per task run once "
        "(default 1)")
    add("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    add("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    add("--json", nargs="?", const="-", metavar="FILE",
        help="write the results as JSON to FILE, or to stdout instead of the table")
    add("--plot", metavar="FILE.png", help="draw time and memory per method to FILE.png")
    add("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forkref`` console script and of ``python -m forkref``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            from forkref._tools.bench.cli import run_bench

            words = list(sys.argv[1:] if argv is None else argv)
            return run_bench(args, _QUICK if args.quick else _FULL, words)
        if args.command == "doctor":
            return _doctor(args.json)
        return _demo(args)
    except KeyboardInterrupt:
        print("forkref: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _doctor(as_json: bool) -> int:
    from forkref._tools.doctor import diagnose, render

    diagnosis = diagnose()
    if as_json:
        print(json.dumps(diagnosis.as_dict(), indent=2))
    else:
        print(render(diagnosis))
    return diagnosis.exit_code


def _demo(args: argparse.Namespace) -> int:
    from forkref._tools.bench.data import parse_size
    from forkref._tools.demo import run_demo

    try:
        size = parse_size(args.size)
    except ValueError as err:
        print(f"forkref demo: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers < 1 or args.tasks < 1:
        print("forkref demo: --workers and --tasks must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    run_demo(size, args.workers, args.tasks)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
