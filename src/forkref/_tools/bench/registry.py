"""The bench's two registries (workloads and methods) and what a method is handed.

A *workload* says what data the parent builds, how many tasks there are, how
the expected answer is computed serially, and how a method's answer is
checked against it. A *method* is one way of getting the data to workers
(the stdlib pool with a pickled argument, the global trick, forkref, joblib,
...): one function per workload it applies to, registered with
:func:`implements`. Adding a contender is one :func:`method` call and one
small function per workload; no table or loop changes.

A method function runs in a fresh process (see :mod:`forkref._tools.bench.runner`)
and receives a :class:`Run`: the data, the configuration, the number of
tasks to run, and two calls: ``untimed()`` for set-up the clock must not
count, and ``checkpoint()`` to have the parent read the workers' memory while
they still hold the data.

The tables are filled by :mod:`.workloads` and :mod:`.methods`, which import
this module; :func:`forkref._tools.bench.catalog.load` imports them. Nothing
here imports either.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "METHODS",
    "WORKLOADS",
    "Config",
    "Method",
    "Run",
    "Workload",
    "implements",
    "method",
]


@dataclass(frozen=True)
class Config:
    """What one ``forkref bench`` invocation measures.

    Attributes:
        size: bytes of the DataFrame (also each frame of the late-object loop).
        items: length of the list of small dicts.
        late_iters: iterations of the late-object loop (a new frame each).
        result_size: bytes of results coming back, all tasks together.
        tiny: number of trivial tasks.
        workers: processes per pool.
        pickled_tasks: tasks run by methods that pickle the data for every
            task (their time is scaled up to the full task count).
        timeout: seconds one method may take on one workload before it is killed.
        rounds: each method runs this many times; the best time is kept.
        workloads: names of the workloads to run, in order.
        methods: names of the methods to run, in order.
    """

    size: int = 2**30
    items: int = 2_000_000
    late_iters: int = 3
    result_size: int = 2**28
    tiny: int = 100_000
    workers: int = 2
    pickled_tasks: int = 4
    timeout: float = 120.0
    rounds: int = 1
    workloads: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    """One kind of job, measured with every method that applies.

    Attributes:
        name: short name (``--workloads``).
        title: one line for the table and the chart, from the configuration.
        tasks: the number of tasks of one full run.
        build: makes the data in the parent; every method's process inherits it.
        serial: the expected answer, computed in the parent without workers.
        check: ``check(data, expected, answer, cfg, tasks_run)`` returns
            ``(problem, worker_pids)``: a description of the first difference
            (None when the answer is right) and the pids that ran tasks.
        scalable: a method that pickles per task may run fewer tasks here.
        memory: whether workers' memory means something here (it does not
            for trivial tasks that hold no data).
    """

    name: str
    title: Callable[[Config], str]
    tasks: Callable[[Config], int]
    build: Callable[[Config], Any]
    serial: Callable[[Any, Config], Any]
    check: Callable[[Any, Any, Any, Config, int], tuple[str | None, set[int]]]
    scalable: bool = True
    memory: bool = True


@dataclass
class Method:
    """One contender.

    Attributes:
        name: short name (``--methods``).
        label: what the table and chart call it.
        needs: modules that must be importable, with the command that installs them.
        per_task: the data is pickled for every task: runs ``pickled_tasks`` tasks.
        available: an extra check; returns why the method cannot run, or None.
        impls: the function for each workload it applies to.
        not_applicable: why it does not apply to a workload it has no function for.
        labels: a label for one workload where ``label`` would mislead (no
            ``share()`` in the trivial tasks, ``export_result`` for results).
    """

    name: str
    label: str
    needs: dict[str, str] = field(default_factory=dict)
    per_task: bool = False
    available: Callable[[], str | None] | None = None
    impls: dict[str, Callable[[Run], Any]] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def label_for(self, workload: str) -> str:
        """What the table and chart call this method on ``workload``."""
        return self.labels.get(workload, self.label)

    def applies(self, workload: str) -> bool:
        """Whether this method has a function for ``workload``."""
        return workload in self.impls

    def skip_reason(self, workload: str) -> str | None:
        """Why this method does not run on ``workload``, or None if it does."""
        if workload not in self.impls:
            return self.not_applicable.get(workload, "does not apply to this workload")
        reason = self.available() if self.available is not None else None
        if reason is None:
            for module, install in self.needs.items():
                if importlib.util.find_spec(module) is None:
                    return f"{module} is not installed ({install})"
        return reason


WORKLOADS: dict[str, Workload] = {}
METHODS: dict[str, Method] = {}


def method(
    name: str,
    label: str,
    *,
    needs: dict[str, str] | None = None,
    per_task: bool = False,
    available: Callable[[], str | None] | None = None,
    not_applicable: dict[str, str] | None = None,
) -> Method:
    """Register a contender; its functions are added with :func:`implements`."""
    entry = Method(
        name, label, dict(needs or {}), per_task, available, {}, dict(not_applicable or {})
    )
    METHODS[name] = entry
    return entry


def implements(
    name: str, *workloads: str, label: str | None = None
) -> Callable[[Callable[[Run], Any]], Callable[[Run], Any]]:
    """Decorator: the function runs method ``name`` on each of ``workloads``.

    ``label`` names the method on those workloads when its usual label would mislead.
    """

    def register(fn: Callable[[Run], Any]) -> Callable[[Run], Any]:
        for workload in workloads:
            METHODS[name].impls[workload] = fn
            if label is not None:
                METHODS[name].labels[workload] = label
        return fn

    return register


class Run:
    """What a method function gets, in the process that runs it.

    Attributes:
        data: what the workload built in the parent (inherited by fork).
        cfg: the configuration.
        tasks: how many tasks to run (fewer than the workload's for
            methods that pickle per task).
    """

    def __init__(
        self, data: Any, cfg: Config, tasks: int, checkpoint: Callable[[], None]
    ) -> None:
        self.data = data
        self.cfg = cfg
        self.tasks = tasks
        self._checkpoint = checkpoint
        self._paused = 0.0
        self._start = time.perf_counter()
        #: Timed seconds spent in :meth:`scaling` blocks; None if the method has none.
        self.scaled: float | None = None

    def restart_clock(self) -> None:
        """Start timing now."""
        self._paused = 0.0
        self._start = time.perf_counter()
        self.scaled = None

    def elapsed(self) -> float:
        """Seconds since the clock started, minus the untimed parts."""
        return time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """A block the clock does not count (building a new object, warming a pool up)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    @contextlib.contextmanager
    def scaling(self) -> Iterator[None]:
        """The part of the time that grows with the number of tasks (the map, not the pool).

        A method that runs fewer tasks than the workload's has this part
        scaled up to the full count, the rest counted once. Without such a
        block the whole time is scaled (an upper bound).
        """
        start = self.elapsed()
        try:
            yield
        finally:
            self.scaled = (self.scaled or 0.0) + self.elapsed() - start

    def checkpoint(self) -> None:
        """Untimed: the parent reads every worker's memory now, while they hold the data."""
        with self.untimed():
            self._checkpoint()
