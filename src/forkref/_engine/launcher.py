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

This module is the interface only: :class:`Launcher`, the
:class:`~forkref._engine.model.Channel` a worker is reached through (its
home is :mod:`forkref._engine.model`), :class:`SocketChannel` for local
workers, and the events a launcher reports. The implementations live
above the engine, in :mod:`forkref._launchers`, which also picks one per
pool (:mod:`forkref._launchers.choose`); the engine is handed its launcher
and never names one:

* ``ZygoteLauncher`` (:mod:`forkref._launchers.zygote`, the ``fork`` start method):
  a fork server per generation forks the workers; they *inherit* the
  parent as it was when the generation forked (``inherits = True``).
* ``ProcessLauncher`` (:mod:`forkref._launchers.process`, ``spawn`` and
  ``forkserver``): one ``context.Process`` per worker; shared objects reach
  workers through shared memory (``inherits = False``).
* ``RayLauncher`` (:mod:`forkref._launchers.ray.launcher`): channels that
  front Ray actors, possibly on other hosts.

Non-goals: a launcher does not schedule tasks or decide on generations;
the engine does (:mod:`forkref._engine.scheduler`, :mod:`forkref._engine.generations`).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from forkref._engine.model import Channel, Generation, Task, exit_text
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
from forkref._engine.worker import MAX_FUNCTIONS

if TYPE_CHECKING:
    from forkref._memory.report import MemoryReport
    from forkref._share.autoshare import AutoSharer
    from forkref._share.taskpickle import TaskEncoder

__all__ = [
    "MAIN_GUARD_EXIT",
    "Channel",
    "Event",
    "LaunchError",
    "Launcher",
    "ServerLost",
    "SocketChannel",
    "WorkerExited",
    "WorkerStarted",
    "exit_text",
]

#: Exit status of a spawn/forkserver child that tried to use a pool while it was
#: still importing the parent's main module (see forkref._engine.submission.check_main_guard).
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

    def close(self) -> None:
        close_fd(self.fd)
        self.fd = None


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


def main_guard_message(start_method: str) -> str:
    """The error for a pool used while a spawn/forkserver child imports the main module."""
    return (
        f"the {start_method!r} start method runs the parent's main module again in every "
        "new process, and that module creates a forkref pool and submits to it at import "
        "time, so each new process would start another pool. Put the code that uses the "
        'pool under if __name__ == "__main__": in the main module'
    )
