"""Submitting: from a caller's function and items to queued tasks (caller threads).

::

    submit_many(kind, fn, items)
      pickle fn once, each item's data (forkref._share.taskpickle): handles and
      big arguments become References; big pickles are dropped, made again at
      dispatch (bounded memory)
      a Reference newer than the current generation? (generations' late-object policy)
        shared memory: the workers fetch it from this process (forkref._shm.export)
        or fork a new generation: FORK_LOCK, forkref threads paused, gc frozen,
        the launcher forks its fork server (forkref._launchers.zygote)
      queue the tasks (scheduler.submit, lock-free) --wake--> the dispatcher

Non-goals: no waiting for results here; the tasks' ``on_done`` callbacks
report them, from the dispatcher thread.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sized
from typing import Any

from forkref._engine.dispatcher import Dispatcher
from forkref._engine.launcher import MAIN_GUARD_EXIT, main_guard_message
from forkref._engine.model import Completion, Task
from forkref._engine.outcomes import Outcomes
from forkref._engine.state import EngineState
from forkref._errors import BrokenPoolError, ReleasedError, TaskPicklingError
from forkref._fork.safe import FORK_LOCK, paused_threads
from forkref._refs.registry import Reference
from forkref._share.taskpickle import CALL, FnBlob
from forkref._shm import export as _export

__all__ = ["Item", "Submitter", "check_main_guard", "function_name"]

_BATCH = 64  # at most this many tasks queued at once while a map is being pickled

#: An item handed to submit_many: (data, on_done, on_start, offset of its first item).
Item = tuple[Any, Callable[[bool, Any], None], Callable[[], bool] | None, int]


class Submitter:
    """Pickles and queues the tasks of one engine, forking generations as they need."""

    def __init__(self, state: EngineState, outcomes: Outcomes, dispatcher: Dispatcher) -> None:
        self._state = state
        self._outcomes = outcomes
        self._dispatcher = dispatcher

    def submit_many(
        self,
        kind: int,
        fn: Any,
        items: Iterable[Item],
        fail_fast: bool = False,
        fn_blob: FnBlob | None = None,
    ) -> None:
        """Pickle and queue tasks sharing one function (see :meth:`Engine.submit_many`)."""
        state = self._state
        self.check_accepting()
        if not state.launcher.inherits:
            check_main_guard(state.start_method)
        with state.sharer.holding():  # nothing released between pickling and queueing
            if fn_blob is None:
                try:
                    fn_blob = state.encoder.encode_function(fn)
                except (TaskPicklingError, ReleasedError):
                    if not state.started:  # a submit starts the workers, as the stdlib's does
                        self.ensure_generation([])
                    raise
            pending = iter(items)
            # Idle workers get the first task at once; batches then grow to _BATCH.
            # With tasks already waiting, nobody idles: full batches from the start.
            size = _BATCH if state.scheduler.pending() else 1
            while chunk := list(itertools.islice(pending, size)):
                size = min(2 * size, _BATCH)
                self._encode_and_enqueue(kind, fn, fn_blob, chunk, fail_fast)

    def encode_function(self, fn: Any) -> FnBlob:
        """Pickle a task function once, for several :meth:`submit_many` calls.

        Raises:
            TaskPicklingError: the function cannot be pickled.
        """
        with self._state.sharer.holding():
            return self._state.encoder.encode_function(fn)

    def check_accepting(self) -> None:
        """Raise if no task may be submitted now.

        Raises:
            BrokenPoolError: the engine is broken.
            RuntimeError: the engine no longer accepts tasks.
        """
        if self._state.broken is not None:
            raise BrokenPoolError(str(self._state.broken))
        if not self._state.accepting:
            raise RuntimeError("cannot schedule new tasks after the pool was closed")

    def _encode_and_enqueue(
        self, kind: int, fn: Any, fn_blob: FnBlob, chunk: list[Item], fail_fast: bool
    ) -> None:
        state = self._state
        tasks = []
        name = function_name(fn)
        with state.encoder.batch() as batch:
            for data, on_done, on_start, offset in chunk:
                try:
                    encoded = batch.encode(kind, fn, data, offset)
                except (TaskPicklingError, ReleasedError) as err:
                    if fail_fast:
                        raise
                    on_done(False, err)
                    continue
                task = Task(
                    next(state.task_ids),
                    kind,
                    fn_blob,
                    encoded,
                    data=data,
                    offset=offset,
                    on_done=on_done,
                    on_start=on_start,
                    name=name,
                    count=len(data) if kind != CALL and isinstance(data, Sized) else 1,
                )
                tasks.append(task)
            refs = batch.refs + fn_blob.refs
        if tasks:
            self._enqueue(tasks, refs)
        elif not state.started:  # a submit starts the workers, as the stdlib's does
            self.ensure_generation([])

    def _enqueue(self, tasks: list[Task], refs: list[Reference]) -> None:
        state = self._state
        # A batch's tasks all hold the batch's references (a slight over-count:
        # an automatic share is released at most one batch later).
        if refs:
            for task in tasks:
                task.refs = state.sharer.acquire(refs)
            if not state.launcher.inherits:
                # No generation fork ever releases idle automatic shares here (the
                # objects travel through a store): release them as new ones come.
                state.sharer.release_idle()
        try:
            self.ensure_generation(refs)
            self.check_accepting()
        except BaseException as err:  # closed or broken meanwhile: these tasks fail too
            self._outcomes.complete([(task, -1, err) for task in tasks])
            raise
        state.scheduler.submit(tasks)
        if state.commit_window:
            self._commit()
        if self._dispatcher.wake():
            # Let the dispatcher have the GIL now: a submitter still pickling the
            # rest of a map would otherwise hold it for up to the switch interval
            # (5 ms), and the workers would wait for their first task as long.
            time.sleep(0)
        # Lost the race with the end of the engine (closed, or broken by a failed
        # launch)? Read under the lock: the dispatcher checks all_done() and
        # finishes in one hold of it, so a test outside could fall between the
        # two and leave these tasks in a finished engine for ever.
        with state.lock:
            lost = []
            if state.finished.is_set():
                state.scheduler.drain_incoming()
                lost = [t for t in state.scheduler.queue if t in tasks]
                for t in lost:
                    state.scheduler.queue.remove(t)
        if lost:
            why = state.broken or RuntimeError("the pool was closed")
            self._outcomes.complete([(t, -1, why) for t in lost])

    def _commit(self) -> None:
        """Mark the executor's call window running now, as the stdlib's submit() does."""
        state = self._state
        cancelled: list[Completion] = []
        with state.lock:
            state.scheduler.drain_incoming()
            state.scheduler.commit(state.commit_window, cancelled)
        self._outcomes.complete(cancelled)

    def _needs_generation(self, refs: list[Reference]) -> bool:
        state = self._state
        if not refs and state.generations.current() is not None:
            return False  # the common case, without waiting for the dispatcher's lock
        with state.lock:
            return state.generations.needs_new(refs, state.accepting)

    def ensure_generation(self, refs: list[Reference]) -> None:
        """Start a generation if there is none yet or ``refs`` need one (caller's thread)."""
        state = self._state
        if state.started and not self._needs_generation(refs):
            return
        with FORK_LOCK:
            if state.started and not self._needs_generation(refs):
                return
            try:
                if state.launcher.inherits:
                    state.sharer.release_idle()
                    # The export thread (shared-memory transport) stays stopped
                    # through the fork, not restarted inside it by its at-fork hook.
                    with paused_threads(self._dispatcher), _export.paused():
                        gen = state.generations.start()
                else:
                    gen = state.generations.start()
                with state.lock:
                    state.generations.adopt(gen)
                    state.server_gone = None  # a new generation serves the queue again
                state.started = True
            finally:
                # Also when the fork failed (EAGAIN, ENOMEM) or Ctrl-C came while
                # pausing: the current generation goes on serving its tasks.
                if state.started:
                    self._dispatcher.start()


def function_name(fn: Any) -> str:
    """``fn``'s qualified name for messages (``Model.predict``), or its type's."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    return f"{type(fn).__qualname__} object"


def check_main_guard(start_method: str) -> None:
    """In a spawn/forkserver child still importing the parent's main module: exit at once.

    That module creates a pool and submits at import time (no
    ``if __name__ == "__main__":``). Left alone, the child would start
    workers that import the module again, and the parent would wait for
    ever. The exit status tells the parent why (see the workforce's
    startup failure).
    """
    if not getattr(multiprocessing.current_process(), "_inheriting", False):
        return
    print(f"forkref: {main_guard_message(start_method)}", file=sys.stderr, flush=True)
    os._exit(MAIN_GUARD_EXIT)
