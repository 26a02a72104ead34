"""The dispatcher: the one thread per engine that moves tasks out and results back.

Like CPython's ``_ExecutorManagerThread``, one loop does it all::

    while the engine has work or workers:
        under the engine lock (the decisions are the workforce's,
        forkref._engine.workforce):
            workforce.upkeep: queue the submitted tasks; mark the executor's
              call window running; send what the workers may take
              (scheduler); keep `processes` workers in the current
              generation (launcher.launch)
        run the callbacks of finished tasks (no lock held): host.complete
        poll: the wake-up pipe, the export listener, and what workforce.watch
              adds: every worker's channel (and exit sentinel), the fork
              servers' control sockets
        under the engine lock:
            workforce.on_ready: replies -> finished tasks; READY / RETIRE /
              INIT_FAILED; launcher events -> worker pids and exit statuses,
              a lost fork server
            workforce.check_timeouts: a task running past task_timeout fails
              (TaskTimeoutError), its worker is killed
            workforce.check_deaths: workers whose channel ended: the task each
              was running fails (WorkerDiedError), the ones behind it go back
              to the queue
        run the callbacks of finished tasks (no lock held)

The engine it serves is a :class:`DispatcherHost`, held weakly; this module
does not import the engine.

**Callbacks** (``on_done``: futures, AsyncResult callbacks) run in this
thread. A generation fork never waits for a dispatcher inside callbacks (a
callback may submit, and so wait for the forking thread's locks): the
dispatcher is *detached* instead, holding no forkref lock; it finishes its
callbacks and exits, and a new dispatcher takes over (:meth:`Dispatcher.pause`).

**Any exception** escaping a round (a bug, or a ``BaseException`` from code
forkref calls) ends in :meth:`DispatcherHost.fail` (the engine breaks and every
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
import weakref
from typing import Any, Protocol

from forkref._engine.model import Completion
from forkref._engine.wire import OWN_FDS, close_fd
from forkref._engine.workforce import Workforce
from forkref._errors import BrokenPoolError, file_limit_text, is_file_limit
from forkref._fork.safe import DETACHED, mark_dispatcher, wait_os_thread_gone
from forkref._shm import export as _export

__all__ = ["Dispatcher", "DispatcherHost"]

_EXPORT_LISTENER = "export listener"  # marks the export socket among the watched fds


class DispatcherHost(Protocol):
    """What a dispatcher needs of the engine it serves (``Engine`` implements it)."""

    @property
    def lock(self) -> threading.Lock:
        """The engine lock: held for every decision, never while polling or in callbacks."""

    @property
    def finished(self) -> threading.Event:
        """Set once the engine has released everything: no dispatcher starts after."""

    @property
    def workforce(self) -> Workforce:
        """The decisions of each round (under the lock)."""

    def all_done(self) -> bool:
        """Under the lock: closed, no task left, no worker or fork server alive."""

    def finish_locked(self) -> None:
        """Under the lock: release everything (closes this dispatcher)."""

    def complete(self, completions: list[Completion]) -> None:
        """Run ``on_done`` of finished tasks (no lock held)."""

    def fail(self, err: BaseException, undelivered: list[Completion]) -> None:
        """The dispatcher failed with ``err``: break the engine, fail what is pending.

        ``undelivered``: tasks that had left the scheduler's books (their reply
        was read, or they were failed) but were not yet handed to :meth:`complete`.
        """


class Dispatcher:
    """The dispatcher thread of one engine, and the readiness it polls for."""

    def __init__(self, host: DispatcherHost) -> None:
        # Weak: no cycle keeps a finished engine (and the user objects its setup
        # holds) alive; the running thread holds it strongly while it works.
        self._host_ref = weakref.ref(host)
        self._pid = os.getpid()
        self.thread: threading.Thread | None = None
        self.in_callbacks = False  # the owning thread is running on_done callbacks
        # This round's completions until they are handed to complete(): if the
        # round raises, fail() must still end them, as they are on no other books.
        self._collected: list[Completion] = []
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
    def _engine(self) -> DispatcherHost:
        engine = self._host_ref()
        assert engine is not None, "a dispatcher outlived its engine"
        return engine

    # -- the thread ---------------------------------------------------------------

    def start(self) -> None:
        """Start a dispatcher thread if none owns the engine (under the engine lock or not)."""
        engine = self._host_ref()
        if engine is None or self.thread is not None or engine.finished.is_set():
            return  # (no engine: nothing left to dispatch for)
        self.thread = threading.Thread(
            target=self._run, args=(engine,), name="forkref-dispatcher", daemon=True
        )
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
        engine = self._host_ref()
        if engine is None:  # a running thread holds its engine: none runs
            return False
        with engine.lock:
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

    # -- Pausable (forkref._fork.safe): paused around every generation fork -------

    def pause_thread(self) -> bool:
        """Stop the thread around a generation fork (:meth:`pause`)."""
        return self.pause()

    def resume_thread(self) -> None:
        """Start a thread again after that fork."""
        self.start()

    def owned_by_this_process(self) -> bool:
        """False in a plain ``fork()`` child that inherited this dispatcher."""
        return self._pid == os.getpid()

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

    def _run(self, engine: DispatcherHost) -> None:
        # The thread holds its engine until it ends: pending work still runs.
        mark_dispatcher()
        try:
            while self._step():
                pass
        except BaseException as err:  # a bug, or an exception no task could take
            engine.fail(err, self._collected)

    # -- one round ----------------------------------------------------------------

    def _step(self) -> bool:
        engine = self._engine
        completions = self._collect()
        with engine.lock:
            if not self.owned():
                return False
            engine.workforce.upkeep(completions)
            if engine.all_done():
                engine.finish_locked()
                return False
            self.in_callbacks = bool(completions)
        if completions:
            self._run_callbacks(completions)
        completions = self._collect()
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
            engine.workforce.check_timeouts(completions)
            engine.workforce.check_deaths(completions)
            self.in_callbacks = bool(completions)
        self._run_callbacks(completions)
        return True

    def _collect(self) -> list[Completion]:
        """A fresh list for a round's completions, kept until they are handed over."""
        self._collected = []
        return self._collected

    def _run_callbacks(self, completions: list[Completion]) -> None:
        """Complete tasks while detachable (see :meth:`pause`)."""
        if not completions:
            return
        # Handed over: complete() ends every one of them, whatever it meets, so a
        # failure after this point must not end them a second time.
        handed, completions[:] = list(completions), []
        try:
            self._engine.complete(handed)
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
        timeout = self._engine.workforce.watch(watched)
        if watched != self._watched:
            self._poller = select.poll()
            for fd in watched:
                self._poller.register(fd, select.POLLIN)
            self._watched = watched
        return timeout

    def _on_ready(self, fd: int, completions: list[Completion]) -> None:
        target = self._watched.get(fd)
        if fd == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
            self._woken = False  # after the read: see wake()
        elif target is _EXPORT_LISTENER:
            _export.serve_pending()  # the export thread accepts it, and serves from now on
        elif target is not None:
            self._engine.workforce.on_ready(fd, target, completions)
