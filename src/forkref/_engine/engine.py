"""The engine under :class:`forkref.Pool` and :class:`forkref.ProcessPoolExecutor`.

How data flows (the ``fork`` start method; see each part for more)::

  caller thread                    dispatcher thread (_dispatcher)       workers (_worker)
  -------------                    -------------------------------       -----------------
  submit(fn, items)
   pickle fn once, each item's data (_taskpickle): handles and big
   arguments become References; big pickles are dropped, made again
   at dispatch (bounded memory)
   a Reference newer than the current generation? (_generations policy)
     shared memory: the workers fetch it from this process (_export)
     or fork a new generation: FORK_LOCK, forkref threads paused,
     gc frozen, fork its fork server (_forking, _zygote)
   queue the tasks (_scheduler) --wake-->  send to idle workers ==========> run them
                                           read replies <================= results
                                           complete futures / AsyncResults
                                           (callbacks run here)
                                           keep `processes` workers per generation
                                           (launcher.launch) <-- events: pids, exits

The parts: :mod:`forkref._engine.scheduler` (queue, in-flight, worker choice),
:mod:`forkref._engine.generations` (generations and the late-object policy),
:mod:`forkref._engine.dispatcher` (the thread), :mod:`forkref._engine.launcher` (the
worker-launcher interface, and ``context.Process`` workers for spawn and
forkserver), :mod:`forkref._launchers.zygote` (fork servers for ``fork``),
:mod:`forkref._fork.safe` (fork safety), :mod:`forkref._launchers.ray.launcher` (Ray actors:
the third launcher, for ``backend="ray"``). This module is the facade that
ties them together: submitting, shutting down, introspection, breaking.

Without fork (``spawn``/``forkserver``) there is one generation and no
policy: workers are ``context.Process`` objects and shared objects reach
them through shared memory. On Ray they are actors, and shared objects go
through Ray's object store, put once per pool.

Non-goals: no work stealing, no result streaming; distribution over hosts
is Ray's, through its launcher.
"""

from __future__ import annotations

import atexit
import concurrent.futures.process
import contextlib
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.context import BaseContext
from typing import Any

from forkref._engine.dispatcher import Dispatcher
from forkref._engine.generations import Generation, Generations
from forkref._engine.launcher import (
    MAIN_GUARD_EXIT,
    Launcher,
    ProcessLauncher,
    ServerLost,
    exit_text,
    main_guard_message,
)
from forkref._engine.scheduler import Cancelled, Completion, Scheduler, Task
from forkref._engine.wire import OK
from forkref._engine.worker import WorkerSetup
from forkref._errors import BrokenPoolError, Error, ReleasedError, TaskPicklingError
from forkref._fork.safe import (
    FORK_LOCK,
    default_context,
    is_dispatcher,
    paused_threads,
    register_pausable,
)
from forkref._launchers.zygote import ZygoteLauncher
from forkref._memory.report import MemoryReport
from forkref._refs.registry import Reference
from forkref._share.autoshare import AutoSharer
from forkref._share.taskpickle import FnBlob
from forkref._shm import export as _export

__all__ = ["Cancelled", "Engine", "default_context"]

_BATCH = 64  # at most this many tasks queued at once while a map is being pickled

#: Every engine of this process, for the interpreter's exit.
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
_atexit_registered = False

#: An item handed to submit_many: (data, on_done, on_start, offset of its first item).
Item = tuple[Any, Callable[[bool, Any], None], Callable[[], bool] | None, int]


class Engine:
    """Runs tasks on a set of worker processes; the facade over the engine's parts.

    ``executor_semantics``: a dead worker or failed initializer breaks the
    whole engine (every pending task fails, later submits raise), as
    ``concurrent.futures`` does. Otherwise (``multiprocessing.Pool``) only
    the dead worker's tasks fail and a replacement is started.
    """

    def __init__(
        self,
        processes: int,
        context: BaseContext | None,
        *,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks: int | None,
        executor_semantics: bool,
        share_threshold: int | None,
        auto_share: bool,
        launcher: Launcher | None = None,
    ) -> None:
        self.context = context if context is not None else default_context()
        self.start_method = self.context.get_start_method()
        self.processes = processes
        self.max_tasks = max_tasks
        self.executor_semantics = executor_semantics
        self.setup = WorkerSetup(
            initializer, tuple(initargs), max_tasks, self.start_method, executor_semantics
        )
        self.launcher = launcher or _local_launcher(self.context, self.setup)
        by_reference = self.launcher.carries_references
        self.sharer = AutoSharer(share_threshold, auto_share, by_reference=by_reference)
        self.encoder = self.launcher.encoder(self.sharer)
        self.lock = threading.Lock()
        self.scheduler = Scheduler(self._encode_late)
        self.generations = Generations(self.launcher, processes)
        self.dispatcher = Dispatcher(self)
        self.ids = itertools.count(1)
        self.wids = itertools.count(1)
        # concurrent.futures marks max_workers + 1 queued futures running (its call queue).
        self.commit_window = processes + 1 if executor_semantics else 0
        # concurrent.futures starts a spawn/forkserver worker only when no worker is idle
        # (bpo-39207): starting one costs far more than forking.
        self.on_demand = executor_semantics and not self.launcher.inherits
        self.accepting = True
        self.terminated = False
        self.broken: BrokenPoolError | None = None
        #: Why the last generation's fork server died, while no generation replaces it.
        self.server_gone: BrokenPoolError | None = None
        self.finished = threading.Event()
        self._started = False
        self._pid = os.getpid()  # a plain fork() child inherits this object: not its pool
        _ENGINES.add(self)
        register_pausable(self)
        _register_atexit()

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
        self._check_accepting()
        if not self.launcher.inherits:
            check_main_guard(self.start_method)
        with self.sharer.holding():  # nothing released between pickling and queueing
            if fn_blob is None:
                try:
                    fn_blob = self.encoder.encode_function(fn)
                except (TaskPicklingError, ReleasedError):
                    if not self._started:  # a submit starts the workers, as the stdlib's does
                        self._ensure_generation([])
                    raise
            pending = iter(items)
            # Idle workers get the first task at once; batches then grow to _BATCH.
            # With tasks already waiting, nobody idles: full batches from the start.
            size = _BATCH if self.scheduler.pending() else 1
            while chunk := list(itertools.islice(pending, size)):
                size = min(2 * size, _BATCH)
                self._encode_and_enqueue(kind, fn, fn_blob, chunk, fail_fast)

    def encode_function(self, fn: Any) -> FnBlob:
        """Pickle a task function once, for several :meth:`submit_many` calls.

        Raises:
            TaskPicklingError: the function cannot be pickled.
        """
        with self.sharer.holding():
            return self.encoder.encode_function(fn)

    def _encode_and_enqueue(
        self, kind: int, fn: Any, fn_blob: FnBlob, chunk: list[Item], fail_fast: bool
    ) -> None:
        tasks = []
        with self.encoder.batch() as batch:
            for data, on_done, on_start, offset in chunk:
                try:
                    encoded = batch.encode(kind, fn, data, offset)
                except (TaskPicklingError, ReleasedError) as err:
                    if fail_fast:
                        raise
                    on_done(False, err)
                    continue
                task_id = next(self.ids)
                tasks.append(
                    Task(
                        task_id,
                        kind,
                        fn_blob,
                        encoded,
                        data=data,
                        offset=offset,
                        on_done=on_done,
                        on_start=on_start,
                    )
                )
            refs = batch.refs + fn_blob.refs
        if tasks:
            self._enqueue(tasks, refs)
        elif not self._started:  # a submit starts the workers, as the stdlib's does
            self._ensure_generation([])

    def _encode_late(self, task: Task) -> bytes:
        """The dispatcher pickles a big task only when a worker is free to take it."""
        return self.encoder.encode_late(task.kind, None, task.data, task.offset)

    def _enqueue(self, tasks: list[Task], refs: list[Reference]) -> None:
        # A batch's tasks all hold the batch's references (a slight over-count:
        # an automatic share is released at most one batch later).
        if refs:
            for task in tasks:
                task.refs = self.sharer.acquire(refs)
            if not self.launcher.inherits:
                # No generation fork ever releases idle automatic shares here (the
                # objects travel through a store): release them as new ones come.
                self.sharer.release_idle()
        try:
            self._ensure_generation(refs)
            self._check_accepting()
        except BaseException as err:  # closed or broken meanwhile: these tasks fail too
            self.complete([(task, -1, err) for task in tasks])
            raise
        self.scheduler.submit(tasks)
        if self.commit_window:
            self._commit()
        if self.dispatcher.wake():
            # Let the dispatcher have the GIL now: a submitter still pickling the
            # rest of a map would otherwise hold it for up to the switch interval
            # (5 ms), and the workers would wait for their first task as long.
            time.sleep(0)
        # Lost the race with the end of the engine (closed, or broken by a failed
        # launch)? Read under the lock: the dispatcher checks all_done() and
        # finishes in one hold of it, so a test outside could fall between the
        # two and leave these tasks in a finished engine for ever.
        with self.lock:
            lost = []
            if self.finished.is_set():
                self.scheduler.drain_incoming()
                lost = [t for t in self.scheduler.queue if t in tasks]
                for t in lost:
                    self.scheduler.queue.remove(t)
        if lost:
            why = self.broken or RuntimeError("the pool was closed")
            self.complete([(t, -1, why) for t in lost])

    def _commit(self) -> None:
        """Mark the executor's call window running now, as the stdlib's submit() does."""
        cancelled: list[Completion] = []
        with self.lock:
            self.scheduler.drain_incoming()
            self.scheduler.commit(self.commit_window, cancelled)
        self.complete(cancelled)

    def _check_accepting(self) -> None:
        if self.broken is not None:
            raise BrokenPoolError(str(self.broken))
        if not self.accepting:
            raise RuntimeError("cannot schedule new tasks after the pool was closed")

    def _needs_generation(self, refs: list[Reference]) -> bool:
        if not refs and self.generations.current() is not None:
            return False  # the common case, without waiting for the dispatcher's lock
        with self.lock:
            return self.generations.needs_new(refs, self.accepting)

    def _ensure_generation(self, refs: list[Reference]) -> None:
        if self._started and not self._needs_generation(refs):
            return
        with FORK_LOCK:
            if self._started and not self._needs_generation(refs):
                return
            try:
                if self.launcher.inherits:
                    self.sharer.release_idle()
                    # The export thread (shared-memory transport) stays stopped
                    # through the fork, not restarted inside it by its at-fork hook.
                    with paused_threads(self), _export.paused():
                        gen = self.generations.start()
                else:
                    gen = self.generations.start()
                with self.lock:
                    self.generations.adopt(gen)
                    self.server_gone = None  # a new generation serves the queue again
                self._started = True
            finally:
                # Also when the fork failed (EAGAIN, ENOMEM) or Ctrl-C came while
                # pausing: the current generation goes on serving its tasks.
                if self._started:
                    self.dispatcher.start()

    # -- completing (dispatcher thread, or a caller failing its own tasks) -----------

    def complete(self, completions: list[Completion]) -> None:
        """Finish tasks outside the engine lock: decode, release, run ``on_done``.

        Whatever is raised on the way (a result whose unpickling raises
        ``SystemExit``, a callback raising ``KeyboardInterrupt``), every task
        of ``completions`` ends: a failed decode fails that task alone.
        """
        for task, op, body in completions:
            ok, value = _decode(op, body, self.executor_semantics)
            self.sharer.done(task.refs)
            try:
                task.on_done(ok, value)
            except BaseException:
                traceback.print_exc()

    # -- breaking (under the lock) --------------------------------------------------

    def break_locked(self, err: BrokenPoolError, completions: list[Completion]) -> None:
        """The engine cannot run tasks any more: fail every pending task with ``err``."""
        if self.broken is not None:
            return
        self.broken = err
        self.accepting = False
        for task in self.scheduler.take_all():
            completions.append((task, -1, BrokenPoolError(str(err))))
        for gen in self.generations.all:
            for w in gen.workers:
                for task in w.inflight:
                    completions.append((task, -1, BrokenPoolError(str(err))))
                w.inflight.clear()
                w.stopping = True
            self.launcher.kill_all(gen)
            self.generations.retire(gen)  # its server exits once the killed workers are reaped

    def server_lost(
        self, gen: Generation, event: ServerLost, completions: list[Completion]
    ) -> None:
        """The current generation's fork server died (OOM killer, kill -9): retire it.

        Its replacements must not be forked from the dispatcher thread (Python
        3.12's multi-threaded fork warning, and locks held by other threads):
        the next submit forks a fresh generation from the caller's thread.
        Tasks waiting in the queue fail; the executor breaks.
        """
        what = f"the pool's fork server (pid {event.pid}, {exit_text(event.status)}) died"
        if self.executor_semantics:
            self.break_locked(
                BrokenPoolError(
                    f"{what}, so the executor cannot start workers any more; "
                    "shut it down and create a new one"
                ),
                completions,
            )
            return
        self.generations.retire(gen)
        err = BrokenPoolError(
            f"{what} before this task started; submit it again: the next task forks "
            "a fresh generation of workers"
        )
        # Also the tasks its dying workers put back later (Dispatcher._upkeep).
        self.server_gone = err
        completions += [(task, -1, err) for task in self.scheduler.take_all()]

    def fail(self, err: BaseException) -> None:
        """The dispatcher thread failed: break, fail everything pending, kill the workers."""
        with contextlib.suppress(Exception):
            traceback.print_exception(type(err), err, err.__traceback__)
        completions: list[Completion] = []
        with self.lock:
            self.break_locked(
                BrokenPoolError(
                    f"forkref's dispatcher thread failed with {err!r}, so the pool cannot run "
                    "tasks any more (this is a bug in forkref: please report it with the "
                    "traceback printed above); create a new pool"
                ),
                completions,
            )
        self.complete(completions)
        self.terminate()

    # -- the end (under the lock) ---------------------------------------------------

    def all_done(self) -> bool:
        """No task left and no worker or fork server alive, and closed."""
        if self.accepting or self.scheduler.pending():
            return False
        return all(self.generations.done(g) for g in self.generations.all)

    def finish_locked(self) -> None:
        """Release everything; waiters of :meth:`join` return."""
        self.generations.all.clear()
        self.setup = WorkerSetup(None, (), None, self.start_method, self.executor_semantics)
        self.sharer.release_all()
        self.dispatcher.close()
        self.launcher.close()
        self.finished.set()

    # -- Pausable (forkref._fork.safe) ------------------------------------------------

    def pause_thread(self) -> bool:
        """Stop the dispatcher around another engine's generation fork."""
        return self.dispatcher.pause()

    def resume_thread(self) -> None:
        """Start the dispatcher again after that fork."""
        self.dispatcher.start()

    def owned_by_this_process(self) -> bool:
        """False in a plain ``fork()`` child that inherited this engine."""
        return self._pid == os.getpid()

    # -- shutting down (caller threads) ---------------------------------------------

    def close(self) -> None:
        """No more tasks; workers exit once the queued ones are done. Idempotent."""
        if not self.owned_by_this_process():
            return
        with self.lock:
            if not self.accepting:
                return
            self.accepting = False
            self.dispatcher.wake()
            if not self._started:
                self.finish_locked()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to finish and exit; True when they did."""
        if self.dispatcher.thread is threading.current_thread() or is_dispatcher():
            return self.finished.is_set()
        return self.finished.wait(timeout)

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker has taken: their ``on_done`` gets a :class:`Cancelled`."""
        with self.lock:
            queued = self.scheduler.cancel_queued()
        self.complete([(task, -1, Cancelled()) for task in queued])

    def terminate(self) -> None:
        """Kill every worker now; pending tasks fail. Idempotent, safe at exit and from GC."""
        if not self.owned_by_this_process():
            return
        with self.lock:
            if self.terminated:
                return
            self.terminated = True
            self.accepting = False
        if threading.current_thread() is not self.dispatcher.thread:
            with FORK_LOCK:
                self.dispatcher.pause()
        completions = self._kill_everything()
        self.complete(completions)
        with self.lock:
            self.finish_locked()

    def _kill_everything(self) -> list[Completion]:
        err = Error("the pool was terminated before this task finished")
        with self.lock:
            completions: list[Completion] = [(t, -1, err) for t in self.scheduler.take_all()]
            for gen in self.generations.all:
                for w in gen.workers:
                    completions += [(t, -1, err) for t in w.inflight]
                    w.inflight.clear()
                    w.stopping = True
                self.launcher.kill_all(gen)
            generations = list(self.generations.all)
        for gen in generations:
            self.launcher.reap(gen, 5.0)
            for w in gen.workers:
                w.channel.close()
            gen.workers.clear()
        return completions

    # -- introspection --------------------------------------------------------------

    def pids(self) -> list[int]:
        """Pids of the live workers (all generations)."""
        with self.lock:
            return self.generations.pids()

    def zygote_pids(self) -> list[int]:
        """Pids of the generations' fork servers."""
        with self.lock:
            return self.generations.server_pids()

    def settled(self) -> bool:
        """The dispatcher has placed what was submitted and every worker it started has a pid."""
        with self.lock:
            if self.scheduler.incoming or self.finished.is_set():
                return self.finished.is_set()
            gen = self.generations.current()
            if gen is None:
                return True
            if any(w.pid is None for w in gen.workers):
                return False
            started = sum(1 for w in gen.workers if w.accepting())
            if self.on_demand:
                return started == self.processes or not self.scheduler.queue
            return started == self.processes

    def worker_processes(self) -> dict[int, Any]:
        """pid -> a process object (``multiprocessing.Process`` or a forked-worker view)."""
        from forkref._engine.procview import process_view

        with self.lock:
            workers = [w for g in self.generations.all for w in g.workers if w.pid is not None]
        return {w.pid: process_view(self, w) for w in workers if w.pid is not None}

    def memory(self) -> MemoryReport:
        """USS/PSS of the parent, the workers and the generations' fork servers."""
        roles = {os.getpid(): "parent"}
        roles.update(dict.fromkeys(self.zygote_pids(), "fork server"))
        roles.update(dict.fromkeys(self.pids(), "worker"))
        return self.launcher.memory(roles)

    @property
    def generation(self) -> int:
        """Number of the current generation (0 before the first task)."""
        with self.lock:
            return self.generations.number


def _local_launcher(context: BaseContext, setup: WorkerSetup) -> Launcher:
    if context.get_start_method() == "fork":
        return ZygoteLauncher(setup)
    return ProcessLauncher(context, setup)


def check_main_guard(start_method: str) -> None:
    """In a spawn/forkserver child still importing the parent's main module: exit at once.

    That module creates a pool and submits at import time (no
    ``if __name__ == "__main__":``). Left alone, the child would start
    workers that import the module again, and the parent would wait for
    ever. The exit status tells the parent why (see ``_dispatcher``).
    """
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    print(f"forkref: {main_guard_message(start_method)}", file=sys.stderr, flush=True)
    os._exit(MAIN_GUARD_EXIT)


def _decode(op: int, body: Any, executor: bool) -> tuple[bool, Any]:
    """A reply's result or exception; a failure to unpickle it fails this task only."""
    if op == -1:
        return False, body
    try:
        if op == OK:
            return True, pickle.loads(body)
        exc, tb = pickle.loads(body)
    except BaseException as err:
        what = "result" if op == OK else "exception"
        failure = TaskPicklingError(
            f"cannot unpickle the task's {what} in the parent: {err!r}. Make the task return "
            "(or raise) something the parent can import and unpickle"
        )
        failure.__cause__ = err if isinstance(err, Exception) else None
        return False, failure
    # The stdlib's own remote-traceback types: code written for it checks for them.
    if executor:
        exc.__cause__ = concurrent.futures.process._RemoteTraceback(tb)
    else:
        exc.__cause__ = getattr(multiprocessing.pool, "RemoteTraceback")(tb)  # noqa: B009
    return False, exc


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
