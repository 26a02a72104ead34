"""``forkref bench`` from parsed options to the table, the JSON and the chart."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from forkref._pools.progress import Progress
from forkref._tools.bench.catalog import load
from forkref._tools.bench.data import parse_size
from forkref._tools.bench.registry import METHODS, WORKLOADS, Config
from forkref._tools.bench.report import BenchReport, MissingDependencyError, need, plot, table
from forkref._tools.bench.runner import Outcome, run_all

__all__ = ["UsageError", "config_from", "run_bench"]


class UsageError(ValueError):
    """An option the bench cannot use; the message says which and why."""


def _names(text: str, known: Mapping[str, Any], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(
            f"--{what}: unknown {what[:-1]} {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)}"
        )
    return names


def _size(text: str, option: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from err
    if size < 64:
        raise UsageError(f"{option}: {text!r} is too small (at least 64 bytes)")
    return size


def config_from(args: argparse.Namespace, defaults: Mapping[str, Any]) -> Config:
    """A :class:`Config` from the parsed options; ``defaults`` fill what was not given."""
    load()

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return defaults[name] if value is None else value

    for option, value in (
        ("--workers", args.workers),
        ("--pickled-tasks", pick("pickled_tasks")),
        ("--rounds", args.rounds),
        ("--items", pick("items")),
        ("--late-iters", pick("late_iters")),
        ("--tiny", pick("tiny")),
    ):
        if value < 1:
            raise UsageError(f"{option} must be at least 1, not {value}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    return Config(
        size=_size(pick("size"), "--size"),
        items=pick("items"),
        late_iters=pick("late_iters"),
        result_size=_size(pick("result_size"), "--result-size"),
        tiny=pick("tiny"),
        workers=args.workers,
        pickled_tasks=pick("pickled_tasks"),
        timeout=args.timeout,
        rounds=args.rounds,
        workloads=_names(args.workloads, WORKLOADS, "workloads"),
        methods=_names(args.methods, METHODS, "methods"),
    )


def _planned(cfg: Config) -> int:
    return sum(1 for w in cfg.workloads for m in cfg.methods if METHODS[m].skip_reason(w) is None)


def _check_outputs(args: argparse.Namespace) -> None:
    """Fail now, not after a long run, when an output's package is missing."""
    if args.json != "-":
        need("rich", "the bench table (or use --json)")
    if args.plot:
        need("matplotlib", "--plot")


def run_bench(args: argparse.Namespace, defaults: Mapping[str, Any], words: list[str]) -> int:
    """Run the bench as the options say; return the exit code."""
    try:
        cfg = config_from(args, defaults)
        _check_outputs(args)
    except (UsageError, MissingDependencyError) as err:
        print(f"forkref bench: {err}", file=sys.stderr)
        return 2
    # A live bar only on a terminal: in a file or a pipe its redraws are noise.
    live = not args.no_progress and sys.stderr.isatty()
    option: bool | dict[str, Any] = (
        {"file": sys.stderr, "leave": False, "unit": "run"} if live else False
    )
    planned = _planned(cfg)
    with _PeersLog() as log, Progress(planned, option, desc="forkref bench") as bar:
        finished = [0]

        def done(outcome: Outcome) -> None:
            if outcome.status in ("skipped", "n/a"):
                return
            bar.update(1)
            finished[0] += 1
            if not live and not args.no_progress:
                print(_plain_line(outcome, finished[0], planned), file=sys.stderr, flush=True)

        outcomes = run_all(cfg, _throttled(bar), done, stderr_to=log.fd)
    report = _report(cfg, outcomes, words)
    _write(report, args)
    if log.summary:
        print(log.summary, file=sys.stderr)
    return report.exit_code


def _plain_line(outcome: Outcome, n: int, planned: int) -> str:
    took = f" in {outcome.seconds:.2f} s" if outcome.seconds is not None else ""
    what = f"{outcome.workload}: {outcome.label}"
    return f"forkref bench: [{n}/{planned}] {what}: {outcome.status}{took}"


class _PeersLog:
    """A file for the benchmarked libraries' stderr, and what to say about it at the end.

    joblib's resource tracker, for one, warns about "leaked" folders when a
    run's process ends; those lines went into the middle of the progress bar.
    Kept only if something was written to it.
    """

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path = ""
        self.summary = ""

    def __enter__(self) -> _PeersLog:
        self.fd, self.path = tempfile.mkstemp(prefix="forkref-bench-", suffix=".log")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        # Read through our own descriptor, not the path: a temp-directory cleaner
        # may have removed the name meanwhile, and the lines are still ours.
        with os.fdopen(self.fd, "rb") as fh:
            fh.seek(0)
            text = fh.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        self.fd = None
        if not lines:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        warned = sum(1 for line in lines if "Warning" in line)
        self.summary = (
            f"forkref bench: the benchmarked libraries wrote {len(lines)} line(s) to stderr "
            f"({warned} warning(s)), kept in {self.path}"
        )


def _throttled(bar: Progress) -> Callable[[str], None]:
    """Redraw on a new run at once, else at most once a second (the elapsed time moves)."""
    shown = {"text": ""}
    drawn = [0.0]

    def tick(text: str) -> None:
        now = time.monotonic()
        if text != shown["text"] or now - drawn[0] >= 1.0:
            shown["text"], drawn[0] = text, now
            bar.note(text)

    return tick


def _report(cfg: Config, outcomes: list[Outcome], words: list[str]) -> BenchReport:
    import forkref
    from forkref._tools.doctor import machine, versions

    found = {"forkref": forkref.__version__, **versions()}
    command = " ".join(["forkref", *words])
    return BenchReport(command, cfg, machine(), found, tuple(outcomes))


def _write(report: BenchReport, args: argparse.Namespace) -> None:
    if args.json:
        text = json.dumps(report.as_dict(), indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as fh:
                fh.write(text + "\n")
    if args.json != "-":
        console = need("rich.console", "the bench table").Console()
        if not console.is_terminal:
            console.width = max(console.width, 120)  # files and pipes: no wrapping at 80
        console.print(table(report))
    if args.plot:
        plot(report, args.plot)
        print(f"chart written to {args.plot}", file=sys.stderr)
