"""``forkref.ProcessPoolExecutor``: ``concurrent.futures``' API over forkref's workers.

Swap ``from concurrent.futures import ProcessPoolExecutor`` for
``from forkref import ProcessPoolExecutor``. Futures are the stdlib's
``concurrent.futures.Future``, so ``wait()``, ``as_completed()`` and
callbacks work unchanged. Failures keep the stdlib's shape: a worker that
dies, or an initializer that fails, breaks the executor; the futures it held
raise :class:`~forkref.WorkerDiedError` (naming pid and signal) and the other
pending ones :class:`~forkref.BrokenPoolError`, both subclasses of
``concurrent.futures.process.BrokenProcessPool``.

Differences from the stdlib, all in the user's favour: fork is the default
start method (also on Python 3.14, whose default is forkserver), and
``max_tasks_per_child`` works with it, because replacements are forked by
the generation's single-threaded fork server rather than by a thread of the
parent; lambdas and closures work as task functions; big arguments travel by
reference (see :class:`forkref.Pool`); an argument or result that cannot be
pickled fails its own future and leaves the executor working.

Non-goals: ``map(buffersize=...)`` (Python 3.14) is not supported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from forkref._engine.model import Cancelled
from forkref._errors import BrokenPoolError, ReleasedError, TaskPicklingError
from forkref._pools.base import (
    DEFAULT_RESULT_THRESHOLD,
    DEFAULT_THRESHOLD,
    EngineLifetime,
    PoolBase,
)
from forkref._pools.progress import Progress, ProgressOption, counted
from forkref._pools.results import chunked
from forkref._share.taskpickle import CALL, STARMAP

__all__ = ["ProcessPoolExecutor"]

T = TypeVar("T")

# Set once the interpreter starts to exit, before atexit callbacks run (as the
# stdlib's executor does): a submit from one of those then says why it fails.
_global_shutdown = False
_exit_hook_registered = False


def _python_exit() -> None:
    global _global_shutdown
    _global_shutdown = True


def _register_exit_hook() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        with contextlib.suppress(RuntimeError):  # already shutting down
            threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


def _completer(future: Future[Any]) -> Callable[[bool, Any], None]:
    def on_done(ok: bool, value: Any) -> None:
        if isinstance(value, Cancelled):
            future.cancel()
            return
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except concurrent.futures.InvalidStateError:
            pass  # cancelled meanwhile

    return on_done


class ProcessPoolExecutor(PoolBase, concurrent.futures.Executor):
    """A drop-in ``concurrent.futures.ProcessPoolExecutor``; big objects reach workers by reference.

    Args:
        max_workers: number of workers (default ``os.cpu_count()``).
        mp_context: a ``multiprocessing`` context; default ``fork`` where available.
        initializer: called as ``initializer(*initargs)`` in each worker at start.
        initargs: arguments of ``initializer``.
        max_tasks_per_child: a worker exits after this many tasks and a fresh
            one is forked from the generation's snapshot (works with fork).
        share_threshold: see :class:`forkref.Pool` (default 1 MiB; ``None``: off).
        auto_share: see :class:`forkref.Pool`.
        result_threshold: big numpy/pandas/arrow results come back through
            shared memory; see :class:`forkref.Pool` (default 1 MiB; ``None``: off).
        backend: ``"local"`` or ``"ray"``; see :class:`forkref.Pool`.
        address: the Ray cluster for ``backend="ray"``; see :class:`forkref.Pool`.
        task_timeout: seconds a task may run once a worker starts it; past
            that its future fails with :class:`~forkref.TaskTimeoutError`, its
            worker is replaced, and the executor goes on (it does not break).
    """

    __module__ = "forkref"

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        *,
        max_tasks_per_child: int | None = None,
        share_threshold: int | None = DEFAULT_THRESHOLD,
        auto_share: bool = False,
        backend: str = "local",
        address: str | None = None,
        result_threshold: int | None = DEFAULT_RESULT_THRESHOLD,
        task_timeout: float | None = None,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._start_engine(
            max_workers,
            mp_context,
            initializer=initializer,
            initargs=initargs,
            max_tasks=max_tasks_per_child,
            executor_semantics=True,
            share_threshold=share_threshold,
            auto_share=auto_share,
            backend=backend,
            address=address,
            result_threshold=result_threshold,
            task_timeout=task_timeout,
        )
        self._shutdown_lock = threading.Lock()
        self._shutdown_thread = False
        _register_exit_hook()
        # Collected without shutdown(): like the stdlib, pending work still runs, then workers exit.
        self._finalizer = weakref.finalize(self, self._engine.close)

    @property
    def _broken(self) -> str | bool:
        broken = self._engine.broken
        return str(broken) if broken is not None else False

    @property
    def _processes(self) -> dict[int, Any]:
        """pid -> process of every live worker, as the stdlib's executor has it."""
        return self._worker_processes()

    @property
    def _executor_manager_thread(self) -> EngineLifetime | None:
        """The stdlib's manager thread, as far as code uses it: ``join()`` after a shutdown."""
        return EngineLifetime(self._engine) if self._engine.generation else None

    @property
    def _call_queue(self) -> EngineLifetime | None:
        """The stdlib's call queue, as far as code uses it: ``join_thread()``, ``close()``."""
        return EngineLifetime(self._engine) if self._engine.generation else None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)``; return its ``concurrent.futures.Future``.

        Raises:
            BrokenPoolError: the executor is broken (a worker died).
            RuntimeError: the executor was shut down.
        """
        return self._submit(CALL, fn, [(args, kwargs)])[0]

    def _submit(
        self, kind: int, fn: Any, chunks: Iterable[Any], bar: Progress | None = None
    ) -> list[Future[Any]]:
        # Only the flags are checked under the lock, as the stdlib does: a done
        # callback running in the dispatcher may submit while another thread is
        # inside submit() forking a generation (which pauses that dispatcher).
        # A shutdown that slips in between makes the engine refuse the tasks.
        with self._shutdown_lock:
            if self._engine.broken is not None:
                raise BrokenPoolError(str(self._engine.broken))
            if self._shutdown_thread:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _global_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        futures: list[Future[Any]] = []
        tasks = []
        offset = 0  # of a map chunk's first item, for messages
        for data in chunks:
            future: Future[Any] = Future()
            futures.append(future)
            # Counted before the future resolves: whoever sees the result sees the count.
            on_done = counted(bar, _completer(future))
            tasks.append((data, on_done, future.set_running_or_notify_cancel, offset))
            if kind != CALL:
                offset += len(data)
        try:
            self._engine.submit_many(kind, fn, tasks)
        except (TaskPicklingError, ReleasedError) as err:  # the function: every future has it
            for future in futures:
                if not future.done():
                    future.set_exception(err)
        return futures

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: ProgressOption = False,
    ) -> Iterator[T]:
        """Like ``map(fn, *iterables)``, computed by the workers; results in order.

        ``progress=True`` shows a tqdm bar counting items as they finish (a
        dict: tqdm options); it closes when the results are all read, on an
        error, or when the iterator is dropped.

        Raises (from the iterator):
            TimeoutError: a result is not ready ``timeout`` seconds after the call.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end_time = None if timeout is None else timeout + time.monotonic()
        chunks = list(chunked(zip(*iterables, strict=False), chunksize))
        bar = self._progress_bar(sum(map(len, chunks)), progress, fn)
        try:
            futures = self._submit(STARMAP, fn, chunks, bar)
        except BaseException:
            if bar is not None:  # no iterator will ever close it
                bar.close(failed=True)
            raise
        return _results(futures, end_time, bar)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more submits; with ``wait``, return once pending work is done and workers exited.

        ``cancel_futures=True`` cancels the futures no worker has started.
        """
        with self._shutdown_lock:
            self._shutdown_thread = True
        if cancel_futures:
            self._engine.cancel_queued()
        self._engine.close()
        if wait:
            self._engine.join()

    def terminate_workers(self) -> None:
        """Shut down at once and send SIGTERM to every live worker (Python 3.14's API).

        Futures not yet running are cancelled; the running ones fail with
        :class:`~forkref.BrokenPoolError`. Do not submit afterwards.
        """
        self._signal_and_shutdown(kill=False)

    def kill_workers(self) -> None:
        """Like :meth:`terminate_workers`, with SIGKILL (Python 3.14's API)."""
        self._signal_and_shutdown(kill=True)

    def _signal_and_shutdown(self, kill: bool) -> None:
        # As Python 3.14 does: note the workers, shut down without waiting
        # (the futures not running are cancelled), then signal the workers;
        # the futures they were running fail as the executor breaks.
        processes = self._worker_processes()
        self.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            with contextlib.suppress(Exception):
                if process.is_alive():
                    process.kill() if kill else process.terminate()


def _results(
    futures: list[Future[list[T]]], end_time: float | None, bar: Progress | None = None
) -> Iterator[T]:
    """Yield the items of each future's result in order, holding none of them afterwards.

    CPython gh-58607 (bpo-14406): a result yielded must not stay referenced
    by the iterator, so each chunk is emptied as it is yielded and each
    future dropped once read.
    """
    finished = False
    try:
        futures.reverse()
        while futures:
            chunk = _result_or_cancel(futures.pop(), end_time)
            chunk.reverse()
            while chunk:
                yield chunk.pop()
        finished = True
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:  # also when an error, Ctrl-C or the iterator's end stops us
            bar.close(failed=not finished)


def _result_or_cancel(future: Future[list[T]], end_time: float | None) -> list[T]:
    try:
        try:
            if end_time is None:
                return future.result()
            return future.result(end_time - time.monotonic())
        finally:
            future.cancel()  # no-op once done; on a timeout, stop it if not started
    finally:
        del future  # the caller's chunk is the only reference left
