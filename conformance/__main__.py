"""``python -m conformance``: CPython's own pool tests against forkref's pools.

Runs Python 3.13's ``test.test_concurrent_futures`` process-pool tests
against ``forkref.ProcessPoolExecutor`` (suite ``cf``) and the pool tests of
``test._test_multiprocessing`` against ``forkref.Pool`` (suite ``mp``), under
fork, forkserver and spawn; see :mod:`conformance.suites` for the selection,
:mod:`conformance.substitute` for how forkref takes the stdlib's place and
:mod:`conformance.supervise` for how hangs and leftovers are dealt with.

Prints, per suite and start method: tests run, passed, skipped, deviations
(failing as ``conformance/deviations.toml`` says they deliberately do),
unexpected failures, hangs, and stale deviations (listed, yet passing). Exit
status: 0 when nothing failed unexpectedly and nothing hung (with
``--strict``, also no stale deviation); 1 otherwise; 2 on a usage error.

``--target stdlib`` runs the same tests on the stdlib's pools: a check of the
runner itself, where everything should pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

from conformance import deviations as dev
from conformance import suites, supervise
from conformance.child import ONLY_ENV
from conformance.report import load_json, render_json, render_text

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEVIATIONS = os.path.join(HERE, "deviations.toml")
# Rough relative cost of a module, longest first, so that parallel runs end together.
_WEIGHT = {"test_deadlock": 5, "test_processes": 5, "test_shutdown": 4, "test_process_pool": 4,
           "test_misc": 2, "test_init": 2, "test_wait": 2, "test_as_completed": 1}
_METHOD_WEIGHT = {"spawn": 3, "forkserver": 2, "fork": 1}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m conformance", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", choices=sorted(suites.SUITES),
                   help="cf (concurrent.futures) or mp (multiprocessing Pool); default both")
    p.add_argument("--method", action="append", choices=suites.START_METHODS,
                   help="start method; repeat for several; default all three")
    p.add_argument("--module", action="append", metavar="NAME",
                   help="only this test module (e.g. test_deadlock); repeatable")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="only tests whose id or neutral id matches this fnmatch pattern")
    p.add_argument("--target", choices=("forkref", "stdlib"), default="forkref",
                   help="stdlib: run on the stdlib's pools (checks the runner)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds without progress before a test counts as a hang (default 60)")
    p.add_argument("--jobs", type=int, default=1,
                   help="test modules run at once (default 1)")
    p.add_argument("--deviations", default=DEFAULT_DEVIATIONS, help="the deviations file")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--strict", action="store_true",
                   help="also fail on stale deviations (listed, yet passing)")
    p.add_argument("--details", action="store_true",
                   help="print each failure's whole traceback, not only its key lines")
    p.add_argument("--keep", metavar="DIR",
                   help="keep the test processes' logs and event files in DIR")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: judge the results --json wrote to FILE against the "
                        "deviations again and report")
    return p


def _jobs(args: argparse.Namespace) -> Iterator[supervise.Job]:
    for suite in args.suite or sorted(suites.SUITES):
        for method in args.method or suites.START_METHODS:
            for module in suites.modules(suite, method):
                if not args.module or module.rsplit(".", 1)[-1] in args.module:
                    yield supervise.Job(suite, method, module)


def _ordered(jobs: list[supervise.Job]) -> list[supervise.Job]:
    def cost(job: supervise.Job) -> int:
        return _WEIGHT.get(job.module.rsplit(".", 1)[-1], 1) * _METHOD_WEIGHT[job.method]

    return sorted(jobs, key=cost, reverse=True)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _run(jobs: list[supervise.Job], settings: supervise.Settings,
         parallel: int) -> list[supervise.ModuleResult]:
    results: list[supervise.ModuleResult] = []
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = [pool.submit(supervise.run_module, job, settings) for job in _ordered(jobs)]
        try:
            for future in futures:
                result = future.result()
                results.append(result)
                print(f"  {result.suite} {result.method:<10} {result.module.rsplit('.', 1)[-1]:<20}"
                      f" {len(result.outcomes):3d} tests  {result.seconds:6.1f} s", flush=True)
        except KeyboardInterrupt:
            supervise.STOP.set()  # every attempt tears its processes down and returns
            pool.shutdown(cancel_futures=True)
            raise
    return results


def _skip_reason() -> str | None:
    reason = supervise.check_platform()
    if reason is None:
        try:
            import test.support  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            reason = (f"this Python ({sys.executable}) was installed without its test "
                      "package (Lib/test); install one that has it (pyenv builds do)")
    return reason


def main(argv: list[str] | None = None) -> int:
    """Run the selected tests and report; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        deviations = dev.load(args.deviations)
    except (OSError, ValueError) as err:
        print(f"conformance: cannot read the deviations: {err}", file=sys.stderr)
        return 2
    if args.from_json:
        results, target, wall = load_json(args.from_json)
        return _report(args, results, deviations, target, wall)
    reason = _skip_reason()
    if reason is not None:
        print(f"conformance: SKIPPED: {reason}")
        return 0
    if sys.version_info[:2] != (3, 13):
        print(f"conformance: warning: the deviations are written for Python 3.13's tests; "
              f"this is {sys.version.split()[0]}", file=sys.stderr)
    if args.only:
        os.environ[ONLY_ENV] = ",".join(args.only)
    signal.signal(signal.SIGTERM, _on_signal)
    supervise.become_subreaper()
    scratch = args.keep or tempfile.mkdtemp(prefix="forkref-conformance-")
    os.makedirs(scratch, exist_ok=True)
    shm_root = tempfile.mkdtemp(prefix="forkref-conformance-",
                                dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    settings = supervise.Settings(sys.executable, args.target, args.timeout, scratch, shm_root)
    jobs = list(_jobs(args))
    print(f"conformance: {len(jobs)} test modules on {args.target}'s pools, "
          f"Python {sys.version.split()[0]}, {args.jobs} at a time", flush=True)
    started = time.monotonic()
    try:
        results = _run(jobs, settings, args.jobs)
    except KeyboardInterrupt:
        print("conformance: interrupted; test processes torn down", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(shm_root, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    wall = round(time.monotonic() - started, 1)
    return _report(args, results, deviations, args.target, wall)


def _report(args: argparse.Namespace, results: list[supervise.ModuleResult],
            deviations: list[dev.Deviation], target: str, wall: float) -> int:
    if target == "stdlib":
        deviations = []  # the stdlib deviates from nothing: every test must pass
    text, status = render_text(results, deviations, target, wall,
                               strict=args.strict, details=args.details)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(render_json(results, deviations, target, wall), f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
