"""The engine under :class:`forkref.Pool` and :class:`forkref.ProcessPoolExecutor`.

How data flows (the ``fork`` start method; see each part for more)::

  caller thread (submission)       dispatcher thread (dispatcher,         workers (worker)
                                   decisions: workforce)
  -------------                    ---------------------------------      ----------------
  submit(fn, items)
   pickle fn once, each item's data (_share.taskpickle): handles and
   big arguments become References; big pickles are dropped, made
   again at dispatch (bounded memory)
   a Reference newer than the current generation? (generations policy)
     shared memory: the workers fetch it from this process (_shm.export)
     or fork a new generation: FORK_LOCK, forkref threads paused,
     gc frozen, the launcher forks its fork server
   queue the tasks (scheduler) --wake-->   send to idle workers ==========> run them
                                           read replies <================= results
                                           complete futures / AsyncResults
                                           (outcomes; callbacks run here)
                                           keep `processes` workers per generation
                                           (launcher.launch) <-- events: pids, exits

The parts, each handed the one :class:`~forkref._engine.state.EngineState`
they share: :mod:`~forkref._engine.submission` (pickling, queueing, forking
generations), :mod:`~forkref._engine.outcomes` (completing tasks, breaking
the engine), :mod:`~forkref._engine.workforce` (what the dispatcher decides
each round: feeding, launching, deaths), :mod:`~forkref._engine.dispatcher`
(the thread and its poll), :mod:`~forkref._engine.lifecycle` (close,
terminate, the last release), :mod:`~forkref._engine.introspection` (pids,
process views, memory). Below them: :mod:`~forkref._engine.model` (Task,
Worker, Generation, Channel), :mod:`~forkref._engine.scheduler` (queue,
in-flight, worker choice), :mod:`~forkref._engine.generations` (generations
and the late-object policy), :mod:`~forkref._engine.launcher` (the launcher
interface). This module is the facade that ties them together.

The engine is handed its launcher and knows only its interface; which one a
pool gets is decided in :mod:`forkref._launchers.choose`: fork servers for
``fork`` (:mod:`forkref._launchers.zygote`), ``context.Process`` workers for
``spawn`` and ``forkserver`` (:mod:`forkref._launchers.process`), Ray actors
for ``backend="ray"`` (:mod:`forkref._launchers.ray.launcher`).

Without fork (``spawn``/``forkserver``) there is one generation and no
policy: shared objects reach the workers through shared memory. On Ray they
go through Ray's object store, put once per pool.

Non-goals: no work stealing, no result streaming; distribution over hosts
is Ray's, through its launcher.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.context import BaseContext
from typing import Any

from forkref._engine.dispatcher import Dispatcher
from forkref._engine.generations import Generations
from forkref._engine.introspection import Introspection
from forkref._engine.launcher import Launcher
from forkref._engine.lifecycle import Lifecycle
from forkref._engine.model import Cancelled, Completion
from forkref._engine.outcomes import Outcomes
from forkref._engine.state import EngineState
from forkref._engine.submission import Item, Submitter
from forkref._engine.workforce import Workforce
from forkref._errors import BrokenPoolError
from forkref._fork.safe import register_pausable
from forkref._memory.report import MemoryReport
from forkref._share.autoshare import AutoSharer
from forkref._share.taskpickle import FnBlob

__all__ = ["Cancelled", "Engine", "Item"]

#: Every engine of this process, for the interpreter's exit.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_atexit_registered = False


class Engine:
    """Runs tasks on a set of worker processes; the facade over the engine's parts.

    ``executor_semantics``: a dead worker or failed initializer breaks the
    whole engine (every pending task fails, later submits raise), as
    ``concurrent.futures`` does. Otherwise (``multiprocessing.Pool``) only
    the dead worker's tasks fail and a replacement is started.

    ``task_timeout``: a task running longer fails with
    :class:`~forkref.TaskTimeoutError` and its worker is killed and replaced,
    under both semantics (only that task fails).

    Implements :class:`~forkref._engine.dispatcher.DispatcherHost` for its dispatcher.
    """

    def __init__(
        self,
        launcher: Launcher,
        context: BaseContext,
        processes: int,
        *,
        max_tasks: int | None,
        executor_semantics: bool,
        share_threshold: int | None,
        auto_share: bool,
        task_timeout: float | None = None,
    ) -> None:
        self.state = EngineState(
            launcher,
            context,
            processes,
            max_tasks=max_tasks,
            executor_semantics=executor_semantics,
            share_threshold=share_threshold,
            auto_share=auto_share,
            task_timeout=task_timeout,
        )
        self._outcomes = Outcomes(self.state)
        self.workforce = Workforce(self.state, self._outcomes)
        self.dispatcher = Dispatcher(self)
        self._submitter = Submitter(self.state, self._outcomes, self.dispatcher)
        self._lifecycle = Lifecycle(self.state, self._outcomes, self.dispatcher)
        self._introspection = Introspection(self.state)
        _ENGINES.add(self)
        register_pausable(self.dispatcher)
        _register_atexit()

    # -- what the pools read ----------------------------------------------------------

    @property
    def context(self) -> BaseContext:
        """The ``multiprocessing`` context of local workers."""
        return self.state.context

    @property
    def launcher(self) -> Launcher:
        """The launcher the engine was handed."""
        return self.state.launcher

    @property
    def sharer(self) -> AutoSharer:
        """The automatic shares of big arguments."""
        return self.state.sharer

    @property
    def generations(self) -> Generations:
        """The generations of workers (read under :attr:`lock`)."""
        return self.state.generations

    @property
    def broken(self) -> BrokenPoolError | None:
        """Why the engine broke (every later submit raises it), or None."""
        return self.state.broken

    @property
    def executor_semantics(self) -> bool:
        """Whether a dead worker breaks the whole engine (``concurrent.futures``)."""
        return self.state.executor_semantics

    # -- submitting (caller threads) ------------------------------------------------

    def submit(
        self,
        kind: int,
        fn: Any,
        data: Any,
        on_done: Callable[[bool, Any], None],
        on_start: Callable[[], bool] | None = None,
    ) -> None:
        """Pickle and queue one task; ``on_done(ok, value)`` runs when it ends.

        Raises:
            TaskPicklingError: the task cannot be pickled (nothing is queued).
            BrokenPoolError: the engine is broken.
            RuntimeError: the engine no longer accepts tasks.
        """
        self.submit_many(kind, fn, [(data, on_done, on_start, 0)], fail_fast=True)

    def submit_many(
        self,
        kind: int,
        fn: Any,
        items: Iterable[Item],
        fail_fast: bool = False,
        fn_blob: FnBlob | None = None,
    ) -> None:
        """Pickle and queue tasks sharing one function: ``(data, on_done, on_start, offset)``.

        The function is pickled once (or given, pickled by
        :meth:`encode_function`, for a caller that submits in rounds). A
        chunk that cannot be pickled gets a :class:`~forkref.TaskPicklingError`
        through its ``on_done`` (raised instead with ``fail_fast``);
        ``offset`` is the index of the chunk's first item in the caller's
        iterable, for that message.

        Raises:
            TaskPicklingError: the function cannot be pickled.
            BrokenPoolError: the engine is broken.
            RuntimeError: the engine no longer accepts tasks.
        """
        self._submitter.submit_many(kind, fn, items, fail_fast, fn_blob)

    def encode_function(self, fn: Any) -> FnBlob:
        """Pickle a task function once, for several :meth:`submit_many` calls.

        Raises:
            TaskPicklingError: the function cannot be pickled.
        """
        return self._submitter.encode_function(fn)

    # -- shutting down (caller threads) ---------------------------------------------

    def close(self) -> None:
        """No more tasks; workers exit once the queued ones are done. Idempotent."""
        self._lifecycle.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to finish and exit; True when they did."""
        return self._lifecycle.join(timeout)

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker has taken: their ``on_done`` gets a :class:`Cancelled`."""
        self._lifecycle.cancel_queued()

    def terminate(self) -> None:
        """Kill every worker now; pending tasks fail. Idempotent, safe at exit and from GC."""
        self._lifecycle.terminate()

    def owned_by_this_process(self) -> bool:
        """False in a plain ``fork()`` child that inherited this engine."""
        return self.state.owned_by_this_process()

    # -- introspection --------------------------------------------------------------

    def pids(self) -> list[int]:
        """Pids of the live workers (all generations)."""
        return self._introspection.pids()

    def zygote_pids(self) -> list[int]:
        """Pids of the generations' fork servers."""
        return self._introspection.zygote_pids()

    def settled(self) -> bool:
        """The dispatcher has placed what was submitted and every worker it started has a pid."""
        return self._introspection.settled()

    def worker_processes(self) -> dict[int, Any]:
        """pid -> a process object (``multiprocessing.Process`` or a forked-worker view)."""
        return self._introspection.worker_processes()

    def memory(self) -> MemoryReport:
        """USS/PSS of the parent, the workers and the generations' fork servers."""
        return self._introspection.memory()

    @property
    def generation(self) -> int:
        """Number of the current generation (0 before the first task)."""
        return self._introspection.generation()

    # -- DispatcherHost ---------------------------------------------------------------

    @property
    def lock(self) -> threading.Lock:
        """The engine lock (see :class:`~forkref._engine.state.EngineState`)."""
        return self.state.lock

    @property
    def finished(self) -> threading.Event:
        """Set once the engine has released everything (after a close or terminate)."""
        return self.state.finished

    def all_done(self) -> bool:
        """Under the lock: closed, no task left, no worker or fork server alive."""
        return self._lifecycle.all_done()

    def finish_locked(self) -> None:
        """Under the lock: release everything; waiters of :meth:`join` return."""
        self._lifecycle.finish_locked()

    def complete(self, completions: list[Completion]) -> None:
        """Finish tasks outside the engine lock (decode, release, ``on_done``)."""
        self._outcomes.complete(completions)

    def fail(self, err: BaseException, undelivered: list[Completion]) -> None:
        """The dispatcher thread failed: break, fail everything pending, kill the workers."""
        self._lifecycle.fail(err, undelivered)


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_at_exit)


def _at_exit() -> None:
    # As the stdlib does: executors finish their pending work, pools are terminated.
    for engine in list(_ENGINES):
        if not engine.owned_by_this_process():  # inherited by a plain fork() child
            continue
        with contextlib.suppress(Exception):
            if engine.executor_semantics:
                engine.close()
                engine.join()
            engine.terminate()
