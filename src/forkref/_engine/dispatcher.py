"""The dispatcher: the one thread per engine that moves tasks out and results back.

Like CPython's ``_ExecutorManagerThread``, one loop does it all::

    while the engine has work or workers:
        under the engine lock:
            queue the submitted tasks; mark the executor's call window running
            send what the workers may take (scheduler)
            keep `processes` workers in the current generation (launcher.launch)
        run the callbacks of finished tasks (no lock held)
        poll: the wake-up pipe, every worker's channel (and exit sentinel),
              the fork servers' control sockets
        under the engine lock:
            read replies -> finished tasks; READY / RETIRE / INIT_FAILED
            launcher events -> worker pids and exit statuses, a lost fork server
            workers whose channel ended: the task each was running fails
              (WorkerDiedError), the ones behind it go back to the queue
        run the callbacks of finished tasks (no lock held)

**Callbacks** (``on_done``: futures, AsyncResult callbacks) run in this
thread. A generation fork never waits for a dispatcher inside callbacks (a
callback may submit, and so wait for the forking thread's locks): the
dispatcher is *detached* instead, holding no forkref lock; it finishes its
callbacks and exits, and a new dispatcher takes over (:meth:`Dispatcher.pause`).

**Any exception** escaping a round (a bug, or a ``BaseException`` from code
forkref calls) ends in :meth:`Engine.fail` (the engine breaks and every
pending task fails with a clear error): never a pending future.

Non-goals: the dispatcher never forks (generations are forked from the
caller's thread) and never blocks on one worker while others wait, except
while sending a task too big to queue behind a running one.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from forkref._engine.generations import Generation, stop_worker
from forkref._engine.launcher import (
    MAIN_GUARD_EXIT,
    Event,
    LaunchError,
    ServerLost,
    WorkerExited,
    WorkerStarted,
    exit_text,
    main_guard_message,
)
from forkref._engine.scheduler import Completion, Worker
from forkref._engine.wire import HDR, INIT_FAILED, OWN_FDS, READY, RETIRE, close_fd
from forkref._errors import BrokenPoolError, WorkerDiedError, file_limit_text, is_file_limit
from forkref._fork.safe import DETACHED, mark_dispatcher, wait_os_thread_gone
from forkref._shm import export as _export

if TYPE_CHECKING:
    from forkref._engine.engine import Engine

__all__ = ["Dispatcher"]

_DEATH_GRACE = 1.0  # seconds to wait for an exit status after a worker's channel ended
_EXPORT_LISTENER = "export listener"  # marks the export socket among the watched fds


class Dispatcher:
    """The dispatcher thread of one engine, and the readiness it polls for."""

    def __init__(self, engine: Engine) -> None:
        # Weak: no cycle keeps a finished engine (and the user objects its setup
        # holds) alive; the running thread holds it strongly while it works.
        self._engine_ref = weakref.ref(engine)
        self.thread: threading.Thread | None = None
        self.in_callbacks = False  # the owning thread is running on_done callbacks
        try:
            self._wake_r, self._wake_w = os.pipe()
        except OSError as err:
            if is_file_limit(err):
                raise BrokenPoolError(file_limit_text("create a pool", err)) from err
            raise
        OWN_FDS.update((self._wake_r, self._wake_w))
        self._woken = False
        self._poller = select.poll()
        self._watched: dict[int, Any] = {}

    @property
    def _engine(self) -> Engine:
        engine = self._engine_ref()
        assert engine is not None, "a dispatcher outlived its engine"
        return engine

    # -- the thread ---------------------------------------------------------------

    def start(self) -> None:
        """Start a dispatcher thread if none owns the engine (under the engine lock or not)."""
        if self.thread is not None or self._engine.finished.is_set():
            return
        self.thread = threading.Thread(target=self._run, name="forkref-dispatcher", daemon=True)
        self.thread.start()

    def pause(self) -> bool:
        """Stop the dispatcher thread (:meth:`start` makes a new one); True if one ran.

        A dispatcher inside user callbacks is not waited for: a callback may
        submit work and so wait for FORK_LOCK (or a lock of the caller's)
        held by the thread pausing it. It holds no forkref lock there (the
        registry's lock is taken by its own fork hooks), so it is *detached*
        like a foreign thread: it loses the engine and exits after its
        callbacks.
        """
        with self._engine.lock:
            thread = self.thread
            if thread is None or thread is threading.current_thread():
                return False
            self.thread = None  # the dispatcher checks this under the lock at every step
            detached, self.in_callbacks = self.in_callbacks, False
            self.wake()
        if detached:
            DETACHED.add(thread)
        else:
            thread.join()
            wait_os_thread_gone(thread.native_id)
        return True

    def owned(self) -> bool:
        """Whether the calling thread owns the engine (under the engine lock)."""
        return self.thread is threading.current_thread()

    def wake(self) -> bool:
        """Wake the dispatcher; True if this call wrote the wake-up byte. Lock-free."""
        # The dispatcher empties the pipe, *then* clears the flag, then drains the
        # incoming tasks. A submitter that saw the flag set queued its tasks before
        # the clear, hence before that drain; one that sees it clear writes a byte.
        # Clearing before the read could swallow a submitter's byte: a lost wake-up.
        if self._woken:
            return False
        self._woken = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        return True

    def close(self) -> None:
        """Close the wake-up pipe (the engine is finished). Idempotent."""
        close_fd(self._wake_r)
        close_fd(self._wake_w)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        mark_dispatcher()
        engine = self._engine  # held until the thread ends: pending work still runs
        try:
            while self._step():
                pass
        except BaseException as err:  # a bug, or an exception no task could take
            engine.fail(err)

    # -- one round ----------------------------------------------------------------

    def _step(self) -> bool:
        engine = self._engine
        completions: list[Completion] = []
        with engine.lock:
            if not self.owned():
                return False
            self._upkeep(completions)
            if engine.all_done():
                engine.finish_locked()
                return False
            self.in_callbacks = bool(completions)
        if completions:
            self._run_callbacks(completions)
            completions = []
        with engine.lock:
            if not self.owned():
                return False
            timeout = self._update_poller()
            poller = self._poller
        try:
            ready = poller.poll(timeout)
        except OSError:
            ready = []
        with engine.lock:
            if not self.owned():  # paused while polling: the fds are the new dispatcher's
                return False
            for fd, _events in ready:
                self._on_ready(fd, completions)
            self._check_deaths(completions)
            self.in_callbacks = bool(completions)
        self._run_callbacks(completions)
        return True

    def _upkeep(self, completions: list[Completion]) -> None:
        engine = self._engine
        engine.scheduler.drain_incoming()
        if engine.commit_window:
            engine.scheduler.commit(engine.commit_window, completions)
        gen = engine.generations.current()
        if gen is None and engine.server_gone is not None:
            # The fork server died and no submit has forked a new generation: what
            # its dying workers put back would wait for ever.
            completions += [(t, -1, engine.server_gone) for t in engine.scheduler.take_all()]
        if gen is None or engine.broken is not None or engine.terminated:
            return
        active = sum(1 for w in gen.workers if w.accepting())
        # On demand, a busy worker is not given a second task while the pool can
        # still grow: the task waits for a worker of its own instead.
        growing = engine.on_demand and active < engine.processes
        engine.scheduler.dispatch(gen, completions, max_depth=1 if growing else None)
        if not engine.accepting and not engine.scheduler.pending():
            self._stop_idle(gen)
            return
        wanted = engine.processes - active
        if engine.on_demand:
            wanted = min(wanted, len(engine.scheduler.queue))
        for _ in range(wanted):
            if not self._launch(gen, completions):
                return
        if wanted > 0:
            engine.scheduler.dispatch(gen, completions)  # the new workers take queued tasks

    def _launch(self, gen: Generation, completions: list[Completion]) -> bool:
        engine = self._engine
        try:
            channel = engine.launcher.launch(gen, next(engine.wids))
        except LaunchError as err:
            engine.break_locked(BrokenPoolError(str(err)), completions)
            return False
        if channel is None:
            return False
        gen.workers.append(Worker(channel, gen, engine.max_tasks))
        return True

    def _stop_idle(self, gen: Generation) -> None:
        """Closing: workers with nothing left to do exit; the generation follows."""
        for w in gen.workers:
            if not w.inflight:
                stop_worker(w)
        if all(w.stopping for w in gen.workers):
            self._engine.generations.retire(gen)

    def _run_callbacks(self, completions: list[Completion]) -> None:
        """Complete tasks while detachable (see :meth:`pause`)."""
        if not completions:
            return
        try:
            self._engine.complete(completions)
        finally:
            with self._engine.lock:
                if self.owned():
                    self.in_callbacks = False

    # -- readiness ----------------------------------------------------------------

    def _update_poller(self) -> int:
        """Register the fds to watch (only when they changed); return the poll timeout in ms."""
        watched: dict[int, Any] = {self._wake_r: None}
        listener = _export.listener_fd()
        if listener is not None:  # a worker that did not inherit an object may knock
            watched[listener] = _EXPORT_LISTENER
        pending_death = False
        launcher = self._engine.launcher
        for gen in self._engine.generations.all:
            for fd, key in launcher.watched(gen).items():
                watched[fd] = (gen, key)
            for w in gen.workers:
                if w.live():
                    watched[w.channel.fd] = w  # type: ignore[index]
                else:
                    pending_death = True
                if w.channel.sentinel is not None and w.status is None:
                    watched[w.channel.sentinel] = (w,)
        if watched != self._watched:
            self._poller = select.poll()
            for fd in watched:
                self._poller.register(fd, select.POLLIN)
            self._watched = watched
        return 50 if pending_death else 1000

    def _on_ready(self, fd: int, completions: list[Completion]) -> None:
        target = self._watched.get(fd)
        if fd == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
            self._woken = False  # after the read: see wake()
        elif target is _EXPORT_LISTENER:
            _export.serve_pending()  # the export thread accepts it, and serves from now on
        elif isinstance(target, Worker):
            if target.live() and fd == target.channel.fd:
                self._on_worker_readable(target, completions)
        elif isinstance(target, tuple) and len(target) == 1:
            w = target[0]
            w.status = w.channel.exit_status()
        elif isinstance(target, tuple):
            gen, key = target
            for event in self._engine.launcher.on_readable(gen, key):
                self._on_event(gen, event, completions)

    def _on_worker_readable(self, w: Worker, completions: list[Completion]) -> None:
        try:
            messages = w.channel.read()
        except EOFError:
            messages = None
        for message in messages or ():
            reply = self._engine.scheduler.reply(w, message)
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
            self._engine.break_locked(
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
                self._engine.server_lost(gen, event, completions)

    # -- deaths -------------------------------------------------------------------

    def _check_deaths(self, completions: list[Completion]) -> None:
        generations = self._engine.generations
        now = time.monotonic()
        for gen in generations.all:
            for w in list(gen.workers):
                if w.live() or w.eof_at is None:
                    continue
                if w.status is None and self._status_may_come(gen, w, now):
                    continue
                gen.workers.remove(w)
                self._worker_gone(w, completions)
                self._engine.launcher.retire_channel(w.channel)
        generations.prune()

    def _status_may_come(self, gen: Generation, w: Worker, now: float) -> bool:
        assert w.eof_at is not None
        if now - w.eof_at >= _DEATH_GRACE:
            return False
        return w.channel.sentinel is not None or not self._engine.launcher.server_done(gen)

    def _worker_gone(self, w: Worker, completions: list[Completion]) -> None:
        engine = self._engine
        if w.channel.sentinel is not None and w.status is None:
            w.status = w.channel.exit_status()
        if not w.inflight and (w.stopping or engine.terminated or engine.broken):
            return
        how = w.channel.describe_exit(w.status)
        running = engine.scheduler.worker_gone(w)  # the tasks behind it go back to the queue
        if not w.ready and not w.stopping:
            err = BrokenPoolError(_startup_failure(w, how, engine))
            if running is not None:
                completions.append((running, -1, err))
            engine.break_locked(err, completions)
            return
        if running is not None:
            cause = _death_cause(w.status)
            if w.status is None and w.gen.server is not None and engine.launcher.server_done(w.gen):
                cause = (
                    "Its fork server is gone too, and fork workers die with their fork "
                    "server: it was most likely killed (the OOM killer, kill -9)"
                )
            err = WorkerDiedError(
                f"worker pid {w.pid} died ({how}) while running this task, so its result "
                f"is lost. {cause}",
                w.pid,
                w.status,
            )
            completions.append((running, -1, err))
        if engine.executor_semantics:
            engine.break_locked(
                BrokenPoolError(
                    f"a worker process (pid {w.pid}, {how}) terminated abruptly, so the executor "
                    "cannot run tasks any more; shut it down and create a new one"
                ),
                completions,
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


def _startup_failure(w: Worker, how: str, engine: Engine) -> str:
    method = engine.launcher.start_method
    if w.status == MAIN_GUARD_EXIT:
        return main_guard_message(method)
    if w.status is not None and w.status < 0:
        return (
            f"worker pid {w.pid} was {how} while starting, before it could run any task, so "
            "the pool is broken; create a new pool"
        )
    where = engine.launcher.startup_hint()
    return (
        f"worker pid {w.pid} exited ({how}) before it could run any task, {where}. The pool "
        "cannot start workers, so it is broken; fix that and create a new pool"
    )
