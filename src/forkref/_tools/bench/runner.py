"""Run every (workload, method) pair, each in a fresh process, and check every answer.

::

    parent (forkref bench)                      one run's process (os.fork of the parent)
    build the workload's data, serial answer
    fork ─────────────────────────────────────► own process group; Run(data, ...)
      poll the pipe every 0.25 s:                  clock on; method(run): pools, tasks ...
        read the run's descendants' USS/PSS  ◄──── "checkpoint": workers hold the data now
        (MemorySampler, sampled by hand)   ────►   go on
        kill the process group on --timeout        clock off; check against the serial answer
      ◄─────────────────────────────────────────── seconds, problem, worker pids; exit

Why a fork per run: memory figures of one method never include another's
pools, caches or leaked workers (joblib's loky keeps workers between calls),
and the run's process holds the data the way a user's program would (built
before the pool), so the global-variable trick and fork inheritance work as
they do for the user.

The parent never runs a thread: it forks once per run, and a thread (tqdm's
monitor, a sampler) could hold a lock at that moment. Memory is sampled from
the parent, not inside the run, so the measured process runs no extra thread
either.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import psutil

from forkref._errors import ForkWarning, MemoryReportError
from forkref._memory.report import MemorySampler
from forkref._tools.bench.registry import METHODS, WORKLOADS, Config, Method, Run, Workload

__all__ = ["Outcome", "WorkerMemory", "run_all"]

#: How often the parent reads the run's processes' memory while it waits.
SAMPLE_EVERY = 0.25
# Helpers that outlive a pool on purpose and end with the run's process.
_HELPERS = ("resource_tracker", "forkserver", "semaphore_tracker", "forkref-janitor")


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's peak memory during a run, in bytes (None: never sampled alive)."""

    pid: int
    peak_uss: int | None
    peak_pss: int | None


@dataclass(frozen=True)
class Outcome:
    """One method on one workload.

    Attributes:
        workload, method, label: what ran.
        status: ``ok`` (answer verified), ``WRONG`` (it differs from the
            serial computation), ``skipped`` (it cannot run here: a package
            is missing), ``n/a`` (it does not apply to this workload),
            ``timeout`` or ``error``.
        reason: why it was skipped or does not apply, what differed, or the error.
        seconds: the best measured time of its rounds.
        seconds_full: ``seconds`` with its map part scaled to the workload's
            full task count (a method pickling per task runs fewer tasks; its
            pool start is counted once).
        tasks_run, tasks: tasks run, and tasks of a full run.
        ratio: ``seconds_full`` over forkref's (the ``forkref`` method).
        workers: each worker's peak memory (empty where memory means nothing).
    """

    workload: str
    method: str
    label: str
    status: str
    reason: str | None = None
    seconds: float | None = None
    seconds_full: float | None = None
    tasks_run: int = 0
    tasks: int = 0
    ratio: float | None = None
    workers: tuple[WorkerMemory, ...] = field(default_factory=tuple)

    @property
    def verified(self) -> bool:
        """Whether the answer was checked and found equal to the serial computation."""
        return self.status == "ok"


Tick = Callable[[str], None]


def run_all(
    cfg: Config, tick: Tick, done: Callable[[Outcome], None], stderr_to: int | None = None
) -> list[Outcome]:
    """Every selected method on every selected workload, in order.

    ``tick(text)`` is called while waiting (to redraw a progress display),
    ``done(outcome)`` after each pair. ``stderr_to``: a file descriptor that
    each run's process (and every process it starts: pools, joblib's
    resource tracker) writes its stderr to, so the contenders' warnings do
    not land in the middle of the progress display.
    """
    outcomes: list[Outcome] = []
    for name in cfg.workloads:
        workload = WORKLOADS[name]
        methods = [METHODS[m] for m in cfg.methods]
        reasons = {m.name: m.skip_reason(name) for m in methods}
        data = expected = None
        if any(r is None for r in reasons.values()):
            data = workload.build(cfg)
            expected = workload.serial(data, cfg)
        for m in methods:
            skip = reasons[m.name]
            if skip is None:
                tasks = tasks_to_run(workload, m, cfg)
                job = _Job(workload, m, cfg, data, expected, tasks, stderr_to)
                outcome = _measure(job, tick)
            else:
                status = "skipped" if m.applies(name) else "n/a"
                outcome = Outcome(name, m.name, m.label_for(name), status, skip)
            outcomes.append(outcome)
            done(outcome)
        del data, expected
    return _with_ratios(outcomes)


def tasks_to_run(workload: Workload, m: Method, cfg: Config) -> int:
    """Fewer tasks for a method that pickles the data for every task, where that scales."""
    full = workload.tasks(cfg)
    if m.per_task and workload.scalable:
        return max(1, min(full, cfg.pickled_tasks))
    return full


@dataclass(frozen=True)
class _Job:
    """One method on one workload, with what the run's process inherits."""

    workload: Workload
    method: Method
    cfg: Config
    data: Any
    expected: Any
    tasks: int
    stderr_to: int | None = None


def _measure(job: _Job, tick: Tick) -> Outcome:
    workload, m, cfg = job.workload, job.method, job.cfg
    label = m.label_for(workload.name)
    full = workload.tasks(cfg)
    base = Outcome(workload.name, m.name, label, "ok", tasks_run=job.tasks, tasks=full)
    best: Outcome | None = None
    # A method pickling per task runs once: its time is seconds, not milliseconds, and
    # repeating it would only lengthen the run (as benchmarks/bench_core.py does).
    rounds = 1 if job.tasks < base.tasks else cfg.rounds
    for r in range(rounds):
        text = f"{workload.name}: {label}" + (f" (round {r + 1})" if rounds > 1 else "")
        outcome = _outcome(base, _one_round(job, functools.partial(tick, text)), workload.memory)
        if outcome.status != "ok":
            return outcome
        if best is None or (outcome.seconds or 0.0) < (best.seconds or 0.0):
            best = outcome
    assert best is not None
    return best


def _one_round(job: _Job, tick: Callable[[], None]) -> dict[str, Any]:
    parent_end, child_end = Pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the run's process; reports through the pipe
        parent_end.close()
        _child(child_end, job)
    child_end.close()
    try:
        return _watch(pid, parent_end, job.cfg.timeout, tick)
    finally:
        parent_end.close()


# -- the run's process ---------------------------------------------------------------


def _child(conn: Connection, job: _Job) -> None:  # pragma: no cover - in the forked process
    code = 0
    try:
        os.setpgid(0, 0)  # the parent kills the whole group on a timeout
        if job.stderr_to is not None:
            os.dup2(job.stderr_to, 2)
            # Python-level writers too, whatever sys.stderr was (a capture, a notebook stream).
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        warnings.simplefilter("ignore", ForkWarning)  # numpy/BLAS threads are expected here

        def checkpoint() -> None:
            conn.send(("checkpoint", None))
            conn.recv()

        run = Run(job.data, job.cfg, job.tasks, checkpoint)
        run.restart_clock()
        answer = job.method.impls[job.workload.name](run)
        seconds = run.elapsed()
        problem, pids = job.workload.check(job.data, job.expected, answer, job.cfg, job.tasks)
        del answer
        _end_children()
        report = {"seconds": seconds, "scaled": run.scaled, "problem": problem}
        conn.send(("done", {**report, "pids": sorted(pids)}))
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):
            conn.send(("error", _error_text(exc)))
    finally:
        os._exit(code)


def _error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _end_children() -> None:  # pragma: no cover - runs in the forked process
    """Wait briefly for the run's pools' processes, then kill what is left."""
    procs = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if not any(h in " ".join(proc.cmdline()) for h in _HELPERS):
                procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


# -- the parent ----------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _sample(sampler: MemorySampler) -> None:
    with contextlib.suppress(MemoryReportError):  # a process exiting as it is read
        sampler.sample()


def _watch(pid: int, conn: Connection, timeout: float, tick: Callable[[], None]) -> dict[str, Any]:
    """Wait for the run's report, sampling memory and enforcing the timeout."""
    # Never started: sampled from this thread only (no thread in a process that forks).
    sampler = MemorySampler(lambda: _descendants(pid))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if conn.poll(SAMPLE_EVERY):
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    return {"kind": "error", "text": f"the run's process died: {_reap(pid)}"}
                if kind == "checkpoint":
                    _sample(sampler)
                    conn.send(None)
                    continue
                _reap(pid)
                return {"kind": kind, "payload": payload, "peaks": sampler.peaks()}
            if time.monotonic() > deadline:
                _kill_tree(pid)
                return {"kind": "timeout", "text": f"killed after {timeout:g} s (--timeout)"}
            _sample(sampler)
            tick()
    except BaseException:
        _kill_tree(pid)  # Ctrl-C or an error here: leave no process behind
        raise


def _reap(pid: int) -> str:
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _kill_tree(pid: int) -> None:
    procs = []
    with contextlib.suppress(psutil.Error):
        procs = psutil.Process(pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for proc in procs:  # some (Ray's daemons) leave the process group
        with contextlib.suppress(psutil.Error):
            proc.kill()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    psutil.wait_procs(procs, timeout=5)


def _outcome(base: Outcome, report: dict[str, Any], memory: bool) -> Outcome:
    kind = report["kind"]
    if kind in ("error", "timeout"):
        status = "error" if kind == "error" else "timeout"
        text = report.get("text") or report.get("payload")
        return replace(base, status=status, reason=str(text))
    payload = report["payload"]
    seconds = float(payload["seconds"])
    factor = base.tasks / max(1, base.tasks_run)
    scaled = payload["scaled"] if payload["scaled"] is not None else seconds
    workers = _workers(report["peaks"], payload["pids"]) if memory else ()
    problem = payload["problem"]
    return replace(
        base,
        status="WRONG" if problem else "ok",
        reason=problem,
        seconds=seconds,
        seconds_full=seconds + scaled * (factor - 1.0),
        workers=workers,
    )


def _workers(peaks: Any, pids: list[int]) -> tuple[WorkerMemory, ...]:
    found = {p.pid: p for p in peaks.processes}
    return tuple(
        WorkerMemory(pid, found[pid].uss, found[pid].pss)
        if pid in found
        else WorkerMemory(pid, None, None)
        for pid in pids
    )


def _with_ratios(outcomes: list[Outcome]) -> list[Outcome]:
    reference = {
        o.workload: o.seconds_full
        for o in outcomes
        if o.method == "forkref" and o.status == "ok" and o.seconds_full
    }
    return [
        replace(o, ratio=o.seconds_full / reference[o.workload])
        if o.seconds_full is not None and o.workload in reference
        else o
        for o in outcomes
    ]
