"""The deliberate deviations (``deviations.toml``) and how an outcome is judged against them.

An entry names a test by its neutral id (see :mod:`conformance.suites`) or an
``fnmatch`` pattern of neutral ids, optionally the start methods it is limited
to, and the reason. A listed test that fails or errors is a *deviation*; one
that passes is *stale* (reported, so that the list stays short and true). A
hang or a crash of the test process is never excused: no test may hang.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass

__all__ = ["Deviation", "judge", "load"]

# Verdicts, in report order.
PASSED, SKIPPED, DEVIATION, FAILED, HANG = "passed", "skipped", "deviation", "failed", "hang"
FAILING = ("fail", "error")


@dataclass(frozen=True)
class Deviation:
    """One deliberate difference from the stdlib."""

    test: str
    methods: tuple[str, ...]
    reason: str

    def covers(self, neutral: str, method: str) -> bool:
        """Whether this entry is about ``neutral`` run under ``method``."""
        if self.methods and method not in self.methods:
            return False
        return neutral == self.test or fnmatch.fnmatchcase(neutral, self.test)


def load(path: str) -> list[Deviation]:
    """Read ``path``; raise ValueError naming the entry that is malformed."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = []
    for number, item in enumerate(data.get("deviation", []), 1):
        if not isinstance(item.get("test"), str) or not isinstance(item.get("reason"), str):
            raise ValueError(f"{path}: deviation #{number} needs a 'test' and a 'reason' string")
        methods = item.get("methods", [])
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise ValueError(f"{path}: deviation #{number} ('{item['test']}'): "
                             "'methods' must be a list of start method names")
        entries.append(Deviation(item["test"], tuple(methods), item["reason"].strip()))
    return entries


def judge(outcome: str, neutral: str, method: str,
          deviations: list[Deviation]) -> tuple[str, Deviation | None]:
    """The verdict on one outcome and the deviation entry that applies, if any.

    ``outcome`` is the test process's (pass, fail, error, skip) or the
    runner's (hang, crash). A crash counts as a failure that no entry excuses.
    """
    entry = next((d for d in deviations if d.covers(neutral, method)), None)
    if outcome == "hang":
        return HANG, entry
    if outcome == "skip":
        return SKIPPED, entry
    if outcome == "pass":
        return PASSED, entry
    if outcome in FAILING and entry is not None:
        return DEVIATION, entry
    return FAILED, entry
