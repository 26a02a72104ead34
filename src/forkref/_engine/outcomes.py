"""How tasks end: completing them, and failing them when the engine breaks.

::

    reply (task, OK | ERR, body) --decode--> on_done(True, result) | on_done(False, exc)
    (task, -1, exception)        ----------> on_done(False, exception)

    break_locked(err)   every queued and in-flight task fails with err; workers
                        killed; generations retired; later submits raise err
    server_lost(gen)    the fork server died: the executor breaks; a Pool fails
                        what is queued and forks a new generation at the next submit

Completions are collected under the engine lock and run (:meth:`Outcomes.complete`)
outside it: ``on_done`` runs user callbacks, which may submit.

Non-goals: no retry. A task whose worker died fails; running it again is
the caller's choice.
"""

from __future__ import annotations

import concurrent.futures.process
import multiprocessing.pool
import pickle
import traceback
from typing import Any

from forkref._engine.launcher import ServerLost
from forkref._engine.model import Completion, Generation, exit_text
from forkref._engine.state import EngineState
from forkref._engine.wire import OK
from forkref._errors import BrokenPoolError, TaskPicklingError

__all__ = ["Outcomes", "decode"]


class Outcomes:
    """Completes the tasks of one engine, and breaks it."""

    def __init__(self, state: EngineState) -> None:
        self._state = state

    def complete(self, completions: list[Completion]) -> None:
        """Finish tasks outside the engine lock: decode, release, run ``on_done``.

        Whatever is raised on the way (a result whose unpickling raises
        ``SystemExit``, a callback raising ``KeyboardInterrupt``), every task
        of ``completions`` ends: a failed decode fails that task alone.
        """
        state = self._state
        for task, op, body in completions:
            ok, value = decode(op, body, state.executor_semantics)
            # Neither a failing release nor a raising callback may keep the tasks
            # after it from ending.
            _guarded(state.sharer.done, task.refs)
            _guarded(task.on_done, ok, value)

    def break_locked(self, err: BrokenPoolError, completions: list[Completion]) -> None:
        """The engine cannot run tasks any more: fail every pending task with ``err``."""
        state = self._state
        if state.broken is not None:
            return
        state.broken = err
        state.accepting = False
        for task in state.scheduler.take_all():
            completions.append((task, -1, BrokenPoolError(str(err))))
        for gen in state.generations.all:
            for w in gen.workers:
                for task in w.inflight:
                    completions.append((task, -1, BrokenPoolError(str(err))))
                w.inflight.clear()
                w.stopping = True
            state.launcher.kill_all(gen)
            state.generations.retire(gen)  # its server exits once the killed workers are reaped

    def server_lost(
        self, gen: Generation, event: ServerLost, completions: list[Completion]
    ) -> None:
        """The current generation's fork server died (OOM killer, kill -9): retire it.

        Its replacements must not be forked from the dispatcher thread (Python
        3.12's multi-threaded fork warning, and locks held by other threads):
        the next submit forks a fresh generation from the caller's thread.
        Tasks waiting in the queue fail; the executor breaks.
        """
        state = self._state
        what = f"the pool's fork server (pid {event.pid}, {exit_text(event.status)}) died"
        if state.executor_semantics:
            self.break_locked(
                BrokenPoolError(
                    f"{what}, so the executor cannot start workers any more; "
                    "shut it down and create a new one"
                ),
                completions,
            )
            return
        state.generations.retire(gen)
        err = BrokenPoolError(
            f"{what} before this task started; submit it again: the next task forks "
            "a fresh generation of workers"
        )
        # Also the tasks its dying workers put back later (Workforce.upkeep).
        state.server_gone = err
        completions += [(task, -1, err) for task in state.scheduler.take_all()]


def _guarded(step: Any, *args: Any) -> None:
    try:
        step(*args)
    except BaseException:
        traceback.print_exc()


def decode(op: int, body: Any, executor: bool) -> tuple[bool, Any]:
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
