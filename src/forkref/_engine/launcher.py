"""The seam between a pool's engine and the processes that run its tasks.

A :class:`Launcher` starts the workers of one engine, generation by
generation; each worker is reached through a :class:`Channel`. The engine
only ever polls the channels' file descriptors, sends tasks, reads framed
replies and asks the launcher to start, stop or kill workers, so the
launchers are interchangeable::

    engine (dispatcher thread)                 launcher            workers
    --------------------------                 --------            -------
    start_generation(gen)   [caller's thread]  zygote: fork a fork server
    launch(gen, wid) ------------------------> new worker ------> Channel
    channel.send(task) ==========================================> runs it
    channel.read() <============================================= replies
    poll(channel.fd, channel.sentinel, launcher.watched(gen))
      -> launcher.on_readable(gen, key) -> WorkerStarted / WorkerExited / ServerLost

Implementations:

* ``ZygoteLauncher`` (:mod:`forkref._launchers.zygote`, the ``fork`` start method):
  a fork server per generation forks the workers; they *inherit* the
  parent as it was when the generation forked (``inherits = True``).
* :class:`ProcessLauncher` (``spawn`` and ``forkserver``): one
  ``context.Process`` per worker; shared objects reach workers through
  shared memory (``inherits = False``).
* A distributed backend is one more launcher whose channels front remote
  workers.

Non-goals: a launcher does not schedule tasks or decide on generations;
the engine does (:mod:`forkref._engine.scheduler`, :mod:`forkref._engine.generations`).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import errno
import os
import signal
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING, Any

from forkref._engine.wire import (
    FN,
    FNID,
    HDR,
    OWN_FDS,
    STOP,
    TASK,
    close_fd,
    read_messages,
    send,
    send_buffer,
)
from forkref._engine.worker import MAX_FUNCTIONS, WorkerSetup, spawned_worker_main
from forkref._errors import file_limit_text, is_file_limit, near_file_limit

if TYPE_CHECKING:
    from forkref._engine.generations import Generation
    from forkref._engine.scheduler import Task
    from forkref._memory.report import MemoryReport
    from forkref._share.autoshare import AutoSharer
    from forkref._share.taskpickle import TaskEncoder

__all__ = [
    "MAIN_GUARD_EXIT",
    "Channel",
    "Event",
    "LaunchError",
    "Launcher",
    "ProcessLauncher",
    "ServerLost",
    "SocketChannel",
    "WorkerExited",
    "WorkerStarted",
    "exit_text",
]

#: Exit status of a spawn/forkserver child that tried to use a pool while it was
#: still importing the parent's main module (see forkref._engine.engine.check_main_guard).
MAIN_GUARD_EXIT = 78


@dataclass(frozen=True)
class WorkerStarted:
    """The launcher learned the pid of worker ``wid``."""

    wid: int
    pid: int


@dataclass(frozen=True)
class WorkerExited:
    """Worker ``wid`` exited with ``status`` (negative: killed by that signal)."""

    wid: int
    status: int | None


@dataclass(frozen=True)
class ServerLost:
    """The generation's fork server (pid ``pid``) died: no more workers from it."""

    pid: int | None
    status: int | None


Event = WorkerStarted | WorkerExited | ServerLost


class LaunchError(Exception):
    """A worker cannot be started: the engine breaks with this message."""


def exit_text(code: int | None) -> str:
    """``exit code 3``, ``killed by signal SIGKILL`` or ``exit status unknown``."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Channel(abc.ABC):
    """One worker as the dispatcher sees it.

    Attributes:
        wid: the engine's number for the worker.
        pid: the worker's process id, once known (None for remote workers).
        fd: readable when replies (or the end) arrive; None once closed.
        sentinel: readable when the worker has exited, where the launcher
            has such a descriptor; then :meth:`exit_status` tells how.
        prefetch_max: bytes of tasks that may wait behind the running one
            without blocking :meth:`send`.
    """

    wid: int
    pid: int | None
    fd: int | None
    sentinel: int | None = None
    prefetch_max: int = 1 << 16

    @abc.abstractmethod
    def send(self, task: Task) -> None:
        """Send one encoded task. Raises OSError when the worker is gone."""

    @abc.abstractmethod
    def read(self) -> list[bytearray]:
        """The complete replies readable now. Raises EOFError at the end."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask the worker to exit once it has finished what it holds."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the worker now."""

    def exit_status(self) -> int | None:
        """The exit status once :attr:`sentinel` is readable (None if unknown)."""
        return None

    def describe_exit(self, status: int | None) -> str:
        """How the worker ended, for messages."""
        return exit_text(status)

    def close(self) -> None:
        """Close the parent's end. Idempotent."""
        close_fd(self.fd)
        self.fd = None


class SocketChannel(Channel):
    """A local worker behind one ``AF_UNIX`` stream socket, speaking :mod:`forkref._engine.wire`."""

    def __init__(self, wid: int, fd: int) -> None:
        self.wid = wid
        self.pid = None
        self.fd = fd
        OWN_FDS.add(fd)
        os.set_blocking(fd, False)  # reads take what is there; send waits when it must
        self.prefetch_max = send_buffer(fd) // 4
        self._rbuf = bytearray()  # bytes read, not yet a whole message
        # Functions this worker has been sent, oldest first; the worker drops the
        # oldest at the same count, so both sides always agree on what it has.
        self._functions: collections.OrderedDict[int, None] = collections.OrderedDict()

    def send(self, task: Task) -> None:
        assert self.fd is not None
        assert task.payload is not None
        fn = task.fn
        if fn.id not in self._functions:
            send(self.fd, HDR.pack(fn.id, FN), fn.blob)
            self._functions[fn.id] = None
            if len(self._functions) > MAX_FUNCTIONS:
                self._functions.popitem(last=False)
        send(self.fd, HDR.pack(task.id, TASK), FNID.pack(fn.id), task.payload)

    def read(self) -> list[bytearray]:
        assert self.fd is not None
        try:
            return read_messages(self.fd, self._rbuf)
        except OSError as err:
            raise EOFError from err

    def stop(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                send(self.fd, HDR.pack(0, STOP))

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)


class Launcher(abc.ABC):
    """Starts and stops the workers of one engine.

    Attributes:
        name: ``"zygote"``, ``"process"``, ...
        inherits: workers are forks of their generation's snapshot of the
            parent, so references registered before the generation started
            resolve there by inheritance (and later ones need a new
            generation or a transport).
        start_method: the ``multiprocessing`` start method, for messages.
    """

    name: str
    inherits: bool
    start_method: str

    @property
    def carries_references(self) -> bool:
        """Whether references reach these workers without a pickle of the object per task.

        True when they inherit it, or when the launcher has its own transport
        for shared objects (an object store): then big arguments go by
        reference. False: they are pickled with every task, as the stdlib does.
        """
        return self.inherits

    def encoder(self, sharer: AutoSharer) -> TaskEncoder:
        """The task pickler for these workers."""
        from forkref._share.taskpickle import TaskEncoder

        return TaskEncoder(sharer, self.inherits, self.start_method)

    def startup_hint(self) -> str:
        """Where a worker that died before it could run a task failed, for the message."""
        if self.start_method == "fork":
            return "in the pool's initializer"
        return (
            f"while starting: a worker started by {self.start_method!r} imports the main module "
            "and unpickles the initializer before anything else, and its own traceback (above, "
            "on stderr) names the error"
        )

    def memory(self, roles: dict[int, str]) -> MemoryReport:
        """Memory of the processes in ``roles`` (pid -> role), plus what the launcher adds."""
        from forkref._memory.report import memory_report

        return memory_report(roles)

    @abc.abstractmethod
    def start_generation(self, gen: Generation) -> None:
        """Prepare generation ``gen``; called from the caller's thread under FORK_LOCK.

        Raises:
            ForkError: the generation's fork server could not be forked.
        """

    @abc.abstractmethod
    def launch(self, gen: Generation, wid: int) -> Channel | None:
        """Start worker ``wid`` of ``gen`` (dispatcher thread); None: not possible now.

        Raises:
            LaunchError: workers cannot be started at all (the engine breaks).
        """

    def watched(self, gen: Generation) -> dict[int, Any]:
        """Descriptors of ``gen``'s fork server to poll, each with a key for :meth:`on_readable`."""
        return {}

    def on_readable(self, gen: Generation, key: Any) -> list[Event]:
        """Handle a readable descriptor of :meth:`watched`."""
        return []

    def retire(self, gen: Generation) -> None:
        """No more workers from ``gen``; its server exits once its workers have."""
        return None

    def retire_channel(self, channel: Channel) -> None:
        """Worker ``channel`` is gone and forgotten by the engine (reap what needs reaping)."""
        return None

    def kill_all(self, gen: Generation) -> None:
        """Kill every worker of ``gen`` now."""
        for w in gen.workers:
            w.channel.kill()

    def reap(self, gen: Generation, timeout: float) -> None:
        """Take ``gen`` down synchronously (terminate, interpreter exit)."""
        return None

    def server_done(self, gen: Generation) -> bool:
        """Whether ``gen``'s fork server (if it has one) is gone."""
        return True

    def server_pids(self, gen: Generation) -> list[int]:
        """Pids of ``gen``'s helper processes (a fork server), for memory reports."""
        return []

    def close(self) -> None:
        """The engine is finished: release what the launcher holds. Idempotent."""
        return None


class ProcessChannel(SocketChannel):
    """A worker that is a ``multiprocessing.Process`` (spawn or forkserver)."""

    def __init__(self, wid: int, fd: int, process: Any) -> None:
        super().__init__(wid, fd)
        self.process = process
        self.pid = process.pid
        self.sentinel = process.sentinel

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.process.kill()

    def exit_status(self) -> int | None:
        # Read without reaping (WNOWAIT): code that holds this Process (the
        # executor's _processes) may join it at the same moment, and two
        # threads reaping one child make one of them see it alive after join().
        known: int | None = self.process._popen.returncode
        if known is not None:
            return known
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Not this process's child (a forkserver worker: the server sends its
            # status down the sentinel, which Process reads), or just reaped.
            code: int | None = self.process.exitcode
            return code
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class ProcessLauncher(Launcher):
    """Workers started as ``context.Process`` (``spawn``, ``forkserver``): one generation."""

    name = "process"
    inherits = False

    def __init__(self, context: BaseContext, setup: WorkerSetup) -> None:
        self.context = context
        self.start_method = context.get_start_method()
        self.setup = setup

    def start_generation(self, gen: Generation) -> None:
        """Nothing to fork: workers are started one by one."""

    def launch(self, gen: Generation, wid: int) -> Channel:
        try:
            parent_conn, child_conn = self.context.Pipe(duplex=True)
        except OSError as err:  # EMFILE: the pool is at the open-file limit
            raise LaunchError(self._start_failure(err)) from err
        process = self.context.Process(  # type: ignore[attr-defined]
            target=spawned_worker_main,
            args=(child_conn, self.setup),
            daemon=True,
            name=f"forkref-worker-{wid}",
        )
        try:
            process.start()
            fd = os.dup(parent_conn.fileno())
        except BaseException as err:
            parent_conn.close()
            child_conn.close()
            if process._popen is not None:  # started, but no descriptor left to reach it
                process.kill()
                process.join()
                _release_process(process)
            raise LaunchError(self._start_failure(err)) from err
        child_conn.close()
        parent_conn.close()
        return ProcessChannel(wid, fd, process)

    def _start_failure(self, err: BaseException) -> str:
        if is_file_limit(err):
            assert isinstance(err, OSError)
            return file_limit_text(
                f"start a pool worker with the {self.start_method!r} start method", err
            )
        if self.start_method == "forkserver" and _forkserver_exit() == MAIN_GUARD_EXIT:
            return main_guard_message("forkserver")
        lost = isinstance(err, (EOFError, ConnectionError))
        if self.start_method == "forkserver" and lost and near_file_limit():
            # The forkserver dropped the request or died (its traceback is on stderr).
            # It has this process's limit, and this process is within a few files of it.
            step = (
                "start a pool worker: the 'forkserver' process, which has this process's "
                "limits, gave up on the request or exited"
            )
            return file_limit_text(step, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        return (
            f"cannot start a worker with the {self.start_method!r} start method: {err!r}. "
            "The initializer and its arguments must be picklable, and the main module "
            "importable, without fork"
        )

    def reap(self, gen: Generation, timeout: float) -> None:
        for w in gen.workers:
            channel = w.channel
            if isinstance(channel, ProcessChannel):
                channel.process.join(timeout)
                _release_process(channel.process)

    def retire_channel(self, channel: Channel) -> None:
        """A worker is gone: reap its process (its exit status was read without reaping)."""
        if isinstance(channel, ProcessChannel):
            channel.process.join(0)
            _release_process(channel.process)

    def close(self) -> None:
        # The initializer's arguments may be anything of the caller's (a Queue
        # whose semaphores the resource tracker counts): not kept past the end.
        self.setup = _NO_SETUP


_NO_SETUP = WorkerSetup(None, (), None, "", executor=False)


def _release_process(process: Any) -> None:
    """Close the descriptors of an exited, reaped worker's ``Popen`` now.

    Its sentinel pipe (and, under spawn, the pipe its preparation data went
    down) would otherwise stay open until the ``Popen`` is collected, and the
    engine's objects reach it through reference cycles: with the cyclic GC
    off, or before it runs, every closed pool kept two descriptors per worker.
    ``Popen.close()`` leaves the Process usable (``exitcode``, ``join()``,
    ``is_alive()`` read the saved status), unlike ``Process.close()``, which
    would break code that still holds it from ``_processes``.
    """
    popen = process._popen
    if popen is not None and popen.returncode is not None:
        popen.close()


def main_guard_message(start_method: str) -> str:
    """The error for a pool used while a spawn/forkserver child imports the main module."""
    return (
        f"the {start_method!r} start method runs the parent's main module again in every "
        "new process, and that module creates a forkref pool and submits to it at import "
        "time, so each new process would start another pool. Put the code that uses the "
        'pool under if __name__ == "__main__": in the main module'
    )


def _forkserver_exit() -> int | None:
    """Exit status of the stdlib's forkserver process if it has died, else None."""
    try:
        from multiprocessing import forkserver

        pid = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    except (ImportError, AttributeError):
        return None
    if not pid:
        return None
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, OSError):
        return None
    return None if result is None else result.si_status
