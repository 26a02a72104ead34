"""Counts and lists from the module results: the text the runner prints and its JSON."""

from __future__ import annotations

import json
import platform
import re
from collections import defaultdict
from typing import Any

from conformance import deviations as dev
from conformance.suites import START_METHODS, SUITE_TITLES
from conformance.supervise import ModuleResult, TestOutcome

__all__ = ["key_line", "load_json", "render_json", "render_text", "where"]

# Parts of a message that differ between runs: pids and object addresses.
_VARYING = re.compile(r"(?<=pid )\d+|0x[0-9a-f]+")
COLUMNS = ("run", "passed", "skipped", "deviations", "failed", "hangs", "stale")
# A frame in a traceback ('  File "f", line 3, in g') or a faulthandler dump ('in g').
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+),? in (?P<func>.+)$')
_DUMP_MAIN = "Current thread "


def _short(path: str) -> str:
    """A path from the test package, forkref's source or the stdlib, without its prefix."""
    return re.sub(r"^.*?(/test/|/src/|/lib/python3\.\d+/)", "", path)


def _frames(lines: list[str]) -> list[tuple[str, str, str, str]]:
    """(file, line, function, source) of each frame, in the order written."""
    frames = []
    for i, text in enumerate(lines):
        match = _FRAME.match(text)
        if match:
            source = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if _FRAME.match(source) or not text.startswith("  File"):
                source = ""  # a faulthandler dump has no source lines
            frames.append((match["file"], match["line"], match["func"], source))
    return frames


def _main_thread_stack(detail: str) -> list[tuple[str, str, str, str]] | None:
    """The main thread's frames of a faulthandler dump, innermost first; None if no dump."""
    lines = detail.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(_DUMP_MAIN)]
    if not starts:
        return None
    block = []
    for line in lines[starts[-1] + 1 :]:
        if not line.strip():
            break
        block.append(line)
    return _frames(block)


def _in_tests(frame: tuple[str, str, str, str]) -> bool:
    return "/test/" in frame[0] and "/support/" not in frame[0] and "/unittest/" not in frame[0]


def key_line(detail: str) -> str:
    """The exception line of the last traceback in ``detail``; for a hang, where it waits."""
    stack = _main_thread_stack(detail)
    if stack:  # where the main thread waits, above the threading module's own frames
        inner = [f for f in stack if not f[0].endswith("/threading.py")] or stack
        file, line, func, _ = inner[0]
        return f"{detail.splitlines()[0]}; main thread in {func} ({_short(file)}:{line})"
    lines = detail.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if not starts:
        return next((line.strip() for line in lines if line.strip()), "")
    for line in lines[starts[-1] + 1 :]:
        if line and not line.startswith(" "):
            return line.strip()
    return lines[-1].strip()


def where(detail: str) -> str:
    """``file:line: source`` of the innermost frame inside CPython's test package."""
    stack = _main_thread_stack(detail)
    if stack is None:
        stack = list(reversed(_frames(detail.splitlines())))
    for file, line, func, source in stack:
        if _in_tests((file, line, func, source)):
            return f"{_short(file)}:{line} in {func}" + (f": {source}" if source else "")
    return ""


def _verdicts(results: list[ModuleResult], deviations: list[dev.Deviation]
              ) -> list[tuple[ModuleResult, TestOutcome, str, dev.Deviation | None]]:
    out = []
    for result in results:
        for outcome in result.outcomes:
            verdict, entry = dev.judge(outcome.outcome, outcome.neutral, result.method, deviations)
            out.append((result, outcome, verdict, entry))
    return out


def _counts(verdicts: list[tuple[ModuleResult, TestOutcome, str, dev.Deviation | None]]
            ) -> dict[str, dict[str, dict[str, int]]]:
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(dict)
    for result, _, verdict, entry in verdicts:
        row = counts[result.suite].setdefault(result.method, dict.fromkeys(COLUMNS, 0))
        row["run"] += 1
        column = {dev.PASSED: "passed", dev.SKIPPED: "skipped", dev.DEVIATION: "deviations",
                  dev.FAILED: "failed", dev.HANG: "hangs"}[verdict]
        row[column] += 1
        if verdict == dev.PASSED and entry is not None:
            row["stale"] += 1
    return counts


def _table(counts: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    lines = [f"{'suite':<6}{'method':<12}" + "".join(f"{c:>11}" for c in COLUMNS)]
    total = dict.fromkeys(COLUMNS, 0)
    for suite in sorted(counts):
        for method in START_METHODS:
            row = counts[suite].get(method)
            if row is None:
                continue
            lines.append(f"{suite:<6}{method:<12}" + "".join(f"{row[c]:>11}" for c in COLUMNS))
            for c in COLUMNS:
                total[c] += row[c]
    lines.append(f"{'total':<18}" + "".join(f"{total[c]:>11}" for c in COLUMNS))
    return lines


def _placeholder(match: re.Match[str]) -> str:
    return "0x..." if match[0].startswith("0x") else "N"


def _grouped(items: list[tuple[ModuleResult, TestOutcome, str, dev.Deviation | None]],
             details: bool) -> list[str]:
    """One entry per test and distinct message, naming the suites/methods it happened under."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    texts: dict[tuple[str, str, str], str] = {}
    for result, outcome, _, _ in items:
        message = _VARYING.sub(_placeholder, key_line(outcome.detail))
        key = (outcome.neutral, outcome.outcome, message)
        groups[key].append(f"{result.suite}/{result.method}")
        texts.setdefault(key, outcome.detail)
    lines = []
    for key in sorted(groups):
        neutral, kind, message = key
        lines.append(f"  {neutral}  [{kind}; {', '.join(groups[key])}]")
        lines.append(f"      {message if len(message) <= 400 else message[:400] + ' ...'}")
        location = where(texts[key])
        if location:
            lines.append(f"      at {location}")
        if details:
            lines.extend("        " + line for line in texts[key].splitlines())
    return lines


def render_text(results: list[ModuleResult], deviations: list[dev.Deviation], target: str,
                wall: float, *, strict: bool, details: bool) -> tuple[str, int]:
    """The printed report and the exit status it implies."""
    verdicts = _verdicts(results, deviations)
    counts = _counts(verdicts)
    lines = ["", f"conformance: CPython {platform.python_version()} tests on {target}'s pools, "
             f"{wall:.0f} s"]
    for suite in sorted(counts):
        lines.append(f"  {suite}: {SUITE_TITLES[suite]}")
    lines += _table(counts)
    failed = [v for v in verdicts if v[2] == dev.FAILED]
    hangs = [v for v in verdicts if v[2] == dev.HANG]
    stale = [v for v in verdicts if v[2] == dev.PASSED and v[3] is not None]
    for title, items in (("Unexpected failures", failed), ("Hangs", hangs),
                         ("Stale deviations (listed in deviations.toml, yet passed)", stale)):
        if items:
            lines += ["", f"{title}: {len(items)}", *_grouped(items, details)]
    left = [(r, p) for r in results for p in r.left_processes]
    segments = [(r, s) for r in results for s in r.left_segments]
    if left or segments:
        lines += ["", "Left behind (removed by the runner):"]
        lines += [f"  {r.suite}/{r.method} {r.module}: process {p}" for r, p in left]
        lines += [f"  {r.suite}/{r.method} {r.module}: segment {s}" for r, s in segments]
    status = 1 if failed or hangs or (strict and stale) else 0
    return "\n".join(lines), status


def render_json(results: list[ModuleResult], deviations: list[dev.Deviation], target: str,
                wall: float) -> dict[str, Any]:
    """The same as :func:`render_text`, as data (one record per test)."""
    verdicts = _verdicts(results, deviations)
    return {
        "python": platform.python_version(),
        "target": target,
        "wall_seconds": wall,
        "counts": _counts(verdicts),
        "modules": [{"suite": r.suite, "method": r.method, "module": r.module,
                     "seconds": r.seconds, "attempts": r.attempts,
                     "left_processes": r.left_processes, "left_segments": r.left_segments}
                    for r in results],
        "tests": [{"suite": r.suite, "method": r.method, "module": r.module,
                   "id": o.id, "neutral": o.neutral,
                   "outcome": o.outcome, "verdict": verdict,
                   "stale": verdict == dev.PASSED and entry is not None,
                   "deviation": entry.reason if entry else None, "seconds": o.seconds,
                   "message": key_line(o.detail) if o.detail else "",
                   "where": where(o.detail), "detail": o.detail}
                  for r, o, verdict, entry in verdicts],
    }


def load_json(path: str) -> tuple[list[ModuleResult], str, float]:
    """The module results, target and wall time of a run that :func:`render_json` wrote."""
    with open(path) as f:
        data = json.load(f)
    results = {}
    for m in data["modules"]:
        result = ModuleResult(m["suite"], m["method"], m["module"], attempts=m["attempts"],
                              seconds=m["seconds"], left_processes=m["left_processes"],
                              left_segments=m["left_segments"])
        results[m["suite"], m["method"], m["module"]] = result
    for t in data["tests"]:
        result = results[t["suite"], t["method"], t["module"]]
        result.outcomes.append(TestOutcome(t["id"], t["neutral"], t["outcome"], t["detail"],
                                           t["seconds"]))
    return list(results.values()), data["target"], data["wall_seconds"]
