"""The process side of forkref's pools: the zygote of a generation and the worker loop.

A zygote is forked from the parent once per generation, single-threaded; it
forks workers on request (``"S"`` + a socket fd) and reports their pids
(``"P"``) and exit statuses (``"X"``), and kills them and exits when the
parent's end of its socket closes. A worker runs :func:`worker_loop`: the
initializer, then tasks until told to stop, EOF, or ``max_tasks``. See
:mod:`forkref._workers` for the whole picture.

Non-goals: a zygote never runs user code; a worker never forks on its own
(a pool made inside a task has its own zygote).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing.connection
import os
import pickle
import select
import signal
import sys
import traceback
import types
from collections.abc import Callable
from typing import Any

from forkref._errors import Error, TaskPicklingError
from forkref._taskpickle import CALL, MAP
from forkref._wire import (
    CTRL_ID,
    ERR,
    HDR,
    INIT_FAILED,
    OK,
    OWN_FDS,
    RETIRE,
    STOP,
    ctrl_recv,
    ctrl_send,
    recv,
    send,
)

__all__ = [
    "RemoteTraceback",
    "flush_stdio",
    "spawned_worker_main",
    "worker_loop",
    "zygote_main",
]

_ZYGOTE_POLL = 0.02  # how often a zygote reaps its children


class RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised task exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def worker_loop(
    fd: int,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    max_tasks: int | None,
) -> None:
    """Run tasks from ``fd`` until told to stop, EOF, or ``max_tasks`` done."""
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            send(fd, HDR.pack(0, INIT_FAILED), traceback.format_exc().encode())
            return
    done = 0
    while max_tasks is None or done < max_tasks:
        try:
            message = recv(fd)
        except EOFError:
            return
        task_id, op = HDR.unpack_from(message)
        if op == STOP:
            return
        reply_op, body = _run_task(memoryview(message)[HDR.size :])
        del message
        send(fd, HDR.pack(task_id, reply_op), body)
        done += 1
    send(fd, HDR.pack(0, RETIRE))


_last_function: tuple[bytes, Any] | None = None


def _load_function(blob: bytes) -> Any:
    """Unpickle a task's function; a plain function is reused while the same one comes.

    Only functions and classes are cached: a callable *instance* is unpickled
    afresh for each task, as the stdlib does, so its state never leaks
    from one task to the next.
    """
    global _last_function
    if _last_function is not None and _last_function[0] == blob:
        return _last_function[1]
    fn = pickle.loads(blob)
    if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        _last_function = (blob, fn)
    return fn


def _run_task(payload: memoryview) -> tuple[int, bytes]:
    try:
        kind, fn_blob, data = pickle.loads(payload)
        fn = _load_function(fn_blob)
    except BaseException as err:
        wrapped = Error(
            f"worker pid {os.getpid()} could not unpickle its task: {err!r}. Under spawn or "
            "forkserver, functions and classes must be importable by the workers"
        )
        return _error_reply(wrapped)
    try:
        if kind == CALL:
            args, kwargs = data
            result = fn(*args, **kwargs)
        elif kind == MAP:
            result = list(map(fn, data))
        else:
            result = list(itertools.starmap(fn, data))
    except BaseException as err:
        return _error_reply(err)
    del data, fn
    try:
        return OK, pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    except Exception as err:
        cls = type(result)
        return _error_reply(
            TaskPicklingError(
                f"cannot send the result ({cls.__module__}.{cls.__qualname__}) back from worker "
                f"pid {os.getpid()}: pickling failed with {err!r}; return picklable data"
            )
        )


def _error_reply(err: BaseException) -> tuple[int, bytes]:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    tb = f'\n"""\n{tb}"""'
    try:
        return ERR, pickle.dumps((err, tb), pickle.HIGHEST_PROTOCOL)
    except Exception as why:
        stand_in = Error(
            f"the task raised {type(err).__qualname__}: {str(err)[:1000]} "
            f"(the exception could not be pickled to send it back: {why!r})"
        )
        return ERR, pickle.dumps((stand_in, tb), pickle.HIGHEST_PROTOCOL)


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _load_prctl() -> Any:
    """libc's prctl, loaded once in the zygote so that its workers need not import ctypes."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # not Linux/glibc: workers then rely on the EOF of their socket
        return None


def _set_pdeathsig(prctl: Any, expected_parent: int) -> None:
    """Die with the zygote (Linux): a worker never outlives its generation."""
    if prctl is not None:
        with contextlib.suppress(Exception):
            prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != expected_parent:  # the zygote died before prctl took effect
        os._exit(1)


def zygote_main(ctrl: int, setup: tuple[Any, ...]) -> None:
    """Fork workers on request, report their exits, and take them down with us."""
    for fd in list(OWN_FDS):
        if fd != ctrl:
            with contextlib.suppress(OSError):
                os.close(fd)
    OWN_FDS.clear()  # those numbers are free now: a pool made in a worker starts afresh
    with contextlib.suppress(Exception):
        sys.stdin.close()
        sys.stdin = open(os.devnull)  # noqa: SIM115  (as multiprocessing does in its children)
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    prctl = _load_prctl()
    me = os.getpid()
    children: set[int] = set()
    retiring = False
    poller = select.poll()  # not select(): fd numbers may exceed FD_SETSIZE
    poller.register(ctrl, select.POLLIN)
    while not retiring or children:
        ready = poller.poll(int(1000 * (_ZYGOTE_POLL if children else 0.5)))
        if ready:
            try:
                data, fds = ctrl_recv(ctrl)
            except OSError:
                data, fds = b"", []
            if not data:  # the parent is gone or terminated the pool
                _kill_all(children)
                return
            if data[:1] == b"S":
                (wid, _) = CTRL_ID.unpack_from(data, 1)
                pid = os.fork()
                if pid == 0:
                    _worker_child(fds[0], ctrl, (me, sigint, prctl), setup)
                os.close(fds[0])
                children.add(pid)
                _zygote_report(ctrl, b"P", wid, pid, children)
            elif data[:1] == b"R":
                retiring = True
            elif data[:1] == b"K":
                _kill_all(children)
        _reap(ctrl, children)


def _zygote_report(ctrl: int, op: bytes, a: int, b: int, children: set[int]) -> None:
    try:
        ctrl_send(ctrl, op + CTRL_ID.pack(a, b))
    except OSError:  # the parent is gone
        _kill_all(children)
        os._exit(0)


def _reap(ctrl: int, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        _zygote_report(ctrl, b"X", pid, os.waitstatus_to_exitcode(status), children)


def _kill_all(children: set[int]) -> None:
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in list(children):
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
    children.clear()


def _worker_child(fd: int, ctrl: int, zygote: tuple[int, Any, Any], setup: tuple[Any, ...]) -> None:
    """A forked worker's life. ``zygote``: (its pid, the parent's SIGINT handler, prctl)."""
    code = 0
    zygote_pid, sigint, prctl = zygote
    try:
        os.close(ctrl)
        OWN_FDS.add(fd)  # a pool made in this worker closes it in its own zygote
        _set_pdeathsig(prctl, zygote_pid)
        signal.signal(signal.SIGINT, sigint)
        worker_loop(fd, *setup)
    except BaseException:
        code = 1
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        flush_stdio()
        os._exit(code)


def spawned_worker_main(
    conn: multiprocessing.connection.Connection, setup: tuple[Any, ...]
) -> None:
    """Entry point of a worker started by spawn/forkserver."""
    fd = os.dup(conn.fileno())
    conn.close()
    worker_loop(fd, *setup)
