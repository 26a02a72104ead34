"""The worker side of forkref's pools: one loop that runs tasks from a socket.

A worker, forked by a generation's zygote or started by ``context.Process``,
runs :func:`worker_loop` on its socket::

    initializer(*initargs)  --fails-->  INIT_FAILED + traceback, exit
    READY
    loop: FN id blob       -> remember the pickled function under its id
          TASK id fn payload -> unpickle fn and data [-> STARTED id, with a task_timeout]
                                -> run fn on the data -> OK result | ERR (exc, tb)
          STOP or EOF      -> exit
    after max_tasks: RETIRE, exit

A worker started by spawn or forkserver also watches its parent
(:class:`ParentWatch`) and exits at once if the parent dies, even in the
middle of a task: forked workers get the same from ``PR_SET_PDEATHSIG``.

Non-goals: a worker never forks on its own (a pool made inside a task has its
own zygote), and never shares state between tasks except the functions it
caches (plain functions and classes only; a callable instance is unpickled
afresh for every task, as the stdlib does).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing.connection
import os
import pickle
import secrets
import select
import sys
import threading
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forkref._engine.wire import (
    ERR,
    FN,
    FNID,
    HDR,
    INIT_FAILED,
    OK,
    READY,
    RETIRE,
    STARTED,
    STOP,
    recv,
    send,
)
from forkref._errors import Error, ResultPicklingError
from forkref._refs.registry import set_pool_worker
from forkref._share.taskpickle import CALL, MAP
from forkref._shm import autoresult, export

__all__ = [
    "MAX_FUNCTIONS",
    "Functions",
    "ParentWatch",
    "WorkerSetup",
    "error_reply",
    "execute",
    "flush_stdio",
    "spawned_worker_main",
    "worker_loop",
]

#: Pickled functions a worker keeps; a channel in the parent counts the same, and both
#: drop the oldest first, so they always agree on what the worker has.
MAX_FUNCTIONS = 32


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker of a pool starts with (pickled for spawn/forkserver workers).

    Attributes:
        initializer: called as ``initializer(*initargs)`` before any task.
        initargs: its arguments.
        max_tasks: the worker exits after this many tasks (None: never).
        start_method: the pool's start method, for error messages.
        executor: ``concurrent.futures`` semantics (log a failing initializer
            through its logger, as the stdlib does) instead of ``multiprocessing.Pool``'s.
        result_threshold: numpy/pandas/arrow parts of a result this big or bigger
            go back through shared memory (``forkref._shm.autoresult``); None: never.
        report_start: send ``STARTED`` as each task's function is called (the
            pool has a ``task_timeout``, whose clock starts then).
        owner: the pid results go to: the process that made this setup (the
            pool's parent), whatever process forks the workers.
        result_key: this pool's, in the names of its result segments, so the
            parent can sweep those of replies it never read.
    """

    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    max_tasks: int | None
    start_method: str
    executor: bool
    result_threshold: int | None = autoresult.DEFAULT_THRESHOLD
    report_start: bool = False
    owner: int = field(default_factory=os.getpid)
    result_key: str = field(default_factory=lambda: secrets.token_hex(6))


def worker_loop(fd: int, setup: WorkerSetup) -> None:
    """Run tasks from ``fd`` until told to stop, EOF, or ``setup.max_tasks`` done."""
    autoresult.serve(setup.owner, setup.result_key)
    if not _initialize(fd, setup):
        return
    send(fd, HDR.pack(0, READY))
    functions = Functions()
    done = 0
    while setup.max_tasks is None or done < setup.max_tasks:
        try:
            message = recv(fd)
        except EOFError:
            return
        ident, op = HDR.unpack_from(message)
        if op == STOP:
            return
        if op == FN:
            functions.add(ident, bytes(message[HDR.size :]))
            continue
        # Between tasks: let go of shared-memory copies the parent released
        # (one word read when nothing changed).
        export.before_task()
        reply_op, body = _run_task(functions, memoryview(message)[HDR.size :], setup, fd, ident)
        del message
        # Before the send: once the parent has the reply, this worker may die
        # at any moment (killed, or by its next task) and the segments must stay.
        autoresult.hand_over()
        send(fd, HDR.pack(ident, reply_op), body)
        done += 1
    send(fd, HDR.pack(0, RETIRE))


def _initialize(fd: int, setup: WorkerSetup) -> bool:
    set_pool_worker(setup.start_method)  # errors raised here fit their advice to the pool
    if setup.initializer is None:
        return True
    try:
        setup.initializer(*setup.initargs)
    except BaseException:
        if setup.executor:  # what concurrent.futures' own workers do
            logging.getLogger("concurrent.futures").critical(
                "Exception in initializer:", exc_info=True
            )
        else:  # what a multiprocessing.Pool worker dying of it prints
            print(f"Process forkref worker pid {os.getpid()}:", file=sys.stderr)
            traceback.print_exc()
        report = traceback.format_exc().encode()
        _flush_before_reporting()
        send(fd, HDR.pack(0, INIT_FAILED), report)
        return False
    return True


def _flush_before_reporting() -> None:
    """Deliver what the failing initializer logged before the parent hears of the failure.

    A log handler may write through a ``multiprocessing.Queue``, whose feeder
    thread sends later; the stdlib's worker flushes it by running
    multiprocessing's exit finalizers as it exits. The parent breaks the
    pool (and kills the workers) as soon as INIT_FAILED arrives, so run them
    now. Only finalizers made in this process run (each checks its pid).
    """
    import multiprocessing.util

    flush_stdio()
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers(0)  # type: ignore[attr-defined]
        multiprocessing.util._run_finalizers()  # type: ignore[attr-defined]


class Functions:
    """The pickled functions this worker was sent, by id (the parent evicts in the same order)."""

    def __init__(self) -> None:
        self._blobs: dict[int, bytes] = {}
        self._loaded: dict[int, Any] = {}

    def add(self, fn_id: int, blob: bytes) -> None:
        self._blobs[fn_id] = blob
        if len(self._blobs) > MAX_FUNCTIONS:
            oldest = next(iter(self._blobs))
            del self._blobs[oldest]
            self._loaded.pop(oldest, None)

    def get(self, fn_id: int) -> Any:
        fn = self._loaded.get(fn_id)
        if fn is not None:
            return fn
        fn = pickle.loads(self._blobs[fn_id])
        if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
            self._loaded[fn_id] = fn
        return fn


def _run_task(
    functions: Functions, body: memoryview, setup: WorkerSetup, fd: int, ident: int
) -> tuple[int, bytes]:
    try:
        (fn_id,) = FNID.unpack_from(body)
        kind, data = pickle.loads(body[FNID.size :])
        fn = functions.get(fn_id)
    except BaseException as err:
        return error_reply(Error(_unpickle_failure(err, setup.start_method)))
    if setup.report_start:
        # Not before: importing the function's module (spawn, forkserver) is not the task's time.
        send(fd, HDR.pack(ident, STARTED))
    threshold = setup.result_threshold
    return execute(kind, fn, data, lambda obj: autoresult.dumps(obj, threshold))


def _dumps(obj: object) -> bytes:
    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def execute(
    kind: int, fn: Any, data: Any, dumps: Callable[[object], bytes] = _dumps, who: str = "worker"
) -> tuple[int, bytes]:
    """Run one unpickled task; its reply: ``(OK, pickled result)`` or ``(ERR, ...)``.

    Every worker runs its tasks through here (a Ray actor with its own
    ``dumps`` and ``who``): whatever is raised, the task gets a reply.
    """
    try:
        if kind == CALL:
            args, kwargs = data
            result = fn(*args, **kwargs)
        elif kind == MAP:
            result = list(map(fn, data))
        else:
            result = list(itertools.starmap(fn, data))
    except BaseException as err:
        return error_reply(err, dumps)
    del data, fn
    try:
        return OK, dumps(result)
    except Exception as err:
        cls = type(result)
        return error_reply(
            ResultPicklingError(
                f"cannot send the result ({cls.__module__}.{cls.__qualname__}) back from {who} "
                f"pid {os.getpid()}: pickling failed with {err!r}. Return picklable data",
                err,
                result,
            ),
            dumps,
        )
    except BaseException as err:  # SystemExit from a __reduce__: the task's error, as the stdlib
        return error_reply(err, dumps)


def _unpickle_failure(err: BaseException, start_method: str) -> str:
    head = f"worker pid {os.getpid()} could not unpickle its task: {err!r}."
    if not isinstance(err, (AttributeError, ImportError)):
        return (
            f"{head} The unpickling of an argument raised it (its __reduce__, __setstate__ or "
            "reconstructor); make that object unpickle in a fresh process"
        )
    if start_method == "fork":
        return (
            f"{head} A forked worker holds what existed in the parent when its generation "
            "forked and looks everything else up by name, so a function or class defined "
            "after the pool's first task is not there: define it before the first task"
        )
    return (
        f"{head} A worker started by {start_method!r} imports by name the functions and "
        "classes of the task that belong to a module (those of __main__ travel by value), "
        "so that module must be importable there: on the worker's sys.path, or installed. "
        "Or use the 'fork' start method"
    )


def error_reply(err: BaseException, dumps: Callable[[object], bytes] = _dumps) -> tuple[int, bytes]:
    """``(ERR, pickled (exception, traceback text))``; a stand-in if ``err`` cannot be pickled."""
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    tb = f'\n"""\n{tb}"""'
    try:
        return ERR, dumps((err, tb))
    except BaseException as why:
        stand_in = Error(
            f"the task raised {type(err).__qualname__}: {str(err)[:1000]} "
            f"(the exception could not be pickled to send it back: {why!r})"
        )
        return ERR, pickle.dumps((stand_in, tb), pickle.HIGHEST_PROTOCOL)


def flush_stdio() -> None:
    """Flush stdout and stderr, ignoring errors (before ``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


class ParentWatch:
    """A thread that kills this (spawn/forkserver) worker the moment its parent dies.

    A forked worker dies with its zygote through ``PR_SET_PDEATHSIG``; that
    signal follows the *thread* that started the process, so it cannot serve
    workers started from a pool's dispatcher thread. This watches the
    parent's sentinel instead (EOF when the parent exits, however it dies).
    The thread stops around a ``fork()`` in the worker (a task may fork), so
    it never exists in a child and never makes Python 3.12+ warn.
    """

    def __init__(self, sentinel: int) -> None:
        self._sentinel = sentinel
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        os.register_at_fork(
            before=self._stop, after_in_parent=self.start, after_in_child=self._forget
        )

    def start(self) -> None:
        """Start watching (again)."""
        self._thread = threading.Thread(
            target=self._watch, name="forkref-parent-watch", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        ready, _, _ = select.select([self._sentinel, self._wake_r], [], [])
        if self._sentinel in ready:
            flush_stdio()
            os._exit(1)  # the parent is gone: nobody will read what this task returns
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 1)

    def _stop(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            os.write(self._wake_w, b"x")
            thread.join()
            from forkref._fork.safe import wait_os_thread_gone

            wait_os_thread_gone(thread.native_id)
        self._thread = None

    def _forget(self) -> None:
        # The child of a task that forked: not a pool worker, nothing to watch.
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def spawned_worker_main(conn: multiprocessing.connection.Connection, setup: WorkerSetup) -> None:
    """Entry point of a worker started by spawn/forkserver (``context.Process`` target)."""
    fd = os.dup(conn.fileno())
    conn.close()
    parent = multiprocessing.parent_process()
    if parent is not None and parent.sentinel is not None:
        ParentWatch(parent.sentinel).start()
    worker_loop(fd, setup)
