"""Worker processes as ``multiprocessing.Process``-like objects, for code that reaches into pools.

Code written for the stdlib pools often uses private attributes:
``ProcessPoolExecutor._processes`` (pid to ``Process``: kill a worker, wait
for it) and ``multiprocessing.Pool._pool``. A spawn worker is shown as its
very ``Process`` object. A worker forked by a fork server (a generation's, or
the stdlib's ``forkserver``) is not a child of the parent, so it is shown as
a :class:`ForkedWorker`: the same methods (``pid``, ``is_alive()``,
``terminate()``, ``kill()``, ``join()``, ``exitcode``), built on signals and
on the exit status the fork server reports. (A ``forkserver`` Process reads
that status from a pipe once: the dispatcher reads it, and a second reader in
another thread would get EOF and exit code 255.)

Non-goals: ``start()``, ``close()`` and the rest of ``Process``: these
objects only look at and stop workers the pool owns.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from typing import Any

from forkref._engine.model import Worker
from forkref._os import process_running

__all__ = ["ForkedWorker", "process_view"]


def process_view(worker: Worker) -> Any:
    """The ``multiprocessing.Process`` of ``worker``, or a :class:`ForkedWorker` view of it."""
    process = worker.channel.stdlib_process()
    return process if process is not None else ForkedWorker(worker)


class ForkedWorker:
    """A worker forked by a fork server, with the ``multiprocessing.Process`` methods code uses."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.pid: int = worker.pid or 0
        self.name = f"forkref-worker-{worker.channel.wid}"

    def __repr__(self) -> str:
        return f"<ForkedWorker pid={self.pid} exitcode={self.exitcode}>"

    @property
    def exitcode(self) -> int | None:
        """The exit status (negative: the signal) once it has exited, else None."""
        return self._worker.status

    def is_alive(self) -> bool:
        """Whether the process still runs (a zombie counts as exited)."""
        if self._worker.status is not None:
            return False
        return process_running(self.pid)

    def terminate(self) -> None:
        """Send SIGTERM."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the process has exited, at most ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            pidfd = None
        try:
            while self.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return
                if pidfd is not None:
                    poller = select.poll()
                    poller.register(pidfd, select.POLLIN)
                    poller.poll(100 if left is None else int(min(left, 0.1) * 1000))
                else:
                    time.sleep(0.01)
        finally:
            if pidfd is not None:
                os.close(pidfd)
        # Gone: its fork server reports the exit status a moment later.
        settle = time.monotonic() + 1.0
        while self._worker.status is None and time.monotonic() < settle:
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(0.005)
