"""The test process: runs one CPython test module's selected tests, one event per line.

Started by the runner as ``python -m conformance.child SUITE METHOD MODULE EVENTS [IDS]``
in a process group of its own, with ``FORKREF_CONFORMANCE=<suite>:<target>``
in the environment. Reading that variable at import is what makes the
substitution reach the processes multiprocessing starts with spawn and
forkserver too: they import this module again as ``__mp_main__``.

Events, JSON lines appended to EVENTS with one ``write`` each (so a worker
that inherits the descriptor cannot interleave half a line):

    {"event": "collected", "tests": [[test_id, neutral_id], ...]}
    {"event": "start", "id": test_id}
    {"event": "end", "id": test_id, "outcome": "pass|fail|error|skip", "detail": text,
     "seconds": float}
    {"event": "done"}

A test that never ends is the runner's business: it sends SIGUSR2 (every
thread's stack goes to stderr, see ``faulthandler``), kills the group and
starts a new test process for the tests left.
"""

from __future__ import annotations

import faulthandler
import fnmatch
import gc
import json
import os
import signal
import sys
import time
import traceback
import unittest
from types import TracebackType
from typing import Any

from conformance import suites
from conformance.substitute import install, wrap_script_helper

ENV = "FORKREF_CONFORMANCE"
ONLY_ENV = "FORKREF_CONFORMANCE_ONLY"  # fnmatch patterns of test or neutral ids, comma-separated
DUMP_SIGNAL = signal.SIGUSR2

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]


def _format(err: _ExcInfo) -> str:
    return "".join(traceback.format_exception(*err))


class _Events:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def emit(self, **event: Any) -> None:
        os.write(self._fd, (json.dumps(event) + "\n").encode())


class _Result(unittest.TestResult):
    """Streams one start and one end event per test; a failed subtest fails its test."""

    def __init__(self, events: _Events) -> None:
        super().__init__()
        self._events = events
        self._outcome = ("pass", "")
        self._started = 0.0
        self.started: set[str] = set()
        self.fixture_errors: list[str] = []

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        self._outcome = ("pass", "")
        self._started = time.monotonic()
        self.started.add(test.id())
        self._events.emit(event="start", id=test.id())

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        outcome, detail = self._outcome
        if outcome in ("fail", "error"):
            # The failure's traceback keeps the test's locals, often a pool, alive in a
            # reference cycle: collect it now, or its workers (which hold multiprocessing's
            # resource tracker open) make the module's teardown wait for ever.
            gc.collect()
        seconds = round(time.monotonic() - self._started, 3)
        self._events.emit(event="end", id=test.id(), outcome=outcome, detail=detail,
                          seconds=seconds)

    def _set(self, outcome: str, detail: str) -> None:
        if self._outcome[0] in ("pass", "skip"):  # the first failure is the one to report
            self._outcome = (outcome, detail)

    def addError(self, test: unittest.TestCase, err: _ExcInfo) -> None:
        super().addError(test, err)
        text = _format(err)
        if not isinstance(test, unittest.TestCase):  # setUpClass, tearDownModule, ...
            self.fixture_errors.append(f"{test}: {text}")
            self._events.emit(event="fixture_error", id=str(test), detail=text)
            return
        self._set("error", text)

    def addFailure(self, test: unittest.TestCase, err: _ExcInfo) -> None:
        super().addFailure(test, err)
        self._set("fail", _format(err))

    def addSubTest(self, test: unittest.TestCase, subtest: unittest.TestCase,
                   err: _ExcInfo | None) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException) if err[0] else False
            self._set("fail" if failed else "error", _format(err))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._set("skip", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: _ExcInfo) -> None:
        super().addExpectedFailure(test, err)

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._set("fail", "unexpected success of a test marked expectedFailure")


def _selected_tests(suite: str, method: str, module: str, ids_file: str | None) -> list[Any]:
    tests = suites.collect(suite, method, module)
    patterns = [p for p in os.environ.get(ONLY_ENV, "").split(",") if p]
    if patterns:
        tests = [t for t in tests if any(fnmatch.fnmatchcase(t.id(), p)
                                         or fnmatch.fnmatchcase(suites.neutral_id(t), p)
                                         for p in patterns)]
    if ids_file is not None:
        with open(ids_file) as f:
            wanted = set(f.read().split())
        tests = [t for t in tests if t.id() in wanted]
    return tests


def main(argv: list[str]) -> int:
    suite, method, module, events_path = argv[:4]
    ids_file = argv[4] if len(argv) > 4 else None
    target = os.environ.get(ENV, ":forkref").split(":")[1]
    events = _Events(events_path)
    faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True)
    wrap_script_helper(suite, target)
    try:
        tests = _selected_tests(suite, method, module, ids_file)
    except unittest.SkipTest as skip:  # the package refuses this platform
        events.emit(event="collected", tests=[], skipped=str(skip))
        events.emit(event="done")
        return 0
    ids = [t.id() for t in tests]
    events.emit(event="collected", tests=[[t.id(), suites.neutral_id(t)] for t in tests])
    result = _Result(events)
    suite_to_run = unittest.TestSuite(tests)
    del tests  # the suite drops each test once run, as unittest's runner does
    suite_to_run.run(result)
    # A failed setUpClass or setUpModule leaves its tests unstarted: they fail with it.
    for test_id in ids:
        if test_id not in result.started:
            cause = "\n".join(result.fixture_errors) or "the test was not started"
            events.emit(event="end", id=test_id, outcome="error",
                        detail=f"not run: {cause}", seconds=0.0)
    events.emit(event="done")
    return 0


_suite, _, _target = os.environ.get(ENV, "").partition(":")
if _suite:
    install(_suite, _target or "forkref")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
