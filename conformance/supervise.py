"""Run one test module in test processes that can neither hang the run nor leak.

    runner ── Popen (own session; token in env) ──▶ test process (conformance.child)
      ▲                                                │ starts workers, zygotes, a fork
      │ events file: JSON lines, polled every 0.2 s    │ server, janitors, multiprocessing's
      └────────────────────────────────────────────────┘ resource tracker

* The runner makes itself a child subreaper (Linux ``prctl``): whatever the test
  process starts, even a process that calls ``setsid()`` as forkref's janitor
  does, is reparented to the runner when its parent dies, so it can still be
  found. It is found by the attempt's token, which every descendant inherits
  in its environment; nothing else on the machine is looked at or touched.
* A hang is a test with no event for ``timeout`` seconds. The test process gets
  SIGUSR2 (``faulthandler`` writes every thread's stack to its log, which
  becomes the hang's detail), its tree is torn down, the test is recorded as
  ``hang`` and a new test process runs the tests left. A test process that
  dies mid-test records that test as ``crash`` the same way.
* Teardown (after every attempt, normal or not) kills every process with the
  token except the cleaners: multiprocessing's resource tracker and forkref's
  janitor exit by themselves once no writer is left, unlinking the semaphores
  and segments the dead left behind; they get a grace period, then SIGKILL.
  Processes still alive after a test process exited normally are recorded.
* Each module gets its own ``FORKREF_SHM_DIR`` and ``TMPDIR``; what is left in
  them afterwards is recorded, then removed.

Non-goal: portability. This needs Linux (``/proc``, ``prctl``) and psutil.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

from conformance.child import DUMP_SIGNAL, ENV

__all__ = [
    "STOP",
    "Job",
    "ModuleResult",
    "Settings",
    "TestOutcome",
    "become_subreaper",
    "check_platform",
    "run_module",
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_ENV = "FORKREF_CONFORMANCE_TOKEN"
PR_SET_CHILD_SUBREAPER = 36
CLEANER_MARKS = ("resource_tracker", "forkref-janitor")
CLEANER_GRACE = 5.0
EXIT_GRACE = 2.0
DUMP_WAIT = 2.0
POLL = 0.2
LOG_TAIL = 6000

# Set by the runner on SIGINT/SIGTERM: every attempt tears down and returns.
STOP = threading.Event()
# Pids of live test processes (Popen children): a sweep for orphans must not reap them.
_leaders: set[int] = set()
_leaders_lock = threading.Lock()


@dataclass(frozen=True)
class Job:
    """One test module under one start method."""

    suite: str
    method: str
    module: str

    @property
    def name(self) -> str:
        """``<suite>-<method>-<module's last part>``: a stem for file names."""
        return f"{self.suite}-{self.method}-{self.module.rsplit('.', 1)[-1]}"


@dataclass(frozen=True)
class Settings:
    """How to run test processes."""

    python: str  # the interpreter with forkref installed
    target: str  # "forkref" or "stdlib" (the self-check)
    timeout: float  # seconds without an event before a test is a hang
    scratch: str  # directory for events, logs, ids and TMPDIRs
    shm_root: str  # parent directory of each module's FORKREF_SHM_DIR


@dataclass
class TestOutcome:
    """One test's result: outcome is pass, fail, error, skip, hang or crash."""

    id: str
    neutral: str
    outcome: str
    detail: str
    seconds: float


@dataclass
class ModuleResult:
    """All outcomes of one module under one start method, and what it left behind."""

    suite: str
    method: str
    module: str
    outcomes: list[TestOutcome] = field(default_factory=list)
    attempts: int = 0
    seconds: float = 0.0
    left_processes: list[str] = field(default_factory=list)
    left_segments: list[str] = field(default_factory=list)


def become_subreaper() -> bool:
    """Make orphaned descendants reparent to this process (Linux); True if it worked."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


class _Watch:
    """What one attempt's events said so far."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.collected: list[tuple[str, str]] | None = None
        self.outcomes: dict[str, TestOutcome] = {}
        self.neutral: dict[str, str] = {}
        self.current: str | None = None
        self.current_since = 0.0
        self.current_log_offset = 0
        self.last_ended: str | None = None
        self.finished = False
        self.fixture_errors: list[tuple[str, str]] = []

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "collected":
            self.collected = [(t[0], t[1]) for t in event["tests"]]
            self.neutral.update(self.collected)
        elif kind == "start":
            self.current, self.current_since = event["id"], time.monotonic()
            self.current_log_offset = _size(self.log_path)
        elif kind == "end":
            test_id = event["id"]
            self.outcomes[test_id] = TestOutcome(
                test_id, self.neutral.get(test_id, test_id), event["outcome"],
                event["detail"], event["seconds"],
            )
            self.current, self.last_ended = None, test_id
        elif kind == "fixture_error":
            self.fixture_errors.append((event["id"], event["detail"]))
        elif kind == "done":
            self.finished = True


class _EventReader:
    def __init__(self, path: str) -> None:
        self._path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _log_from(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return text if len(text) <= LOG_TAIL else "...\n" + text[-LOG_TAIL:]


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


# --- process tree ----------------------------------------------------------


def _tagged(token: str) -> list[psutil.Process]:
    """This runner's descendants started by the attempt with ``token``."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TOKEN_ENV) == token:
                found.append(proc)
    return found


def _is_cleaner(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(mark in cmdline for mark in CLEANER_MARKS)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


def _kill(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)  # reaps those reparented to this runner


def _reap_orphan_zombies() -> None:
    """Reap dead orphans reparented to this runner (never a live test process's Popen)."""
    for proc in psutil.Process().children():
        with _leaders_lock:
            if proc.pid in _leaders:
                continue
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)


def _teardown(proc: subprocess.Popen[bytes], token: str, clean_exit: bool) -> list[str]:
    """Kill the attempt's tree, cleaners last; return what outlived a clean exit."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with _leaders_lock:
        _leaders.discard(proc.pid)
    tagged = _tagged(token)
    cleaners = [p for p in tagged if _is_cleaner(p)]
    others = [p for p in tagged if p not in cleaners]
    if clean_exit:  # workers should be gone with their parent; give them a moment
        _, others = psutil.wait_procs(others, timeout=EXIT_GRACE)
    left = [_describe(p) for p in others] if clean_exit else []
    _kill(others)
    _, alive = psutil.wait_procs(cleaners, timeout=CLEANER_GRACE)
    left += [_describe(p) + " (cleaner, still alive after 5 s)" for p in alive]
    _kill(alive)
    _reap_orphan_zombies()
    return left


# --- one attempt -------------------------------------------------------------


@dataclass
class _Attempt:
    watch: _Watch
    failure: str | None  # None, "hang" or "crash": how the test process ended early
    detail: str
    left_processes: list[str]


def _environment(job: Job, settings: Settings, token: str, shm_dir: str,
                 tmp: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        ENV: f"{job.suite}:{settings.target}",
        TOKEN_ENV: token,
        "FORKREF_SHM_DIR": shm_dir,
        "TMPDIR": tmp,
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _follow(proc: subprocess.Popen[bytes], reader: _EventReader, watch: _Watch,
            timeout: float) -> tuple[str | None, str]:
    """Poll until the test process exits, hangs or dies; return (failure, detail)."""
    last_event = time.monotonic()
    while True:
        events = reader.read()
        for event in events:
            watch.apply(event)
        now = time.monotonic()
        if events:
            last_event = now
        returncode = proc.poll()
        if returncode is not None:
            for event in reader.read():
                watch.apply(event)
            if watch.finished and returncode == 0:
                return None, ""
            where = "after its last test" if watch.finished else "during a test"
            return "crash", f"the test process ended {where}: {_exit_text(returncode)}"
        if now - last_event > timeout:
            return "hang", _dump_stacks(proc, watch.log_path, timeout)
        if STOP.wait(POLL):
            return "crash", "the runner was interrupted"


def _dump_stacks(proc: subprocess.Popen[bytes], log_path: str, timeout: float) -> str:
    offset = _size(log_path)
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, DUMP_SIGNAL)
    time.sleep(DUMP_WAIT)
    stacks = _log_from(log_path, offset)
    return f"no progress for {timeout:.0f} s\nstacks of the test process:\n{stacks}"


def _attempt(job: Job, settings: Settings, number: int, ids: list[str] | None,
             shm_dir: str) -> _Attempt:
    stem = os.path.join(settings.scratch, f"{job.name}-{number}")
    tmp = stem + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    argv = [settings.python, "-m", "conformance.child", job.suite, job.method, job.module,
            stem + ".events"]
    if ids is not None:
        with open(stem + ".ids", "w") as f:
            f.write("\n".join(ids))
        argv.append(stem + ".ids")
    token = uuid.uuid4().hex
    watch = _Watch(stem + ".log")
    with open(watch.log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=tmp, env=_environment(job, settings, token, shm_dir, tmp),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with _leaders_lock:
        _leaders.add(proc.pid)
    failure: str | None = "crash"
    detail = "the runner was interrupted"
    try:
        failure, detail = _follow(proc, _EventReader(stem + ".events"), watch, settings.timeout)
    finally:
        left = _teardown(proc, token, clean_exit=failure is None)
    if failure is not None:
        log_text = _log_from(watch.log_path, watch.current_log_offset)
        if failure == "crash" and log_text.strip():
            detail += f"\noutput of the test process:\n{log_text}"
    return _Attempt(watch, failure, detail, left)


# --- one module --------------------------------------------------------------


def _pseudo(module: str, what: str, failure: str, detail: str) -> TestOutcome:
    name = f"{module.rsplit('.', 1)[-1]} ({what})"
    return TestOutcome(name, name, failure, detail, 0.0)


def _blame(result: ModuleResult, run: _Attempt, order: list[tuple[str, str]],
           done: dict[str, TestOutcome]) -> bool:
    """Record an attempt that ended early; return whether tests are left to run."""
    watch, failure = run.watch, run.failure
    assert failure is not None
    remaining = [test_id for test_id, _ in order if test_id not in done]
    if watch.current is not None:
        blamed: str | None = watch.current
        seconds = time.monotonic() - watch.current_since
    elif watch.finished or (watch.outcomes and watch.last_ended is not None):
        # Between tests: a class or module fixture, or the interpreter's exit.
        last = watch.neutral.get(watch.last_ended or "", watch.last_ended)
        what = "interpreter exit" if watch.finished else f"teardown or setup after {last}"
        result.outcomes.append(_pseudo(result.module, what, failure, run.detail))
        blamed, seconds = None, 0.0
    else:  # no progress at all: the first test left, so that every attempt advances
        blamed, seconds = (remaining[0] if remaining else None), 0.0
        if blamed is None:
            result.outcomes.append(_pseudo(result.module, "import", failure, run.detail))
    if blamed is not None:
        done[blamed] = TestOutcome(blamed, watch.neutral.get(blamed, blamed), failure,
                                   run.detail, round(seconds, 3))
    return any(test_id not in done for test_id, _ in order)


def run_module(job: Job, settings: Settings) -> ModuleResult:
    """Run the selected tests of a module; a hang or a crash costs one test, not the rest."""
    result = ModuleResult(job.suite, job.method, job.module)
    started = time.monotonic()
    shm_dir = tempfile.mkdtemp(prefix=job.name + "-", dir=settings.shm_root)
    order: list[tuple[str, str]] = []
    done: dict[str, TestOutcome] = {}
    ids: list[str] | None = None
    try:
        while True:
            result.attempts += 1
            run = _attempt(job, settings, result.attempts, ids, shm_dir)
            if run.watch.collected is not None and not order:
                order = run.watch.collected
            done.update(run.watch.outcomes)
            result.left_processes += run.left_processes
            for name, detail in run.watch.fixture_errors:
                result.outcomes.append(TestOutcome(name, name, "error", detail, 0.0))
            if run.failure is None or STOP.is_set() or not _blame(result, run, order, done):
                break
            ids = [test_id for test_id, _ in order if test_id not in done]
    finally:
        result.left_segments = sorted(os.listdir(shm_dir))
        shutil.rmtree(shm_dir, ignore_errors=True)
    result.outcomes[:0] = [done[test_id] for test_id, _ in order if test_id in done]
    result.seconds = round(time.monotonic() - started, 1)
    return result


def check_platform() -> str | None:
    """Why this runner cannot work here, or None."""
    if not sys.platform.startswith("linux"):
        return "the conformance runner needs Linux (/proc, prctl)"
    return None
