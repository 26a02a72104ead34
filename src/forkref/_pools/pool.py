"""``forkref.Pool``: ``multiprocessing.Pool``'s API over forkref's workers.

Swap ``from multiprocessing import Pool`` for ``from forkref import Pool``:
same methods, signatures, exceptions and ordering. What changes (see
:mod:`forkref._engine.engine` for how):

* workers are forked (whatever the platform default) lazily at the first task,
  and again, as a fresh generation, when a task refers to an object shared
  after they forked;
* lambdas, closures and local functions work as task functions (fork only):
  sent by value (code and captured values); captured values above
  ``share_threshold`` travel by reference as a snapshot, even mutable ones;
* big immutable arguments (and, with ``auto_share=True``, big mutable ones)
  travel by reference; big ones that are pickled anyway trigger one
  :class:`~forkref.PerformanceWarning` per call site;
* a worker that dies fails only the tasks it held, with
  :class:`~forkref.WorkerDiedError` (the stdlib Pool hangs on them), and is
  replaced; a failing initializer breaks the pool with
  :class:`~forkref.BrokenPoolError` (the stdlib Pool respawns it forever);
* ``terminate()`` fails pending results instead of leaving them unfinished.

Non-goals: no ``Pool`` subclass of the stdlib class (isinstance checks fail),
and ``imap``/``imap_unordered`` pickle their iterable lazily as results are
consumed, keeping a bounded number of chunks in flight (``close()`` submits
what is left).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sized
from multiprocessing.context import BaseContext
from types import TracebackType
from typing import Any, TypeVar

from forkref._pools.base import DEFAULT_RESULT_THRESHOLD, DEFAULT_THRESHOLD, PoolBase
from forkref._pools.progress import ProgressOption
from forkref._pools.results import AsyncResult, IMapIterator, MapResult, guarded_tasks
from forkref._share.taskpickle import CALL, MAP, STARMAP, FnBlob

__all__ = ["Pool"]

T = TypeVar("T")


class Pool(PoolBase):
    """A drop-in ``multiprocessing.Pool`` whose workers receive big objects by reference.

    Args:
        processes: number of workers (default ``os.cpu_count()``).
        initializer: called as ``initializer(*initargs)`` in each worker at start.
        initargs: arguments of ``initializer``.
        maxtasksperchild: a worker exits after this many tasks (chunks) and a
            fresh one is forked from the generation's snapshot.
        context: a ``multiprocessing`` context; default: ``fork`` where the
            platform has it. Without fork, tasks are pickled by the stdlib's rules.
        share_threshold: arguments estimated above this many bytes are
            candidates for by-reference (default 1 MiB); ``None`` turns
            automatic by-reference off.
        auto_share: send big *mutable* arguments (numpy arrays, DataFrames,
            lists, dicts) by reference too; workers then see them as they
            were when the workers forked (snapshot semantics).
        result_threshold: numpy arrays, pandas DataFrames/Series and arrow
            tables or arrays of at least this many bytes in a task's result
            come back through shared memory instead of the pipe, with no
            change to the task; in the parent each is an ordinary writable
            object of its own (a private copy-on-write mapping). Default 1 MiB;
            ``None``: results are pickled through the pipe, as the stdlib does.
        backend: ``"local"`` (processes on this machine) or ``"ray"``: the
            workers are Ray actors and shared objects go through Ray's
            object store, once per pool (``pip install 'forkref[ray]'``).
        address: with ``backend="ray"``, the Ray cluster to connect to
            (``"10.0.0.5:6379"``, ``"ray://..."``). Default: the Ray already
            initialised in this process, else ``RAY_ADDRESS``, else a local
            Ray instance started for the pool and shut down at its close.
        task_timeout: seconds a task (a chunk of a map) may run, counted from
            when its worker starts it; past that it fails with
            :class:`~forkref.TaskTimeoutError` and its worker is replaced.

    Mutation semantics: a worker sees every shared object (explicit handles
    and automatic ones) as it was when that worker's generation forked.
    """

    __module__ = "forkref"

    def __init__(
        self,
        processes: int | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: Iterable[Any] = (),
        maxtasksperchild: int | None = None,
        context: BaseContext | None = None,
        *,
        share_threshold: int | None = DEFAULT_THRESHOLD,
        auto_share: bool = False,
        backend: str = "local",
        address: str | None = None,
        result_threshold: int | None = DEFAULT_RESULT_THRESHOLD,
        task_timeout: float | None = None,
    ) -> None:
        if processes is None:
            processes = os.cpu_count() or 1
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        if maxtasksperchild is not None and (
            not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0
        ):
            raise ValueError("maxtasksperchild must be a positive int or None")
        self._processes = processes
        self._start_engine(
            processes,
            context,
            initializer=initializer,
            initargs=initargs,
            max_tasks=maxtasksperchild,
            executor_semantics=False,
            share_threshold=share_threshold,
            auto_share=auto_share,
            backend=backend,
            address=address,
            result_threshold=result_threshold,
            task_timeout=task_timeout,
        )
        self._state = "RUN"
        self._iterators: weakref.WeakSet[IMapIterator[Any]] = weakref.WeakSet()
        self._finalizer = weakref.finalize(self, self._engine.terminate)

    def __repr__(self) -> str:
        return f"<forkref.Pool state={self._state} pool_size={self._processes}>"

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # As multiprocessing.Pool: a pool collected while running was never closed.
        # (The finalizer terminates it; this only says so.)
        if getattr(self, "_state", None) == "RUN":
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    # -- submitting -------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def _submit(
        self,
        kind: int,
        func: Any,
        chunks: Iterable[tuple[Any, Callable[[bool, Any], None], int]],
        fn_blob: FnBlob | None = None,
    ) -> FnBlob | None:
        """Queue ``(data, on_done, offset)`` tasks; failures reach each ``on_done``.

        Returns the pickled function, for a caller that submits more later.
        """
        pending = iter(chunks)
        try:
            if fn_blob is None:
                fn_blob = self._engine.encode_function(func)
            self._engine.submit_many(
                kind, func, ((d, done, None, off) for d, done, off in pending), fn_blob=fn_blob
            )
        except BaseException as err:  # unpicklable function, broken pool, Ctrl-C: results carry it
            for _, on_done, _ in pending:  # those not queued yet end too, never pending
                on_done(False, err)
            if not isinstance(err, Exception):
                raise  # a KeyboardInterrupt still interrupts the caller
        return fn_blob

    def apply(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
    ) -> T:
        """Call ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(
        self,
        func: Callable[..., T],
        args: Iterable[Any] = (),
        kwds: Mapping[str, Any] | None = None,
        callback: Callable[[T], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
    ) -> AsyncResult[T]:
        """Like :meth:`apply`, returning an :class:`AsyncResult` at once."""
        self._check_running()
        result: AsyncResult[T] = AsyncResult(self, callback, error_callback)
        self._submit(CALL, func, [((tuple(args), dict(kwds or {})), result._set, 0)])
        return result

    def map(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        progress: ProgressOption = False,
    ) -> list[T]:
        """``list(map(func, iterable))`` computed by the workers, in order.

        ``progress=True`` shows a tqdm bar counting items (a dict: tqdm options).
        """
        return self._wait(
            self._map_async(MAP, func, iterable, chunksize, progress=progress)
        )

    def starmap(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        progress: ProgressOption = False,
    ) -> list[T]:
        """Like :meth:`map`, calling ``func(*item)``."""
        return self._wait(
            self._map_async(STARMAP, func, iterable, chunksize, progress=progress)
        )

    @staticmethod
    def _wait(result: MapResult[T]) -> list[T]:
        try:
            return result.get()
        except BaseException:
            result._interrupted()  # Ctrl-C while waiting; a task error closed it already
            raise

    def map_async(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        progress: ProgressOption = False,
    ) -> MapResult[T]:
        """Like :meth:`map`, returning a :class:`MapResult` at once."""
        return self._map_async(
            MAP,
            func,
            iterable,
            chunksize,
            callback=callback,
            error_callback=error_callback,
            progress=progress,
        )

    def starmap_async(
        self,
        func: Callable[..., T],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[T]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        progress: ProgressOption = False,
    ) -> MapResult[T]:
        """Like :meth:`starmap`, returning a :class:`MapResult` at once."""
        return self._map_async(
            STARMAP,
            func,
            iterable,
            chunksize,
            callback=callback,
            error_callback=error_callback,
            progress=progress,
        )

    def _map_async(
        self,
        kind: int,
        func: Any,
        iterable: Iterable[Any],
        chunksize: int | None,
        *,
        callback: Any = None,
        error_callback: Any = None,
        progress: ProgressOption,
    ) -> MapResult[Any]:
        self._check_running()
        items = iterable if isinstance(iterable, Sized) else list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        chunksize = max(chunksize, 1)
        bar = self._progress_bar(len(items), progress, func)
        result: MapResult[Any] = MapResult(
            self, len(items), chunksize, callback, error_callback, progress=bar
        )
        self._submit(kind, func, guarded_tasks(result, items, chunksize, bar))
        return result

    def imap(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        progress: ProgressOption = False,
    ) -> IMapIterator[T]:
        """Lazy :meth:`map`: an iterator over the results, in order.

        With ``progress=True`` the bar counts finished items; it has a total
        when ``iterable`` has a length, and counts up without one otherwise.
        """
        return self._imap(func, iterable, chunksize, ordered=True, progress=progress)

    def imap_unordered(
        self,
        func: Callable[[Any], T],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        progress: ProgressOption = False,
    ) -> IMapIterator[T]:
        """Like :meth:`imap`, yielding results as they complete."""
        return self._imap(func, iterable, chunksize, ordered=False, progress=progress)

    def _imap(
        self,
        func: Any,
        iterable: Iterable[Any],
        chunksize: int,
        *,
        ordered: bool,
        progress: ProgressOption,
    ) -> IMapIterator[Any]:
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        total = len(iterable) if isinstance(iterable, Sized) else None
        it: IMapIterator[Any] = IMapIterator(
            self,
            kind=MAP,
            func=func,
            iterable=iterable,
            chunksize=chunksize,
            ordered=ordered,
            progress=self._progress_bar(total, progress, func),
        )
        it._top_up()
        self._iterators.add(it)
        return it

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Accept no more tasks; workers exit when the submitted ones are done."""
        if self._state != "RUN":
            return
        for it in list(self._iterators):
            it._top_up(everything=True)
        self._state = "CLOSE"
        self._engine.close()

    def terminate(self) -> None:
        """Kill the workers now; unfinished results fail with :class:`forkref.Error`."""
        self._state = "TERMINATE"
        self._finalizer()

    def join(self) -> None:
        """Wait for the workers to exit; call :meth:`close` or :meth:`terminate` first."""
        if self._state == "RUN":
            raise ValueError("Pool is still running")
        self._engine.join()

    def __enter__(self) -> Pool:
        self._check_running()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()

    # -- introspection ----------------------------------------------------------------

    @property
    def _pool(self) -> list[Any]:
        """The live workers as process objects, as ``multiprocessing.Pool._pool`` has them."""
        return list(self._worker_processes().values())

    @property
    def _ctx(self) -> BaseContext:
        """The ``multiprocessing`` context, as ``multiprocessing.Pool._ctx``."""
        return self._engine.context
