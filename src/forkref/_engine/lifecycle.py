"""The end of an engine: closing, terminating, failing, and the last release.

::

    close()      no more tasks; the dispatcher stops workers as they go idle,
                 and finishes the engine once all_done()
    terminate()  pause the dispatcher; kill every worker; fail what is pending
                 ("terminated"); reap; finish
    fail(err)    the dispatcher thread failed: break (every pending task fails),
                 then terminate
    finish_locked()  release the automatic shares, the dispatcher's pipe and the
                 launcher; set ``finished`` (join() returns)

Every step is idempotent and safe at interpreter exit and from a finalizer;
a plain ``fork()`` child that inherited the engine does nothing.

Non-goals: no restart; a finished engine stays finished.
"""

from __future__ import annotations

import contextlib
import threading
import traceback

from forkref._engine.dispatcher import Dispatcher
from forkref._engine.model import Cancelled, Completion
from forkref._engine.outcomes import Outcomes
from forkref._engine.state import EngineState
from forkref._errors import BrokenPoolError, Error
from forkref._fork.safe import FORK_LOCK, is_dispatcher

__all__ = ["Lifecycle"]


class Lifecycle:
    """Closes, terminates and finishes one engine."""

    def __init__(self, state: EngineState, outcomes: Outcomes, dispatcher: Dispatcher) -> None:
        self._state = state
        self._outcomes = outcomes
        self._dispatcher = dispatcher

    # -- the end (under the lock) ---------------------------------------------------

    def all_done(self) -> bool:
        """No task left and no worker or fork server alive, and closed."""
        state = self._state
        if state.accepting or state.scheduler.pending():
            return False
        return all(state.generations.done(g) for g in state.generations.all)

    def finish_locked(self) -> None:
        """Release everything; waiters of :meth:`join` return."""
        state = self._state
        state.generations.all.clear()
        state.sharer.release_all()
        self._dispatcher.close()
        state.launcher.close()
        state.finished.set()

    # -- caller threads -------------------------------------------------------------

    def close(self) -> None:
        """No more tasks; workers exit once the queued ones are done. Idempotent."""
        state = self._state
        if not state.owned_by_this_process():
            return
        with state.lock:
            if not state.accepting:
                return
            state.accepting = False
            self._dispatcher.wake()
            if not state.started:
                self.finish_locked()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to finish and exit; True when they did."""
        if self._dispatcher.thread is threading.current_thread() or is_dispatcher():
            return self._state.finished.is_set()
        return self._state.finished.wait(timeout)

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker has taken: their ``on_done`` gets a :class:`Cancelled`."""
        with self._state.lock:
            queued = self._state.scheduler.cancel_queued()
        self._outcomes.complete([(task, -1, Cancelled()) for task in queued])

    def terminate(self) -> None:
        """Kill every worker now; pending tasks fail. Idempotent, safe at exit and from GC."""
        state = self._state
        if not state.owned_by_this_process():
            return
        with state.lock:
            if state.terminated:
                return
            state.terminated = True
            state.accepting = False
        if threading.current_thread() is not self._dispatcher.thread:
            with FORK_LOCK:
                self._dispatcher.pause()
        completions = self._kill_everything()
        self._outcomes.complete(completions)
        with state.lock:
            self.finish_locked()

    def fail(self, err: BaseException, undelivered: list[Completion]) -> None:
        """The dispatcher thread failed: break, fail everything pending, kill the workers.

        ``undelivered`` (the failed round's completions, on no other books) end
        as they were collected, with the rest.
        """
        with contextlib.suppress(Exception):
            traceback.print_exception(type(err), err, err.__traceback__)
        completions: list[Completion] = list(undelivered)
        undelivered.clear()
        with self._state.lock:
            self._outcomes.break_locked(
                BrokenPoolError(
                    f"forkref's dispatcher thread failed with {err!r}, so the pool cannot run "
                    "tasks any more (this is a bug in forkref: please report it with the "
                    "traceback printed above); create a new pool"
                ),
                completions,
            )
        self._outcomes.complete(completions)
        self.terminate()

    def _kill_everything(self) -> list[Completion]:
        state = self._state
        err = Error("the pool was terminated before this task finished")
        with state.lock:
            completions: list[Completion] = [(t, -1, err) for t in state.scheduler.take_all()]
            for gen in state.generations.all:
                for w in gen.workers:
                    completions += [(t, -1, err) for t in w.inflight]
                    w.inflight.clear()
                    w.stopping = True
                state.launcher.kill_all(gen)
            generations = list(state.generations.all)
        for gen in generations:
            state.launcher.reap(gen, 5.0)
            for w in gen.workers:
                w.channel.close()
            gen.workers.clear()
        return completions
