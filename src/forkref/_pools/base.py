"""What :class:`forkref.Pool` and :class:`forkref.ProcessPoolExecutor` share.

Both are thin layers over one :class:`~forkref._engine.engine.Engine`: argument
checks, the engine's construction with the launcher
:func:`forkref._launchers.choose.launcher_for` picks, memory reports, and the
private attributes that code written for the stdlib pools reaches into.

Non-goals: no behaviour of its own; each pool keeps the stdlib's API and
semantics in its own module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from multiprocessing.context import BaseContext
from typing import Any

from forkref._engine.engine import Engine
from forkref._engine.worker import WorkerSetup
from forkref._fork.safe import default_context
from forkref._launchers.choose import launcher_for
from forkref._memory.report import MemoryReport
from forkref._pools.progress import Progress, ProgressOption, fork_guard

__all__ = ["DEFAULT_RESULT_THRESHOLD", "DEFAULT_THRESHOLD", "PoolBase"]

#: Arguments estimated above this many bytes are candidates for by-reference.
DEFAULT_THRESHOLD = 2**20
#: numpy/pandas/arrow parts of results this big come back through shared memory.
DEFAULT_RESULT_THRESHOLD = 2**20
_PIDS_WAIT = 5.0  # seconds to wait for the workers' pids to be known


class PoolBase:
    """The engine and the introspection both pools offer."""

    _engine: Engine

    def _start_engine(
        self,
        processes: int,
        context: BaseContext | None,
        *,
        initializer: Callable[..., object] | None,
        initargs: Iterable[Any],
        max_tasks: int | None,
        executor_semantics: bool,
        share_threshold: int | None,
        auto_share: bool,
        backend: str = "local",
        address: str | None = None,
        result_threshold: int | None = DEFAULT_RESULT_THRESHOLD,
        task_timeout: float | None = None,
    ) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        for name, value in (("share", share_threshold), ("result", result_threshold)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}_threshold must be a number of bytes >= 0, or None")
        _check_task_timeout(task_timeout, backend)
        context = context if context is not None else default_context()
        # launcher_for sets the start method the workers really use.
        setup = WorkerSetup(
            initializer,
            tuple(initargs),
            max_tasks,
            "",
            executor_semantics,
            result_threshold=result_threshold,
            report_start=task_timeout is not None,
        )
        self._engine = Engine(
            launcher_for(backend, processes, context, setup, address),
            context,
            processes,
            max_tasks=max_tasks,
            executor_semantics=executor_semantics,
            share_threshold=share_threshold,
            auto_share=auto_share,
            task_timeout=task_timeout,
        )

    @staticmethod
    def _progress_bar(total: int | None, progress: ProgressOption, func: Any) -> Progress | None:
        """The bar ``progress=`` asks for over ``total`` items, or None for ``False``."""
        if progress is False:
            return None
        name = getattr(func, "__name__", None)
        return Progress(total, progress, desc=name if isinstance(name, str) else None,
                        guard=fork_guard)

    def memory(self) -> MemoryReport:
        """Memory of the parent, the workers and the generations' fork servers.

        Returns a :class:`forkref.MemoryReport`: USS and PSS per process, from
        psutil. To catch peaks during a long map, sample the workers in the
        background: ``with forkref.MemorySampler(pool.pids) as sampler: ...``.
        """
        return self._engine.memory()

    def pids(self) -> list[int]:
        """Pids of the live worker processes (empty before the first task)."""
        return self._engine.pids()

    def _worker_processes(self) -> dict[int, Any]:
        """pid -> process object of every live worker (stdlib-compatible views).

        Workers start (and report their pids) a moment after the first
        task; code that reads ``_processes`` right after a submit expects
        them, as the stdlib starts them inside ``submit()``.
        """
        engine = self._engine
        deadline = time.monotonic() + _PIDS_WAIT
        while engine.generation and not engine.settled() and time.monotonic() < deadline:
            time.sleep(0.005)
        return engine.worker_processes()

    @property
    def _mp_context(self) -> BaseContext:
        """The ``multiprocessing`` context the workers are started with."""
        return self._engine.context


class EngineLifetime:
    """The engine's lifetime with the methods code calls on the stdlib executor's internals.

    ``executor._executor_manager_thread.join()`` and
    ``executor._call_queue.join_thread()`` wait, in the stdlib, until the
    executor's threads have handed over every task and exited after a
    shutdown. forkref has one engine behind both: they wait until it is
    finished (every task done, every worker gone).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def join(self, timeout: float | None = None) -> None:
        """Wait until the engine is finished (after a shutdown), at most ``timeout`` seconds."""
        self._engine.join(timeout)

    def join_thread(self) -> None:
        """Like :meth:`join` (``multiprocessing.Queue.join_thread``)."""
        self._engine.join()

    def is_alive(self) -> bool:
        """Whether the engine still runs."""
        return not self._engine.finished.is_set()

    def close(self) -> None:
        """Nothing to do: the engine closes itself once shut down."""


def _check_task_timeout(task_timeout: float | None, backend: str) -> None:
    """``task_timeout=``: seconds > 0 (``inf``: no limit) or None, on the local backend."""
    if task_timeout is None:
        return
    if isinstance(task_timeout, bool) or not isinstance(task_timeout, (int, float)):
        raise TypeError(
            f"task_timeout must be a number of seconds or None, not {type(task_timeout).__name__}"
        )
    if not task_timeout > 0:  # also NaN
        raise ValueError(f"task_timeout must be seconds > 0, or None, not {task_timeout}")
    if backend == "ray":
        raise ValueError(
            "task_timeout is not supported with backend='ray': a Ray actor is sent several "
            "tasks per call, so forkref cannot tell when one of them starts, nor stop it "
            "without losing the others. Leave task_timeout=None on Ray, or use the local backend"
        )
