"""Worker processes for forkref's pools: generations, a fork server per generation, one dispatcher.

How data flows (the ``fork`` start method)::

  caller thread                 dispatcher thread          zygote of gen N        workers of gen N
  -------------                 -----------------          ---------------        ----------------
  submit(fn, args)
   pickle the task: callable
   and big args -> References
   newer than gen N? --yes--> pause forkref threads, gc.freeze(),
                              fork the zygote of gen N+1 ("late objects", below)
   queue the task  --wake-->  send it to an idle worker ==================================> run it
                              read the result <======================================== result
                              complete the Future / AsyncResult (callbacks run here)
                              need a worker --"S" + socket fd--> fork ---------------> new worker
                                            <--"P" pid, "X" pid exit status--

* **Workers are forked lazily**, at the first task, so everything shared (or
  merely created) before it is inherited.
* **A zygote per generation.** The parent forks once per generation, from the
  caller's thread, while every forkref thread is paused: neither forkref's
  threads nor their locks exist in the child, and Python 3.12+'s "this
  process is multi-threaded, use of fork() may lead to deadlocks" warning is
  not triggered by forkref. The zygote is single-threaded; it forks the
  workers, and later their replacements (``maxtasksperchild``, crashes),
  which are therefore exact copies of the generation's snapshot without a
  fork from a thread of the parent (what the stdlib Pool does).
* **Late objects** (one policy, :meth:`Engine._needs_fresh_generation`): a
  task whose References were registered after generation N forked (their
  ``registry().serial()`` is above the serial recorded at the fork) makes the
  pool fork generation N+1; gen N's workers get no new tasks, finish the ones
  they hold and exit. One fork per new object, never a pickle of it
  (lambdas and closures go by value, so a new one per call does not fork:
  see :mod:`forkref._taskpickle`). At each such fork, automatic shares that
  no task uses and the caller no longer holds are released; those the
  caller still holds stay registered, so switching between live objects
  does not fork again. The other route is the shared-memory transport:
  when one export of the object (numpy, pandas, arrow, bytes) costs less
  than forking ``1 + processes`` times a parent of this size, the current
  workers fetch it from the parent instead, and no generation is forked.
* **Callbacks** (``on_done``: futures, AsyncResult callbacks) run in the
  dispatcher thread. A fork never waits for a dispatcher inside callbacks
  (a callback may submit, and wait for the forking thread's locks): it is
  detached, holding no forkref lock, finishes its callbacks and exits, and
  a new dispatcher takes over (:meth:`Engine._pause_thread`).
* **Failures.** If ``os.fork()`` fails, the tasks that needed the new
  generation fail with :class:`~forkref.ForkError` and the current one goes
  on. If a generation's zygote dies, the generation is retired (its queued
  tasks fail; the executor breaks) and the next submit forks a new one:
  workers are never forked from the dispatcher thread. Each worker has its
  own socket, so the pool knows which tasks a worker holds. A worker that
  dies shows as EOF on its socket; the zygote reaps it and reports the exit
  status; the task it was running fails with
  :class:`~forkref.WorkerDiedError` naming pid and signal, and the tasks
  queued behind it (never started) go to another worker.
* **Lifetimes.** Objects that queued tasks refer to stay registered until the
  tasks end (automatic shares are counted, explicit handles pinned), so a
  caller may drop a handle right after ``submit()`` and a later generation
  still inherits the object.
* **No orphans.** Workers die with their zygote (``PR_SET_PDEATHSIG``), a
  zygote kills its workers and exits when the parent's end of its socket
  closes (parent exit, even by SIGKILL), and the parent reaps its zygotes.

Code: this module is the parent side (the :class:`Engine` and its dispatcher
thread); :mod:`forkref._zygote` is the process side (zygote, worker loop);
:mod:`forkref._wire` frames the messages between them.

Without fork (``spawn``/``forkserver`` contexts) there are no generations:
workers are ``context.Process`` objects started by the dispatcher thread, and
tasks are pickled with the stdlib's rules.

Non-goals: no work stealing, no result streaming, no distribution over hosts.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import gc
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import BaseContext
from typing import Any

from forkref import _export
from forkref._autoshare import AutoSharer, estimate_size
from forkref._errors import (
    BrokenPoolError,
    Error,
    ForkError,
    ForkWarning,
    NotInheritedError,
    TaskPicklingError,
    WorkerDiedError,
)
from forkref._memory import MemoryReport, memory_report
from forkref._registry import Reference, registry
from forkref._taskpickle import TaskEncoder
from forkref._wire import (
    CTRL_ID,
    HDR,
    INIT_FAILED,
    OK,
    OWN_FDS,
    RETIRE,
    STOP,
    TASK,
    close_fd,
    ctrl_recv,
    ctrl_send,
    read_messages,
    send,
    send_buffer,
)
from forkref._zygote import RemoteTraceback, flush_stdio, spawned_worker_main, zygote_main

__all__ = ["Cancelled", "Engine", "default_context"]

# -- tuning ---------------------------------------------------------------------


# Per worker: tasks sent beyond the running one must fit in this many bytes, so a
# send never blocks on a full socket (a blocked dispatcher cannot read results).
# The budget is a quarter of the socket's send buffer (see wire.send_buffer),
# leaving room for the kernel's per-message overhead.
_DEPTH_SLOW, _DEPTH_FAST = 2, 32  # tasks in flight per worker; fast: service time < _FAST_TASK
_FAST_TASK = 0.005  # seconds; below this the round trip to the dispatcher would dominate
_BATCH = 64  # at most this many tasks queued at once while a map is being pickled
_DEATH_GRACE = 1.0  # seconds to wait for an exit status after a worker's EOF

#: Serializes generation forks, and the pause of forkref threads around them.
_FORK_LOCK = threading.RLock()  # re-entered when gc.collect() at a fork finalizes a pool
_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
#: Dispatchers paused while running callbacks (see Engine._pause_thread); alive until they return.
_DETACHED: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_local = threading.local()
_atexit_registered = False
_warned_threads = False


def default_context() -> BaseContext:
    """The fork context where the platform has it (whatever the default), else the default."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Cancelled(Exception):
    """Passed to ``on_done`` of a task cancelled before any worker took it."""


# -- the parent side ----------------------------------------------------------------


class _Task:
    __slots__ = ("id", "on_done", "on_start", "payload", "refs", "sent_at", "started")

    def __init__(
        self,
        task_id: int,
        payload: bytes,
        refs: list[Reference],
        on_done: Callable[[bool, Any], None],
        on_start: Callable[[], bool] | None,
    ) -> None:
        self.id = task_id
        self.payload = payload
        self.refs = refs
        self.on_done = on_done
        self.on_start = on_start
        self.started = False
        self.sent_at = 0.0


class _Worker:
    __slots__ = (
        "budget",
        "eof_at",
        "fd",
        "gen",
        "inflight",
        "inflight_bytes",
        "last_done",
        "pid",
        "prefetch_max",
        "process",
        "rbuf",
        "service",
        "status",
        "stopping",
        "wid",
    )

    def __init__(self, wid: int, fd: int, gen: _Generation, budget: int | None) -> None:
        self.wid = wid
        self.fd: int | None = fd
        self.gen = gen
        self.pid: int | None = None
        self.process: Any = None  # the multiprocessing.Process, without fork
        self.inflight: collections.deque[_Task] = collections.deque()
        self.budget = budget
        self.inflight_bytes = 0
        self.service = _FAST_TASK  # moving average of the task service time, seconds
        self.last_done = 0.0
        self.rbuf = bytearray()  # bytes read from the worker, not yet a whole message
        self.stopping = False
        os.set_blocking(fd, False)  # reads take what is there; send waits when it must
        self.prefetch_max = send_buffer(fd) // 4
        self.eof_at: float | None = None
        self.status: int | None = None


class _Generation:
    __slots__ = ("ctrl", "number", "retiring", "serial", "workers", "zygote")

    def __init__(self, number: int, serial: int, zygote: int | None, ctrl: int | None) -> None:
        self.number = number
        self.serial = serial
        self.zygote = zygote
        self.ctrl = ctrl
        self.workers: list[_Worker] = []
        self.retiring = False

    def done(self) -> bool:
        return not self.workers and self.ctrl is None and self.zygote is None


_FORK_SECONDS_PER_BYTE = 0.020 / 2**30
_EXPORT_SECONDS_PER_BYTE = 1 / 2.0e9


def _own_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _exports_cleanly(obj: object) -> bool:
    """Objects the shared-memory transport rebuilds zero-copy and can always pickle:
    bytes, numpy arrays and pandas objects without object dtype, pyarrow data."""
    if type(obj) is bytes:
        return True
    module = type(obj).__module__.partition(".")[0]
    if module == "pyarrow":
        return True
    if module == "numpy":
        return getattr(getattr(obj, "dtype", None), "kind", "O") != "O"
    if module == "pandas":
        dtypes = getattr(obj, "dtypes", None)
        if dtypes is None:
            return False
        kinds = [dtypes.kind] if hasattr(dtypes, "kind") else [d.kind for d in dtypes]
        return "O" not in kinds
    return False


class Engine:
    """The worker machinery under :class:`forkref.Pool` and :class:`forkref.ProcessPoolExecutor`.

    ``executor_semantics``: a dead worker or failed initializer breaks the
    whole engine (every pending task fails, later submits raise), as
    ``concurrent.futures`` does. Otherwise (``multiprocessing.Pool``) only
    the dead worker's tasks fail and a replacement is forked.
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
    ) -> None:
        self.context = context if context is not None else default_context()
        self.start_method = self.context.get_start_method()
        self.fork = self.start_method == "fork"
        self.processes = processes
        self.executor_semantics = executor_semantics
        self._setup = (initializer, tuple(initargs), max_tasks)
        self.sharer = AutoSharer(share_threshold, auto_share, by_reference=self.fork)
        self.encoder = TaskEncoder(self.sharer, self.fork, self.start_method)
        self._lock = threading.Lock()
        self._queue: collections.deque[_Task] = collections.deque()
        # Submitters append here without the lock (deque appends are atomic), so
        # a map being pickled never waits for the dispatcher; it drains this.
        self._incoming: collections.deque[_Task] = collections.deque()
        self._generations: list[_Generation] = []
        self._ids = itertools.count(1)
        self._wids = itertools.count(1)
        self._gen_numbers = itertools.count(1)
        self._accepting = True
        # Late references the current generation fetches through shared memory:
        # the cost decision is made once per reference, not on every task.
        self._via_shm: set[Reference] = set()
        self._via_shm_serial = -1
        self._terminated = False
        self.broken: BrokenPoolError | None = None
        self._thread: threading.Thread | None = None  # the dispatcher that owns the engine
        self._in_callbacks = False  # the owning dispatcher is running on_done callbacks
        self._pid = os.getpid()  # a plain fork() child inherits this object: not its pool
        self._finished = threading.Event()
        self._started = False
        self._wake_r, self._wake_w = os.pipe()
        OWN_FDS.update((self._wake_r, self._wake_w))
        self._woken = False
        self._poller = select.poll()
        self._watched: dict[int, Any] = {}
        _ENGINES.add(self)
        _register_atexit()

    # -- submitting (caller threads) --------------------------------------------

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
        items: Iterable[tuple[Any, Callable[[bool, Any], None], Callable[[], bool] | None, int]],
        fail_fast: bool = False,
    ) -> None:
        """Pickle and queue tasks sharing one function: ``(data, on_done, on_start, offset)``.

        The function is pickled once. A chunk that cannot be pickled gets a
        :class:`~forkref.TaskPicklingError` through its ``on_done`` (raised
        instead with ``fail_fast``); ``offset`` is the index of the chunk's
        first item in the caller's iterable, for that message.

        Raises:
            TaskPicklingError: the function cannot be pickled.
            BrokenPoolError: the engine is broken.
            RuntimeError: the engine no longer accepts tasks.
        """
        self._check_accepting()
        with self.sharer.holding():  # nothing released between pickling and queueing
            self._encode_and_enqueue(kind, fn, items, fail_fast)

    def _encode_and_enqueue(
        self,
        kind: int,
        fn: Any,
        items: Iterable[tuple[Any, Callable[[bool, Any], None], Callable[[], bool] | None, int]],
        fail_fast: bool,
    ) -> None:
        fn_blob, fn_refs = self.encoder.encode_function(fn)
        items = iter(items)
        size = 1  # the first task goes out at once; batches then grow to _BATCH
        while chunk := list(itertools.islice(items, size)):
            size = min(2 * size, _BATCH)
            with self.encoder.batch() as batch:
                tasks = []
                for data, on_done, on_start, offset in chunk:
                    try:
                        payload = batch.encode(kind, fn_blob, fn, data, offset)
                    except TaskPicklingError as err:
                        if fail_fast:
                            raise
                        on_done(False, err)
                        continue
                    tasks.append(_Task(next(self._ids), payload, [], on_done, on_start))
                refs = batch.refs + fn_refs
            if tasks:
                self._enqueue(tasks, refs)

    def _enqueue(self, tasks: list[_Task], refs: list[Reference]) -> None:
        # A batch's tasks all hold the batch's references (a slight over-count:
        # an automatic share is released at most one batch later).
        if refs:
            for task in tasks:
                task.refs = self.sharer.acquire(refs)
        try:
            self._ensure_generation(refs)
            self._check_accepting()
        except BaseException as err:  # closed or broken meanwhile: these tasks fail too
            _complete([(task, -1, err) for task in tasks], self.sharer)
            raise
        self._incoming.extend(tasks)
        if self._wake():
            # Let the dispatcher have the GIL now: a submitter still pickling the
            # rest of a map would otherwise hold it for up to the switch interval
            # (5 ms), and the workers would wait for their first task as long.
            time.sleep(0)
        if self._finished.is_set():  # lost the race with the end of the engine
            with self._lock:
                self._drain_incoming()
                lost = [t for t in self._queue if t in tasks]
                self._queue = collections.deque(t for t in self._queue if t not in tasks)
            _complete([(t, -1, RuntimeError("the pool was closed")) for t in lost], self.sharer)

    def _drain_incoming(self) -> None:
        """Move submitted tasks into the queue (under the lock)."""
        incoming = self._incoming
        while incoming:
            self._queue.append(incoming.popleft())

    def _check_accepting(self) -> None:
        if self.broken is not None:
            raise BrokenPoolError(str(self.broken))
        if not self._accepting:
            raise RuntimeError("cannot schedule new tasks after the pool was closed")

    # -- generations and the late-object policy -------------------------------------

    def _ensure_generation(self, refs: list[Reference]) -> None:
        if self._started and not self._needs_fresh_generation(refs):
            return
        with _FORK_LOCK:
            if self._started and not self._needs_fresh_generation(refs):
                return
            try:
                if self.fork:
                    self.sharer.release_idle()
                    # The export thread (shared-memory transport) stays stopped
                    # through the fork, not restarted inside it by its at-fork hook.
                    with _paused_threads(self), _export.paused():
                        self._fork_generation()
                elif not self._started:
                    with self._lock:
                        self._generations.append(_Generation(1, 0, None, None))
                self._started = True
            finally:
                # Also when the fork failed (EAGAIN, ENOMEM) or Ctrl-C came while
                # pausing: the current generation goes on serving its tasks.
                if self._started:
                    self._start_thread()

    def _needs_fresh_generation(self, refs: list[Reference]) -> bool:
        """THE late-object policy: fork a new generation iff a task refers to
        an object registered after the current generation forked.

        Forking costs one ``fork()`` of the parent plus one per worker (time
        growing with the parent's resident memory, not with the object),
        while pickling a big object costs its size on every task; so the pool
        never pickles per task. An object that exports cleanly through shared
        memory (:func:`_exports_cleanly`) goes that way instead when one
        export is cheaper than the forks (:meth:`_export_is_cheaper`).
        """
        if not self.fork:
            return False
        with self._lock:
            current = self._generations[-1] if self._generations else None
            if current is None or current.retiring:  # e.g. its fork server died
                return self._accepting
            serial = current.serial
        if not refs:
            return False
        if self._via_shm_serial != serial:  # a new generation inherited those
            self._via_shm = set()
            self._via_shm_serial = serial
        reg = registry()
        for ref in refs:
            try:
                if reg.serial(ref) <= serial:
                    continue
                if ref in self._via_shm:
                    _export.ensure_serving(ref)  # cheap; restarts a dead export thread
                    continue
                obj = reg.lookup(ref)
            except NotInheritedError:
                continue  # not ours to provide: the task fails with a clear error in the worker
            if not self._export_is_cheaper(obj):
                return True
            # The current workers fetch it from this process through shared memory.
            _export.ensure_serving(ref)
            self._via_shm.add(ref)
        return False

    def _export_is_cheaper(self, obj: object) -> bool:
        """Whether one shared-memory export of ``obj`` costs less than a new generation.

        A generation costs ``1 + processes`` forks (the zygote, then each
        worker), each copying page tables at about 20 ms per GiB of the
        parent's resident memory (4 KiB pages, measured here). An export writes
        the object once at about 3 GB/s; we count 2 GB/s to stay on the side of
        forking. Only objects that rebuild zero-copy and always pickle qualify.
        """
        if not _exports_cleanly(obj):
            return False
        size = estimate_size(obj)
        if size is None:
            return False
        rss = _own_rss()
        fork_seconds = (1 + self.processes) * rss * _FORK_SECONDS_PER_BYTE
        return size * _EXPORT_SECONDS_PER_BYTE < fork_seconds

    def _fork_generation(self) -> None:
        """Fork the zygote of a new generation; retire the previous one. Under _FORK_LOCK.

        Raises:
            ForkError: ``os.fork()`` failed; the previous generation stays current.
        """
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ctrl, zygote_ctrl = parent_end.detach(), child_end.detach()
        OWN_FDS.add(ctrl)
        serial = registry().last_serial()
        spoken = _warn_foreign_threads()
        with _frozen_gc(), warnings.catch_warnings():
            if spoken:
                # Other threads run (foreign ones, or dispatchers detached in user
                # callbacks); forkref's own are paused and spoke in its words for
                # the others. Without them the warning stays on, so a forkref
                # thread left running by mistake shows.
                warnings.filterwarnings(
                    "ignore", message=".*multi-threaded.*fork", category=DeprecationWarning
                )
            try:
                pid = os.fork()
            except OSError as err:
                close_fd(ctrl)
                os.close(zygote_ctrl)
                raise ForkError(
                    f"cannot fork the fork server of a new generation of pool workers: {err!r}; "
                    "the task was not run. Free memory or processes (ulimit -u, overcommit) "
                    "and submit it again"
                ) from err
            if pid == 0:
                code = 0
                try:
                    _reset_in_child()
                    zygote_main(zygote_ctrl, self._setup)
                except BaseException:
                    code = 1
                finally:
                    flush_stdio()
                    os._exit(code)
        os.close(zygote_ctrl)
        with self._lock:
            for old in self._generations:
                self._retire_generation(old)
            self._generations.append(_Generation(next(self._gen_numbers), serial, pid, ctrl))

    def _retire_generation(self, gen: _Generation) -> None:
        if gen.retiring:
            return
        gen.retiring = True
        for w in gen.workers:
            self._stop_worker(w)
        if gen.ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl_send(gen.ctrl, b"R")

    # -- the dispatcher thread ------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is not None or self._finished.is_set():
            return
        self._thread = threading.Thread(
            target=_dispatcher, args=(self,), name="forkref-dispatcher", daemon=True
        )
        self._thread.start()

    def _pause_thread(self) -> bool:
        """Stop the dispatcher thread (it is restarted by :meth:`_start_thread`).

        A dispatcher inside user callbacks is not waited for: a callback may
        submit work and so wait for ``_FORK_LOCK`` (or a lock of the caller's)
        held by the thread pausing it. It holds no forkref lock there (the
        registry's lock is taken by its own fork hooks), so it is *detached*
        like a foreign thread: it loses the engine and exits after its
        callbacks, and a new dispatcher takes over.
        """
        with self._lock:
            thread = self._thread
            if thread is None or thread is threading.current_thread():
                return False
            self._thread = None  # the dispatcher checks this under the lock at every step
            detached = self._in_callbacks
            self._in_callbacks = False
            self._wake_locked()
        if detached:
            _DETACHED.add(thread)
        else:
            thread.join()
            _wait_os_thread_gone(thread.native_id)
        return True

    def _wake_locked(self) -> None:
        self._wake()

    def _wake(self) -> bool:
        """Wake the dispatcher; True if this call wrote the wake-up byte."""
        # Lock-free. The dispatcher empties the pipe, *then* clears the flag, then
        # drains _incoming. A submitter that saw the flag set extended _incoming
        # before the clear, hence before that drain; one that sees it clear
        # writes a byte. Clearing before the read could swallow a submitter's
        # byte and leave the flag set on an empty pipe: a lost wake-up.
        if self._woken:
            return False
        self._woken = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        return True

    def step(self) -> bool:
        """One round of the dispatcher: returns False when the thread should end."""
        completions: list[tuple[_Task, int, Any]] = []
        with self._lock:
            if not self._owned():
                return False
            self._drain_incoming()
            self._dispatch()
            self._maintain(completions)
            if self._all_done():
                self._finish_locked()
                return False
            self._in_callbacks = bool(completions)
            timeout = self._update_poller()
            poller = self._poller
        if completions:
            self._run_callbacks(completions)
            with self._lock:
                if not self._owned():
                    return False
                timeout = self._update_poller()
                poller = self._poller
        try:
            ready = poller.poll(timeout)
        except OSError:
            ready = []
        completions = []
        with self._lock:
            if not self._owned():  # paused while polling: the fds are the new dispatcher's
                return False
            for fd, _events in ready:
                self._on_ready(fd, completions)
            self._check_deaths(completions)
            self._in_callbacks = bool(completions)
        self._run_callbacks(completions)
        return True

    def _owned(self) -> bool:
        """Whether the calling dispatcher thread still owns the engine (under the lock)."""
        return self._thread is threading.current_thread()

    def _run_callbacks(self, completions: list[tuple[_Task, int, Any]]) -> None:
        """Complete tasks while detachable (see :meth:`_pause_thread`)."""
        if not completions:
            return
        try:
            _complete(completions, self.sharer)
        finally:
            with self._lock:
                if self._owned():
                    self._in_callbacks = False

    def _update_poller(self) -> int:
        """Register the fds to watch (only when they changed); return the poll timeout in ms."""
        watched: dict[int, Any] = {self._wake_r: None}
        pending_death = False
        for gen in self._generations:
            if gen.ctrl is not None:
                watched[gen.ctrl] = gen
            for w in gen.workers:
                if w.fd is not None:
                    watched[w.fd] = w
                else:
                    pending_death = True
                if w.process is not None and w.status is None:
                    watched[w.process.sentinel] = w.process
        if watched != self._watched:
            self._poller = select.poll()
            for fd in watched:
                self._poller.register(fd, select.POLLIN)
            self._watched = watched
        return 50 if pending_death else 1000

    def _on_ready(self, fd: int, completions: list[tuple[_Task, int, Any]]) -> None:
        target = self._watched.get(fd)
        if fd == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
            self._woken = False  # after the read: see _wake
        elif isinstance(target, _Generation) and fd == target.ctrl:
            self._on_ctrl(target, completions)
        elif isinstance(target, _Worker) and fd == target.fd:
            self._on_worker_readable(target, completions)
        elif target is not None and not isinstance(target, (_Worker, _Generation)):
            for gen in self._generations:
                for w in gen.workers:
                    if w.process is target:
                        w.process.join(0)
                        w.status = w.process.exitcode

    def _on_worker_readable(self, w: _Worker, completions: list[tuple[_Task, int, Any]]) -> None:
        assert w.fd is not None
        try:
            messages = read_messages(w.fd, w.rbuf)
        except (EOFError, OSError):
            messages = None
        for message in messages or ():
            self._on_worker_message(w, message, completions)
        if messages is None:
            close_fd(w.fd)
            w.fd = None
            w.eof_at = time.monotonic()

    def _on_worker_message(
        self, w: _Worker, message: bytearray, completions: list[tuple[_Task, int, Any]]
    ) -> None:
        task_id, op = HDR.unpack_from(message)
        if op == RETIRE:
            w.stopping = True
        elif op == INIT_FAILED:
            tb = bytes(message[HDR.size :]).decode(errors="replace")
            self._break(
                BrokenPoolError(
                    f"the pool's initializer failed in worker pid {w.pid}, so the pool cannot run "
                    f"tasks; fix the initializer. Its traceback:\n{tb}"
                ),
                completions,
            )
        elif w.inflight and w.inflight[0].id == task_id:
            task = w.inflight.popleft()
            w.inflight_bytes -= len(task.payload)
            now = time.monotonic()
            w.service = 0.7 * w.service + 0.3 * (now - max(task.sent_at, w.last_done))
            w.last_done = now
            completions.append((task, op, memoryview(message)[HDR.size :]))

    def _on_ctrl(self, gen: _Generation, completions: list[tuple[_Task, int, Any]]) -> None:
        assert gen.ctrl is not None
        try:
            data, _ = ctrl_recv(gen.ctrl)
        except OSError:
            data = b""
        if not data:
            self._zygote_gone(gen, completions)
            return
        a, b = CTRL_ID.unpack_from(data, 1)
        if data[:1] == b"P":
            for w in gen.workers:
                if w.wid == a:
                    w.pid = b
        elif data[:1] == b"X":
            for w in gen.workers:
                if w.pid == a:
                    w.status = b

    def _zygote_gone(self, gen: _Generation, completions: list[tuple[_Task, int, Any]]) -> None:
        close_fd(gen.ctrl)
        gen.ctrl = None
        pid, status = gen.zygote, None
        if gen.zygote is not None:
            with contextlib.suppress(ChildProcessError):
                status = os.waitstatus_to_exitcode(os.waitpid(gen.zygote, 0)[1])
            gen.zygote = None
        now = time.monotonic()
        for w in gen.workers:  # they die with it (PDEATHSIG); no status will come
            if w.eof_at is None and w.fd is None:
                w.eof_at = now
        if not gen.retiring:
            self._fork_server_died(gen, pid, status, completions)

    def _fork_server_died(
        self,
        gen: _Generation,
        pid: int | None,
        status: int | None,
        completions: list[tuple[_Task, int, Any]],
    ) -> None:
        """The current generation's zygote died (OOM killer, kill -9): retire the generation.

        Its replacements must not be forked from this thread (Python 3.12's
        multi-threaded fork warning, and locks held by other threads): the
        next submit forks a fresh generation from the caller's thread. Tasks
        waiting in the queue fail, the executor breaks.
        """
        what = f"the pool's fork server (pid {pid}, {_exit_text(status)}) died"
        if self.executor_semantics:
            self._break(
                BrokenPoolError(
                    f"{what}, so the executor cannot start workers any more; "
                    "shut it down and create a new one"
                ),
                completions,
            )
            return
        self._retire_generation(gen)
        err = BrokenPoolError(
            f"{what} before this task started; submit it again: the next task forks "
            "a fresh generation of workers"
        )
        self._drain_incoming()
        completions += [(task, -1, err) for task in self._queue]
        self._queue.clear()

    def _check_deaths(self, completions: list[tuple[_Task, int, Any]]) -> None:
        now = time.monotonic()
        for gen in self._generations:
            for w in list(gen.workers):
                if w.fd is not None or w.eof_at is None:
                    continue
                if w.status is None and gen.ctrl is not None and now - w.eof_at < _DEATH_GRACE:
                    continue
                gen.workers.remove(w)
                self._worker_gone(w, completions)
        self._generations = [g for g in self._generations if not (g.retiring and g.done())]

    def _worker_gone(self, w: _Worker, completions: list[tuple[_Task, int, Any]]) -> None:
        if w.process is not None:
            w.process.join(1.0)
            w.status = w.process.exitcode
        if not w.inflight and (w.stopping or self._terminated or self.broken):
            return
        how = _exit_text(w.status)
        if w.inflight:
            # A worker runs its tasks in order and reports each before reading the
            # next: only the first one it held was running; the others never
            # started and go back to the front of the queue.
            running = w.inflight.popleft()
            err = WorkerDiedError(
                f"worker pid {w.pid} died ({how}) while running this task; the task's result "
                "is lost. A crash in native code, os._exit() or the OOM killer does this; "
                "check the task, or the system log for the OOM killer",
                w.pid,
                w.status,
            )
            completions.append((running, -1, err))
            self._queue.extendleft(reversed(w.inflight))
            w.inflight.clear()
        if self.executor_semantics:
            self._break(
                BrokenPoolError(
                    f"a worker process (pid {w.pid}, {how}) terminated abruptly, so the executor "
                    "cannot run tasks any more; shut it down and create a new one"
                ),
                completions,
            )

    def _break(self, err: BrokenPoolError, completions: list[tuple[_Task, int, Any]]) -> None:
        if self.broken is not None:
            return
        self.broken = err
        self._accepting = False
        self._drain_incoming()
        for task in self._queue:
            completions.append((task, -1, BrokenPoolError(str(err))))
        self._queue.clear()
        for gen in self._generations:
            for w in gen.workers:
                for task in w.inflight:
                    completions.append((task, -1, BrokenPoolError(str(err))))
                w.inflight.clear()
                self._kill_worker(w)
            self._retire_generation(gen)  # its zygote exits once the killed workers are reaped

    # -- dispatch and maintenance -----------------------------------------------------

    def _current(self) -> _Generation | None:
        gen = self._generations[-1] if self._generations else None
        return None if gen is None or gen.retiring else gen

    def _dispatch(self) -> None:
        gen = self._current()
        if gen is None:
            return
        # One depth for the generation, from its slowest worker: a depth per worker
        # let one that had run a few quick tasks take 32 slow ones while the
        # others idled (a fair share of the queue is what the stdlib gives).
        slowest = max((w.service for w in gen.workers if w.fd is not None), default=_FAST_TASK)
        depth = _DEPTH_FAST if slowest < _FAST_TASK else _DEPTH_SLOW
        while self._queue:
            w = self._pick_worker(gen, len(self._queue[0].payload), depth)
            if w is None:
                return
            task = self._queue.popleft()
            if not task.started:
                task.started = True
                if task.on_start is not None and not task.on_start():
                    self.sharer.done(task.refs)  # cancelled before it ran
                    continue
            try:
                assert w.fd is not None
                send(w.fd, HDR.pack(task.id, TASK), task.payload)
            except OSError:  # the worker just died: its EOF follows; the task waits for another
                self._queue.appendleft(task)
                w.stopping = True
                continue
            task.sent_at = time.monotonic()
            w.inflight.append(task)
            w.inflight_bytes += len(task.payload)
            if w.budget is not None:
                w.budget -= 1

    def _pick_worker(self, gen: _Generation, size: int, depth: int) -> _Worker | None:
        """The least loaded worker that may take one more task now, if any.

        A worker holds at most ``_DEPTH_SLOW`` tasks (``_DEPTH_FAST`` while its
        tasks take under ``_FAST_TASK``: then the round trip through this
        thread would starve it), and what waits behind its running task must
        fit in the worker's ``prefetch_max`` bytes (a quarter of its send buffer).
        """
        best: _Worker | None = None
        for w in gen.workers:
            if w.fd is None or w.stopping or w.budget == 0:
                continue
            n = len(w.inflight)
            if n >= depth or (n and w.inflight_bytes + size > w.prefetch_max):
                continue
            if best is None or n < len(best.inflight):
                best = w
        return best

    def _maintain(self, completions: list[tuple[_Task, int, Any]]) -> None:
        gen = self._current()
        if gen is None or self.broken is not None or self._terminated:
            return
        if not self._accepting and not self._queue and not self._incoming:
            self._stop_idle(gen)
            return
        active = [w for w in gen.workers if w.fd is not None and not w.stopping and w.budget != 0]
        for _ in range(self.processes - len(active)):
            if not self._spawn(gen, completions):
                return

    def _stop_idle(self, gen: _Generation) -> None:
        """Closing: workers with nothing left to do exit; the zygote follows."""
        for w in gen.workers:
            if not w.inflight:
                self._stop_worker(w)
        if all(w.stopping for w in gen.workers):
            self._retire_generation(gen)

    def _spawn(self, gen: _Generation, completions: list[tuple[_Task, int, Any]]) -> bool:
        wid = next(self._wids)
        max_tasks = self._setup[2]
        if gen.ctrl is not None:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fd = parent_end.detach()
            OWN_FDS.add(fd)
            try:
                ctrl_send(gen.ctrl, b"S" + CTRL_ID.pack(wid, 0), [child_end.fileno()])
            except OSError:
                close_fd(fd)
                return False
            finally:
                child_end.close()
            gen.workers.append(_Worker(wid, fd, gen, max_tasks))
            return True
        if self.fork:  # the zygote is gone: never fork from this thread (see _fork_server_died)
            return False
        return self._spawn_process(gen, wid, max_tasks, completions)

    def _spawn_process(
        self,
        gen: _Generation,
        wid: int,
        max_tasks: int | None,
        completions: list[tuple[_Task, int, Any]],
    ) -> bool:
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        process = self.context.Process(  # type: ignore[attr-defined]
            target=spawned_worker_main,
            args=(child_conn, self._setup),
            daemon=True,
            name=f"forkref-worker-{wid}",
        )
        try:
            process.start()
        except Exception as err:
            parent_conn.close()
            child_conn.close()
            self._break(
                BrokenPoolError(
                    f"cannot start a worker with the {self.start_method!r} start method: {err!r}; "
                    "the initializer and its arguments must be picklable without fork"
                ),
                completions,
            )
            return False
        child_conn.close()
        fd = os.dup(parent_conn.fileno())
        parent_conn.close()
        OWN_FDS.add(fd)
        w = _Worker(wid, fd, gen, max_tasks)
        w.pid, w.process = process.pid, process
        gen.workers.append(w)
        return True

    def _stop_worker(self, w: _Worker) -> None:
        if w.stopping:
            return
        w.stopping = True
        if w.fd is not None:
            with contextlib.suppress(OSError):
                send(w.fd, HDR.pack(0, STOP))

    def _kill_worker(self, w: _Worker) -> None:
        w.stopping = True
        if w.process is not None:
            with contextlib.suppress(Exception):
                w.process.kill()
        elif w.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(w.pid, signal.SIGKILL)
        elif w.gen.ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl_send(w.gen.ctrl, b"K")

    def _all_done(self) -> bool:
        if self._accepting or self._queue or self._incoming:
            return False
        return all(g.done() for g in self._generations)

    def _finish_locked(self) -> None:
        self._generations.clear()
        self.sharer.release_all()
        self._close_wake()
        self._finished.set()

    def _close_wake(self) -> None:
        close_fd(self._wake_r)
        close_fd(self._wake_w)
        self._wake_r = self._wake_w = -1

    # -- shutting down (caller threads) ---------------------------------------------

    def close(self) -> None:
        """No more tasks; workers exit once the queued ones are done. Idempotent."""
        if self._pid != os.getpid():  # a fork() child's copy: the workers are the parent's
            return
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
            self._wake_locked()
        if not self._started:
            with self._lock:
                self._finish_locked()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to finish and exit; True when they did."""
        if threading.current_thread() is self._thread or _is_dispatcher():
            return self._finished.is_set()
        return self._finished.wait(timeout)

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker has taken: their ``on_done`` gets a :class:`Cancelled`."""
        with self._lock:
            self._drain_incoming()
            queued = [t for t in self._queue if not t.started]
            self._queue = collections.deque(t for t in self._queue if t.started)
        _complete([(task, -1, Cancelled()) for task in queued], self.sharer)

    def terminate(self) -> None:
        """Kill every worker now; pending tasks fail. Idempotent, safe at exit and from GC."""
        if self._pid != os.getpid():  # a fork() child's copy: the workers are the parent's
            return
        with self._lock:
            if self._terminated:
                return
            self._terminated = True
            self._accepting = False
        if threading.current_thread() is not self._thread:
            with _FORK_LOCK:
                self._pause_thread()
        completions = self._kill_everything()
        _complete(completions, self.sharer)
        with self._lock:
            self._finish_locked()

    def _kill_everything(self) -> list[tuple[_Task, int, Any]]:
        completions: list[tuple[_Task, int, Any]] = []
        err = Error("the pool was terminated before this task finished")
        with self._lock:
            self._drain_incoming()
            completions += [(t, -1, err) for t in self._queue]
            self._queue.clear()
            for gen in self._generations:
                for w in gen.workers:
                    completions += [(t, -1, err) for t in w.inflight]
                    w.inflight.clear()
                    self._kill_worker(w)
                    close_fd(w.fd)
                    w.fd = None
            generations = list(self._generations)
        for gen in generations:
            _reap_generation(gen)
        return completions

    def pids(self) -> list[int]:
        """Pids of the live workers (all generations)."""
        with self._lock:
            return [
                w.pid
                for g in self._generations
                for w in g.workers
                if w.pid is not None and w.fd is not None
            ]

    def zygote_pids(self) -> list[int]:
        """Pids of the generations' fork servers."""
        with self._lock:
            return [g.zygote for g in self._generations if g.zygote is not None]

    def memory(self) -> MemoryReport:
        """USS/PSS of the parent, the workers and the generations' fork servers."""
        roles = {os.getpid(): "parent"}
        roles.update(dict.fromkeys(self.zygote_pids(), "fork server"))
        roles.update(dict.fromkeys(self.pids(), "worker"))
        return memory_report(roles)

    @property
    def generation(self) -> int:
        """Number of the current generation (0 before the first task)."""
        with self._lock:
            return self._generations[-1].number if self._generations else 0


def _reap_generation(gen: _Generation) -> None:
    """Take down a generation synchronously (terminate, exit): workers first, then the zygote."""
    for w in gen.workers:
        if w.process is not None:
            w.process.join(5.0)
    if gen.ctrl is not None:
        with contextlib.suppress(OSError):
            ctrl_send(gen.ctrl, b"K")
        close_fd(gen.ctrl)  # EOF: the zygote kills what is left and exits
        gen.ctrl = None
    if gen.zygote is not None:
        if not _wait_exit(gen.zygote, 5.0):  # a zygote that does not go is killed
            with contextlib.suppress(OSError):
                os.kill(gen.zygote, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(gen.zygote, 0)
        gen.zygote = None
    gen.workers.clear()


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until child ``pid`` has exited (not reaping it); False on timeout."""
    try:  # Linux >= 5.3: a pidfd becomes readable at exit, no polling loop
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            return bool(poller.poll(int(timeout * 1000)))
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        time.sleep(0.001)
    return False


def _complete(completions: list[tuple[_Task, int, Any]], sharer: AutoSharer) -> None:
    """Finish tasks outside the engine lock: decode, release counts, run callbacks."""
    for task, op, body in completions:
        ok, value = _decode(op, body)
        sharer.done(task.refs)
        try:
            task.on_done(ok, value)
        except BaseException:
            traceback.print_exc()


def _decode(op: int, body: Any) -> tuple[bool, Any]:
    if op == -1:
        return False, body
    try:
        if op == OK:
            return True, pickle.loads(body)
        exc, tb = pickle.loads(body)
    except Exception as err:
        what = "result" if op == OK else "exception"
        return False, TaskPicklingError(
            f"cannot unpickle the task's {what} in the parent: {err!r}; "
            "make the task return (or raise) something the parent can import"
        )
    exc.__cause__ = RemoteTraceback(tb)
    return False, exc


def _dispatcher(engine: Engine) -> None:
    """Body of the dispatcher thread."""
    _local.dispatcher = True
    try:
        while engine.step():
            pass
    except BaseException:  # never die silently: fail everything pending
        traceback.print_exc()
        engine.terminate()


# -- forks and threads ---------------------------------------------------------------


def _wait_os_thread_gone(tid: int | None) -> None:
    """Wait (briefly) until a joined thread has left the kernel's thread list too.

    ``join()`` returns when the thread's Python part has finished, an instant
    before its OS thread exits; a fork in that instant counts it, and Python
    3.12+ (which reads the count from /proc) warns that the process is
    multi-threaded.
    """
    if tid is None:
        return
    path = f"/proc/self/task/{tid}"
    deadline = time.monotonic() + 1.0
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.0001)


def _native_threads() -> int:
    """Threads of this process as the kernel counts them (Python 3.12+ warns from this count).

    More than Python knows of means native threads: a BLAS thread pool that
    numpy started, say. Those libraries handle fork themselves (their own
    ``pthread_atfork`` hooks), so forkref silences the warning they would
    cause without a warning of its own.
    """
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _is_dispatcher() -> bool:
    """Whether the calling thread is a dispatcher (owning or detached): it must not wait for one."""
    return bool(getattr(_local, "dispatcher", False))


def _reset_in_child() -> None:
    """In a new zygote: forget the parent's pools and its (held) fork lock.

    A worker may make a pool of its own; it must not wait for the parent's
    lock or pause the parent's (non-existent here) threads.
    """
    global _FORK_LOCK
    _FORK_LOCK = threading.RLock()
    _ENGINES.clear()


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    """``gc.freeze()`` around a generation fork, as CPython's gc docs recommend.

    Unlike :func:`forkref.fork_hygiene` this skips the full ``gc.collect()``
    first: on a big heap it costs ~10 ms per million tracked objects (18 ms
    with pandas merely imported), paid at every generation fork. Freezing
    alone gives the child a clean gc state (its collections never scan, so
    never dirty, the inherited objects); garbage frozen with them is only a
    child's copy-on-write share, and the parent unfreezes it right after.
    If the caller already froze (``fork_hygiene()`` around the pool), leave it.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _paused_threads(current: Engine) -> Iterator[None]:
    """Pause every forkref dispatcher thread (under _FORK_LOCK) around a fork.

    Restarts them whatever happens, even an interrupt in the middle of the
    pausing (``current`` restarts its own: see ``Engine._ensure_generation``).
    """
    paused: list[Engine] = []
    try:
        for engine in list(_ENGINES):
            if engine._pid == os.getpid() and engine._pause_thread():
                paused.append(engine)
        yield
    finally:
        for engine in paused:
            if engine is not current:
                engine._start_thread()


def _warn_foreign_threads() -> bool:
    """Warn once if foreign threads run; True if threads other than forkref's paused ones run."""
    global _warned_threads
    # Threads named "forkref-*" belong to forkref's other parts, which stop them
    # in their own os.register_at_fork hooks (the export server of _export).
    current = threading.current_thread()
    others = [
        t for t in threading.enumerate() if t is not current and not t.name.startswith("forkref-")
    ]
    detached = [t for t in list(_DETACHED) if t.is_alive() and t is not current]
    if not others or _warned_threads:
        return bool(others or detached) or _native_threads() > threading.active_count()
    _warned_threads = True
    names = ", ".join(sorted(t.name for t in others)[:5])
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("forkref"):
        frame = frame.f_back
    warnings.warn_explicit(
        f"forkref is forking pool workers while {len(others)} other thread(s) run in this "
        f"process ({names}); a lock held by one of them at the fork stays locked forever in "
        "the workers. Create the pool and submit the first task before starting threads, or "
        "pass context=multiprocessing.get_context('forkserver')",
        ForkWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__", "?"),
    )
    return True


def _register_atexit() -> None:
    global _atexit_registered
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(_at_exit)


def _at_exit() -> None:
    # As the stdlib does: executors finish their pending work, pools are terminated.
    for engine in list(_ENGINES):
        if engine._pid != os.getpid():  # inherited by a plain fork() child: not its pools
            continue
        with contextlib.suppress(Exception):
            if engine.executor_semantics:
                engine.close()
                engine.join()
            engine.terminate()
