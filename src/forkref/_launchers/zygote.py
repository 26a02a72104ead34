"""The ``fork`` launcher: one fork server ("zygote") per generation of workers.

Parent side (:class:`ZygoteLauncher`) and process side (:func:`zygote_main`)::

    caller thread (FORK_LOCK, forkref threads paused, gc frozen)
      fork ----------------------------------------------> zygote of generation N
                                                            (single-threaded; never
    dispatcher thread                                        runs user code)
      launch(gen, wid): "S" wid + socket fd (SCM_RIGHTS) ---> fork ---> worker
                        <--- "P" wid pid                              worker_loop(fd)
                        <--- "X" pid exit status (it reaped one)
      retire(gen):      "R"  (exit once the workers have)
      kill_all(gen):    "K"  (SIGKILL every worker)
      EOF on the control socket, either way: the other side is gone

Workers are exact copies of the generation's snapshot of the parent, forked
without a thread of the parent ever calling ``fork()``; replacements
(``maxtasksperchild``, crashes) come from the same snapshot. A worker dies
with its zygote (``PR_SET_PDEATHSIG``), and a zygote kills its workers and
exits when the parent's end of its control socket closes (the parent exited,
even by SIGKILL).

Non-goals: a zygote never runs user code; it exists only to fork.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from forkref._engine.launcher import (
    Event,
    Launcher,
    LaunchError,
    ServerLost,
    SocketChannel,
    WorkerExited,
    WorkerStarted,
)
from forkref._engine.model import Channel, Generation
from forkref._engine.wire import CTRL_ID, OWN_FDS, close_fd, ctrl_recv, ctrl_send
from forkref._engine.worker import WorkerSetup, flush_stdio, worker_loop
from forkref._errors import ForkError, file_limit_text, is_file_limit
from forkref._fork.safe import fork_child
from forkref._refs import forkrecord
from forkref._shm import autoresult

__all__ = ["ZygoteLauncher", "zygote_main"]

_ZYGOTE_POLL = 0.02  # how often a zygote reaps its children


# -- parent side ----------------------------------------------------------------


class _Server:
    """A generation's zygote as the parent sees it."""

    __slots__ = ("ctrl", "pid", "wids")

    def __init__(self, pid: int, ctrl: int) -> None:
        self.pid: int | None = pid
        self.ctrl: int | None = ctrl
        self.wids: dict[int, int] = {}  # worker pid -> wid


class _ZygoteChannel(SocketChannel):
    def __init__(self, wid: int, fd: int, server: _Server) -> None:
        super().__init__(wid, fd)
        self._server = server

    def kill(self) -> None:
        if self.pid is not None:
            super().kill()
        elif self._server.ctrl is not None:  # not forked yet, or its pid not reported yet
            with contextlib.suppress(OSError):
                ctrl_send(self._server.ctrl, b"K")


class ZygoteLauncher(Launcher):
    """Workers forked by a single-threaded fork server per generation (``fork``)."""

    name = "zygote"
    inherits = True
    start_method = "fork"

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup

    def start_generation(self, gen: Generation) -> None:
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as err:
            if is_file_limit(err):
                what = "start a new generation of pool workers (its fork server's socket)"
                raise ForkError(file_limit_text(what, err)) from err
            raise
        ctrl, zygote_ctrl = parent_end.detach(), child_end.detach()
        OWN_FDS.add(ctrl)
        try:
            pid = fork_child(
                lambda: zygote_main(zygote_ctrl, self.setup),
                "the fork server of a new generation of pool workers",
            )
        except BaseException:
            close_fd(ctrl)
            raise
        finally:
            os.close(zygote_ctrl)
        gen.server = _Server(pid, ctrl)

    def launch(self, gen: Generation, wid: int) -> Channel | None:
        server: _Server = gen.server
        if server.ctrl is None:  # the zygote is gone; never fork from this thread instead
            return None
        try:
            parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:
            if is_file_limit(err):
                raise LaunchError(file_limit_text("start a pool worker", err)) from err
            raise
        fd = parent_end.detach()
        try:
            ctrl_send(server.ctrl, b"S" + CTRL_ID.pack(wid, 0), [child_end.fileno()])
        except OSError:
            os.close(fd)
            return None
        finally:
            child_end.close()
        return _ZygoteChannel(wid, fd, server)

    def watched(self, gen: Generation) -> dict[int, Any]:
        server: _Server = gen.server
        return {} if server.ctrl is None else {server.ctrl: server}

    def on_readable(self, gen: Generation, key: Any) -> list[Event]:
        server: _Server = gen.server
        assert server.ctrl is not None
        try:
            data, _ = ctrl_recv(server.ctrl)
        except OSError:
            data = b""
        if not data:
            return [self._lost(server)]
        a, b = CTRL_ID.unpack_from(data, 1)
        if data[:1] == b"P":
            server.wids[b] = a
            return [WorkerStarted(a, b)]
        if data[:1] == b"X" and a in server.wids:
            return [WorkerExited(server.wids.pop(a), b)]
        return []

    def _lost(self, server: _Server) -> ServerLost:
        close_fd(server.ctrl)
        server.ctrl = None
        pid, status = server.pid, None
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            server.pid = None
        return ServerLost(pid, status)

    def retire(self, gen: Generation) -> None:
        server: _Server = gen.server
        if server.ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl_send(server.ctrl, b"R")

    def kill_all(self, gen: Generation) -> None:
        server: _Server = gen.server
        if server.ctrl is not None:
            with contextlib.suppress(OSError):
                ctrl_send(server.ctrl, b"K")
        super().kill_all(gen)

    def reap(self, gen: Generation, timeout: float) -> None:
        """Kill the workers and the zygote at once, then wait until all are gone.

        Killed together, their address spaces (each mapping the parent's heap)
        are torn down side by side rather than one after the other. A worker
        the zygote forked that this side has no pid of yet dies with the
        zygote (``PR_SET_PDEATHSIG``).
        """
        server: _Server = gen.server
        self.kill_all(gen)
        close_fd(server.ctrl)
        server.ctrl = None
        if server.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(server.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(server.pid, 0)
            server.pid = None
        deadline = time.monotonic() + timeout
        for w in gen.workers:  # no longer the zygote's children: waited for, not reaped
            if w.channel.pid is not None:
                _wait_exit(w.channel.pid, max(0.0, deadline - time.monotonic()))

    def server_done(self, gen: Generation) -> bool:
        server: _Server = gen.server
        return server.ctrl is None and server.pid is None

    def server_pids(self, gen: Generation) -> list[int]:
        server: _Server = gen.server
        return [] if server.pid is None else [server.pid]

    def close(self) -> None:
        # Every reply the pool will read has been read: results in the others go.
        autoresult.sweep(self.setup.result_key)
        # The initializer's arguments are the caller's: not kept past the end.
        self.setup = WorkerSetup(None, (), None, "fork", executor=False)


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


# -- process side ---------------------------------------------------------------


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


def zygote_main(ctrl: int, setup: WorkerSetup) -> None:
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
    # Its workers inherit the fork record the parent made for this generation;
    # nothing the zygote holds is ever shared, so its own forks record nothing.
    forkrecord.set_enabled(False)
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


def _worker_child(fd: int, ctrl: int, zygote: tuple[int, Any, Any], setup: WorkerSetup) -> None:
    """A forked worker's life. ``zygote``: (its pid, the parent's SIGINT handler, prctl)."""
    code = 0
    zygote_pid, sigint, prctl = zygote
    try:
        os.close(ctrl)
        forkrecord.set_enabled(True)  # a pool made in a task records its own forks
        OWN_FDS.add(fd)  # a pool made in this worker closes it in its own zygote
        _set_pdeathsig(prctl, zygote_pid)
        signal.signal(signal.SIGINT, sigint)
        worker_loop(fd, setup)
    except BaseException:
        code = 1
        with contextlib.suppress(Exception):
            import traceback

            traceback.print_exc()
    finally:
        flush_stdio()
        os._exit(code)
