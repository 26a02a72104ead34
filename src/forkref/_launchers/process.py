"""The ``spawn`` and ``forkserver`` launcher: one ``context.Process`` per worker.

::

    dispatcher thread                                   worker process
    launch(gen, wid): context.Pipe() + context.Process(spawned_worker_main)
                      process.start() --------------------> imports the main module,
                                                            unpickles the setup,
      ProcessChannel(fd, process) <====== socket =======>   worker_loop(fd)
      sentinel readable --> exit_status() (read without reaping)
      retire_channel()  --> process.join(0) reaps it

There is one generation and no fork server: every worker is started on its
own, and shared objects reach it through shared memory (``inherits = False``).

Non-goals: starting workers ahead of need; the engine decides when to launch.
"""

from __future__ import annotations

import contextlib
import errno
import os
from multiprocessing.context import BaseContext
from typing import Any

from forkref._engine.launcher import (
    MAIN_GUARD_EXIT,
    Launcher,
    LaunchError,
    SocketChannel,
    main_guard_message,
)
from forkref._engine.model import Channel, Generation
from forkref._engine.worker import WorkerSetup, spawned_worker_main
from forkref._errors import file_limit_text, is_file_limit, near_file_limit
from forkref._shm import autoresult

__all__ = ["ProcessChannel", "ProcessLauncher"]


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

    def stdlib_process(self) -> Any:
        # A forkserver worker is the fork server's child, not ours: its Process
        # reads the exit status from a pipe once, and the dispatcher does.
        return self.process if self.process._start_method != "forkserver" else None


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
            if not isinstance(err, Exception):
                raise  # Ctrl-C, SystemExit: the caller's, not a launch failure
            raise LaunchError(self._start_failure(err)) from err
        child_conn.close()
        parent_conn.close()
        return ProcessChannel(wid, fd, process)

    def _start_failure(self, err: BaseException) -> str:
        if is_file_limit(err):
            assert isinstance(err, OSError)
            what = f"start a pool worker with the {self.start_method!r} start method"
            return file_limit_text(what, err)
        if self.start_method == "forkserver" and _forkserver_exit() == MAIN_GUARD_EXIT:
            return main_guard_message("forkserver")
        lost = isinstance(err, (EOFError, ConnectionError))
        if self.start_method == "forkserver" and lost and near_file_limit(margin=64):
            # The forkserver dropped the request or died (its traceback is on stderr).
            # It has this process's limit, and holds the descriptors of every request
            # in flight besides its own, so it runs out while this process still has a
            # few dozen left (18 were left in one run): the margin is wide on purpose.
            step = (
                "start a pool worker: the 'forkserver' process, which has this process's "
                "limits, gave up on the request or exited"
            )
            return file_limit_text(step, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        needs = "the main module must be importable"
        if self.setup.initializer is not None:
            needs = "the initializer and its arguments must be picklable, and " + needs
        return (
            f"cannot start a worker with the {self.start_method!r} start method: {err!r}. "
            f"Without fork, {needs}"
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
        # Every reply the pool will read has been read: results in the others go.
        autoresult.sweep(self.setup.result_key)
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
