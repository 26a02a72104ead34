"""The engine's data model: the records every part of the engine passes around.

::

    Generation  one snapshot of the parent (under fork) and its workers
      └── Worker  the dispatcher's record of one worker: its Channel and the
            │     tasks it holds, oldest (the running one) first
            └── Channel  how the worker is reached: send a Task, read replies
    Task        one call, or one chunk of a map, from submit to its Completion
    Completion  (task, op, body): what ends a task

The scheduler, the generations, the dispatcher and the launchers all import
these; this module imports none of them (only the standard library, and
lower layers for annotations), so no part of the engine needs another to name
what it works on.

Non-goals: behaviour. Apart from a worker's few predicates and a channel's
defaults, the decisions on these records are the scheduler's, the
generations' and the dispatcher's.
"""

from __future__ import annotations

import abc
import collections
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forkref._refs.registry import Reference
    from forkref._share.taskpickle import FnBlob

__all__ = [
    "FAST_TASK",
    "Cancelled",
    "Channel",
    "Completion",
    "Generation",
    "Task",
    "Worker",
    "exit_text",
]

#: A worker whose tasks take less than this (seconds) is fed deeper (see the scheduler).
FAST_TASK = 0.005

#: What ends a task: (task, op, body); op is a reply op (OK, ERR) or -1 with body an exception.
Completion = tuple["Task", int, Any]


class Cancelled(Exception):
    """Passed to ``on_done`` of a task cancelled before any worker took it."""


class Task:
    """One unit of work: a call, or a chunk of a map."""

    __slots__ = (
        "count",
        "data",
        "fn",
        "id",
        "kind",
        "name",
        "offset",
        "on_done",
        "on_start",
        "payload",
        "refs",
        "running_at",
        "sent_at",
        "size",
        "started",
    )

    def __init__(
        self,
        task_id: int,
        kind: int,
        fn: FnBlob,
        encoded: tuple[bytes | None, int],
        *,
        data: Any,
        offset: int,
        on_done: Callable[[bool, Any], None],
        on_start: Callable[[], bool] | None,
        name: str = "",
        count: int = 1,
    ) -> None:
        self.id = task_id
        self.kind = kind
        self.fn = fn
        self.payload, self.size = encoded
        # The arguments are kept only while there is no pickle of them to send.
        self.data = data if self.payload is None else None
        self.offset = offset  # index of its first item in the caller's iterable
        self.name = name  # the function's name, for messages
        self.count = count  # items of a map chunk (1 for a call)
        self.refs: list[Reference] = []
        self.on_done = on_done
        self.on_start = on_start
        self.started = False  # on_start ran: a future is marked running
        self.sent_at = 0.0
        self.running_at = 0.0  # when the worker reported calling its function (0: not yet)


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
    """One worker as the dispatcher sees it; each launcher has its own kind.

    Attributes:
        wid: the engine's number for the worker.
        pid: the worker's process id, once known (None for remote workers).
        fd: readable when replies (or the end) arrive; None once closed.
        sentinel: readable when the worker has exited, where the launcher
            has such a descriptor; then :meth:`exit_status` tells how.
        startup_error: set by a launcher that knows why its worker could not
            start (a Ray actor that no node had room for); a channel that
            ends before READY breaks the pool with this message as it is.
        prefetch_max: bytes of tasks that may wait behind the running one
            without blocking :meth:`send`.
    """

    wid: int
    pid: int | None
    fd: int | None
    sentinel: int | None = None
    prefetch_max: int = 1 << 16
    startup_error: str | None = None

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

    @abc.abstractmethod
    def close(self) -> None:
        """Close the parent's end and set :attr:`fd` to None. Idempotent."""

    def exit_status(self) -> int | None:
        """The exit status once :attr:`sentinel` is readable (None if unknown)."""
        return None

    def describe_exit(self, status: int | None) -> str:
        """How the worker ended, for messages."""
        return exit_text(status)

    def stdlib_process(self) -> Any:
        """The worker's ``multiprocessing.Process`` when this process may use it as one.

        None when there is none, or when it is not this process's child (a
        ``forkserver`` worker): then the engine shows a view built on
        signals and the exit status the launcher reports.
        """
        return None


class Generation:
    """One generation: its number, the registry serial it started at, its workers."""

    __slots__ = ("fork_seq", "number", "retiring", "serial", "server", "workers")

    def __init__(self, number: int, serial: int) -> None:
        self.number = number
        self.serial = serial
        self.fork_seq = 0  # forkrecord.last_fork() right after its fork (0: none)
        self.workers: list[Worker] = []
        self.retiring = False
        self.server: Any = None  # the launcher's record of its fork server, if any


class Worker:
    """The dispatcher's record of one worker: its channel and the tasks it holds."""

    __slots__ = (
        "budget",
        "channel",
        "eof_at",
        "gen",
        "inflight",
        "inflight_bytes",
        "last_done",
        "ready",
        "service",
        "status",
        "stopping",
    )

    def __init__(self, channel: Channel, gen: Generation, budget: int | None) -> None:
        self.channel = channel
        self.gen = gen
        self.inflight: collections.deque[Task] = collections.deque()
        self.inflight_bytes = 0
        self.budget = budget  # tasks it may still take (maxtasksperchild), None: no limit
        self.service = FAST_TASK  # moving average of the task service time, seconds
        self.last_done = 0.0
        self.ready = False  # READY received: started, initializer done
        self.stopping = False
        self.eof_at: float | None = None  # when its channel reached its end
        self.status: int | None = None  # exit status, once known

    @property
    def pid(self) -> int | None:
        """The worker's pid, once known."""
        return self.channel.pid

    def live(self) -> bool:
        """Its channel is open (it may still take tasks unless stopping)."""
        return self.channel.fd is not None

    def accepting(self) -> bool:
        """It may be given more tasks."""
        return self.live() and not self.stopping and self.budget != 0

    def running_since(self) -> float | None:
        """When the task it runs reported its start (``STARTED``); None: none has yet.

        Only the first task a worker holds can run (it takes them in order),
        and workers report starts only in pools with a ``task_timeout``.
        """
        if not self.inflight:
            return None
        return self.inflight[0].running_at or None

    def stop(self) -> None:
        """Ask the worker to exit once it has finished what it holds. Idempotent."""
        if not self.stopping:
            self.stopping = True
            self.channel.stop()
