"""What the dispatcher decides each round, under the engine lock: the workers' lives.

::

    upkeep()        queue what was submitted; mark the executor's call window running;
                    send what the workers may take (scheduler); keep `processes`
                    workers in the current generation (launcher.launch)
    watch()         the descriptors to poll: every worker's channel and exit
                    sentinel, the launcher's (a fork server's control socket)
    on_ready()      replies -> finished tasks; READY / RETIRE / INIT_FAILED;
                    launcher events -> pids, exit statuses, a lost fork server
    check_timeouts() a task running past task_timeout fails (TaskTimeoutError),
                    its worker is killed (a replacement follows at the next
                    upkeep), the tasks behind it go back to the queue
    check_deaths()  workers whose channel ended: the task each was running fails
                    (WorkerDiedError), the ones behind it go back to the queue

The :class:`~forkref._engine.dispatcher.Dispatcher` runs these from its
thread; this module owns the decisions, the dispatcher the thread and the
poll.

Non-goals: no forking (generations are forked from the caller's thread, see
:mod:`forkref._engine.submission`), no completing (done outside the lock).
"""

from __future__ import annotations

import math
import time
from typing import Any

from forkref._engine.launcher import (
    MAIN_GUARD_EXIT,
    Event,
    LaunchError,
    ServerLost,
    WorkerExited,
    WorkerStarted,
    main_guard_message,
)
from forkref._engine.model import Completion, Generation, Task, Worker, exit_text
from forkref._engine.outcomes import Outcomes
from forkref._engine.state import EngineState
from forkref._engine.wire import HDR, INIT_FAILED, READY, RETIRE
from forkref._errors import BrokenPoolError, TaskTimeoutError, WorkerDiedError
from forkref._share.taskpickle import CALL

__all__ = ["Workforce"]

_DEATH_GRACE = 1.0  # seconds to wait for an exit status after a worker's channel ended
_POLL_MS, _DEATH_POLL_MS = 1000, 50  # poll timeouts: idle, and while a death is pending
_DEADLINE_SLACK_MS = 5  # past a task's deadline, poll at least this long (no busy loop)


class Workforce:
    """Keeps one engine's workers fed and replaced; every method runs under the engine lock."""

    def __init__(self, state: EngineState, outcomes: Outcomes) -> None:
        self._state = state
        self._outcomes = outcomes

    # -- feeding and launching ----------------------------------------------------

    def upkeep(self, completions: list[Completion]) -> None:
        """Queue, commit and send tasks; start the workers the current generation lacks."""
        state = self._state
        scheduler = state.scheduler
        scheduler.drain_incoming()
        if state.commit_window:
            scheduler.commit(state.commit_window, completions)
        gen = state.generations.current()
        if gen is None and state.server_gone is not None:
            # The fork server died and no submit has forked a new generation: what
            # its dying workers put back would wait for ever.
            completions += [(t, -1, state.server_gone) for t in scheduler.take_all()]
        if gen is None or state.broken is not None or state.terminated:
            return
        active = sum(1 for w in gen.workers if w.accepting())
        # On demand, a busy worker is not given a second task while the pool can
        # still grow: the task waits for a worker of its own instead.
        growing = state.on_demand and active < state.processes
        scheduler.dispatch(gen, completions, max_depth=1 if growing else None)
        if not state.accepting and not scheduler.pending():
            self._stop_idle(gen)
            return
        wanted = state.processes - active
        if state.on_demand:
            wanted = min(wanted, len(scheduler.queue))
        for _ in range(wanted):
            if not self._launch(gen, completions):
                return
        if wanted > 0:
            scheduler.dispatch(gen, completions)  # the new workers take queued tasks

    def _launch(self, gen: Generation, completions: list[Completion]) -> bool:
        state = self._state
        try:
            channel = state.launcher.launch(gen, next(state.worker_ids))
        except LaunchError as err:
            self._outcomes.break_locked(BrokenPoolError(str(err)), completions)
            return False
        if channel is None:
            return False
        gen.workers.append(Worker(channel, gen, state.max_tasks))
        return True

    def _stop_idle(self, gen: Generation) -> None:
        """Closing: workers with nothing left to do exit; the generation follows."""
        for w in gen.workers:
            if not w.inflight:
                w.stop()
        if all(w.stopping for w in gen.workers):
            self._state.generations.retire(gen)

    # -- readiness ----------------------------------------------------------------

    def watch(self, watched: dict[int, Any]) -> int:
        """Add the descriptors to poll, each with its target; return the poll timeout in ms."""
        pending_death = False
        launcher = self._state.launcher
        for gen in self._state.generations.all:
            for fd, key in launcher.watched(gen).items():
                watched[fd] = (gen, key)
            for w in gen.workers:
                if w.live():
                    watched[w.channel.fd] = w  # type: ignore[index]
                else:
                    pending_death = True
                if w.channel.sentinel is not None and w.status is None:
                    watched[w.channel.sentinel] = (w,)
        if pending_death:
            return _DEATH_POLL_MS
        return self._until_deadline(_POLL_MS)

    def _until_deadline(self, longest: int) -> int:
        """Milliseconds until the next running task's ``task_timeout``, at most ``longest``."""
        timeout = self._state.task_timeout
        if timeout is None:
            return longest
        now = time.monotonic()
        for gen in self._state.generations.all:
            for w in gen.workers:
                since = w.running_since()
                if since is not None:
                    left = math.ceil((since + timeout - now) * 1000)
                    longest = min(longest, max(left, _DEADLINE_SLACK_MS))
        return longest

    def on_ready(self, fd: int, target: Any, completions: list[Completion]) -> None:
        """Descriptor ``fd``, added by :meth:`watch` for ``target``, is readable."""
        if isinstance(target, Worker):
            if target.live() and fd == target.channel.fd:
                self._on_worker_readable(target, completions)
        elif isinstance(target, tuple) and len(target) == 1:
            w = target[0]
            w.status = w.channel.exit_status()
        elif isinstance(target, tuple):
            gen, key = target
            for event in self._state.launcher.on_readable(gen, key):
                self._on_event(gen, event, completions)

    def _on_worker_readable(self, w: Worker, completions: list[Completion]) -> None:
        try:
            messages = w.channel.read()
        except EOFError:
            messages = None
        for message in messages or ():
            reply = self._state.scheduler.reply(w, message)
            if isinstance(reply, tuple):
                completions.append(reply)
            elif reply is not None:
                self._on_control(w, reply, message, completions)
        if messages is None:
            w.channel.close()
            w.eof_at = time.monotonic()

    def _on_control(
        self, w: Worker, op: int, message: bytearray, completions: list[Completion]
    ) -> None:
        if op == READY:
            w.ready = True
        elif op == RETIRE:
            w.stopping = True
        elif op == INIT_FAILED:
            tb = bytes(message[HDR.size :]).decode(errors="replace")
            self._outcomes.break_locked(
                BrokenPoolError(
                    f"the pool's initializer failed in worker pid {w.pid}, so the pool cannot run "
                    f"tasks. Fix the initializer; its traceback:\n{tb}"
                ),
                completions,
            )

    def _on_event(self, gen: Generation, event: Event, completions: list[Completion]) -> None:
        if isinstance(event, WorkerStarted):
            for w in gen.workers:
                if w.channel.wid == event.wid:
                    w.channel.pid = event.pid
        elif isinstance(event, WorkerExited):
            for w in gen.workers:
                if w.channel.wid == event.wid:
                    w.status = event.status
        elif isinstance(event, ServerLost):
            now = time.monotonic()
            for w in gen.workers:  # they die with it (PDEATHSIG); no status will come
                if w.eof_at is None and not w.live():
                    w.eof_at = now
            if not gen.retiring:
                self._outcomes.server_lost(gen, event, completions)

    # -- timeouts -------------------------------------------------------------------

    def check_timeouts(self, completions: list[Completion]) -> None:
        """Fail the tasks running past ``task_timeout``; kill and replace their workers."""
        timeout = self._state.task_timeout
        if timeout is None:
            return
        for gen in self._state.generations.all:
            for w in gen.workers:
                if self._overdue(w, timeout) and w.pid is not None:
                    # A reply that came in since the poll ends the task in time.
                    self._on_worker_readable(w, completions)
                    if w.live() and self._overdue(w, timeout):
                        self._time_out(w, timeout, completions)

    @staticmethod
    def _overdue(w: Worker, timeout: float) -> bool:
        since = w.running_since()
        return since is not None and time.monotonic() - since >= timeout

    def _time_out(self, w: Worker, timeout: float, completions: list[Completion]) -> None:
        # Only the first task it held was running: the others go back to the queue.
        # Its end is then that of a worker stopped with nothing in flight: no
        # WorkerDiedError, and an executor does not break.
        running = self._state.scheduler.worker_gone(w)
        assert running is not None
        w.stopping = True
        w.channel.kill()
        completions.append((running, -1, TaskTimeoutError(_timeout_message(running, timeout, w))))

    # -- deaths -------------------------------------------------------------------

    def check_deaths(self, completions: list[Completion]) -> None:
        """Forget the workers whose channel ended (once their exit status is in)."""
        generations = self._state.generations
        now = time.monotonic()
        for gen in generations.all:
            for w in list(gen.workers):
                if w.live() or w.eof_at is None:
                    continue
                if w.status is None and self._status_may_come(gen, w, now):
                    continue
                gen.workers.remove(w)
                self._worker_gone(w, completions)
                self._state.launcher.retire_channel(w.channel)
        generations.prune()

    def _status_may_come(self, gen: Generation, w: Worker, now: float) -> bool:
        assert w.eof_at is not None
        if now - w.eof_at >= _DEATH_GRACE:
            return False
        return w.channel.sentinel is not None or not self._state.launcher.server_done(gen)

    def _worker_gone(self, w: Worker, completions: list[Completion]) -> None:
        state = self._state
        if w.channel.sentinel is not None and w.status is None:
            w.status = w.channel.exit_status()
        if not w.inflight and (w.stopping or state.terminated or state.broken):
            return
        how = w.channel.describe_exit(w.status)
        running = state.scheduler.worker_gone(w)  # the tasks behind it go back to the queue
        if not w.ready and not w.stopping:
            err = BrokenPoolError(w.channel.startup_error or self._startup_failure(w, how))
            if running is not None:
                completions.append((running, -1, err))
            self._outcomes.break_locked(err, completions)
            return
        if running is not None:
            completions.append((running, -1, self._died_running(w, how)))
        if state.executor_semantics:
            self._outcomes.break_locked(
                BrokenPoolError(
                    f"a worker process (pid {w.pid}, {how}) terminated abruptly, so the executor "
                    "cannot run tasks any more; shut it down and create a new one"
                ),
                completions,
            )

    def _died_running(self, w: Worker, how: str) -> WorkerDiedError:
        cause = _death_cause(w.status)
        if w.status is None and w.gen.server is not None and self._state.launcher.server_done(
            w.gen
        ):
            cause = (
                "Its fork server is gone too, and fork workers die with their fork "
                "server: it was most likely killed (the OOM killer, kill -9)"
            )
        return WorkerDiedError(
            f"worker pid {w.pid} died ({how}) while running this task, so its result "
            f"is lost. {cause}",
            w.pid,
            w.status,
        )

    def _startup_failure(self, w: Worker, how: str) -> str:
        launcher = self._state.launcher
        if w.status == MAIN_GUARD_EXIT:
            return main_guard_message(launcher.start_method)
        if w.status is not None and w.status < 0:
            return (
                f"worker pid {w.pid} was {how} while starting, before it could run any task, so "
                "the pool is broken; create a new pool"
            )
        where = launcher.startup_hint()
        return (
            f"worker pid {w.pid} exited ({how}) before it could run any task, {where}. The pool "
            "cannot start workers, so it is broken; fix that and create a new pool"
        )


def _timeout_message(task: Task, timeout: float, w: Worker) -> str:
    fn = f"{task.name or 'the function'}()"
    fix = "raise task_timeout, or split the work into shorter tasks"
    if task.kind == CALL:
        what = f"the task {fn}"
    elif task.count == 1:
        what = f"item {task.offset} of the map of {fn}"
    else:
        last = task.offset + task.count - 1
        what = (
            f"the chunk of items {task.offset} to {last} of the map of {fn} (with chunksize > 1, "
            "task_timeout applies to each chunk as one task)"
        )
        fix = "raise task_timeout, use a smaller chunksize, or split the work into shorter tasks"
    return (
        f"{what} ran past task_timeout={timeout:g} (seconds), so forkref killed its worker "
        f"(pid {w.pid}) and started a replacement; only this task fails, the pool goes on. "
        f"To let such work finish, {fix}"
    )


def _death_cause(status: int | None) -> str:
    """What ends a worker this way, as far as the status tells."""
    if status is not None and status < 0:
        return (
            "A signal ended it: the OOM killer or a kill sends SIGKILL, a crash in native "
            "code SIGSEGV or SIGABRT. Check the task, or the system log for the OOM killer"
        )
    if status is not None:
        return (
            f"It exited with {exit_text(status)} in the middle of the task: the task (or a "
            "library it calls) ended the process, with os._exit() for instance"
        )
    return "Its exit status is unknown; check the task, and the system log for the OOM killer"
