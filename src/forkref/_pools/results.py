"""What ``forkref.Pool``'s calls return: ``AsyncResult``, ``MapResult``, ``IMapIterator``.

They mirror :mod:`multiprocessing.pool`'s result objects, method for method.
The engine completes them from its dispatcher thread (``_set``/``_set_chunk``);
the caller's thread waits on them. ``IMapIterator`` also paces its source: it
keeps a bounded window of chunks in flight, shrunk when results are big.
"""

from __future__ import annotations

import collections
import functools
import itertools
import multiprocessing
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from forkref._pools.progress import Progress, counted
from forkref._share.autoshare import estimate_size
from forkref._share.taskpickle import FnBlob

__all__ = ["AsyncResult", "IMapIterator", "MapResult", "Submitter", "chunked", "guarded_tasks"]

T = TypeVar("T")


class Submitter(Protocol):
    """What a result needs of its pool: its size, and a way to queue more chunks."""

    _processes: int

    def _submit(
        self,
        kind: int,
        func: Any,
        chunks: Iterable[tuple[Any, Callable[[bool, Any], None], int]],
        fn_blob: FnBlob | None = None,
    ) -> FnBlob | None: ...
_RESULT_BUDGET = 256 * 2**20  # bytes of imap results computed ahead of the consumer


class AsyncResult(Generic[T]):
    """The result of :meth:`Pool.apply_async`, like ``multiprocessing.pool.AsyncResult``."""

    def __init__(
        self,
        pool: Submitter,
        callback: Callable[[T], object] | None,
        error_callback: Callable[[BaseException], object] | None,
    ) -> None:
        # A pending result keeps its pool alive, as the stdlib's does (CPython's
        # pool.py): ``Pool(2).apply_async(f).get()`` must not see the pool
        # collected, and terminated, under it. Dropped once the result is set.
        self._pool: Submitter | None = pool
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        """Whether the call has completed."""
        return self._event.is_set()

    def successful(self) -> bool:
        """Whether the call completed without raising.

        Raises:
            ValueError: the result is not ready.
        """
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the result is available or ``timeout`` seconds pass."""
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> T:
        """Return the result, or raise the task's exception.

        Raises:
            multiprocessing.TimeoutError: not ready within ``timeout`` seconds.
        """
        self.wait(timeout)
        if not self.ready():
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _set(self, ok: bool, value: Any) -> None:
        if self._event.is_set():
            return
        self._success, self._value = ok, value
        try:
            if ok and self._callback is not None:
                self._callback(value)
            if not ok and self._error_callback is not None:
                self._error_callback(value)
        finally:  # a raising callback must not leave get() waiting forever
            self._event.set()
            self._pool = None


class MapResult(AsyncResult[list[T]]):
    """The result of :meth:`Pool.map_async`: completes when every chunk has, or one fails."""

    def __init__(
        self,
        pool: Submitter,
        length: int,
        chunksize: int,
        callback: Callable[[list[T]], object] | None,
        error_callback: Callable[[BaseException], object] | None,
        *,
        progress: Progress | None = None,
    ) -> None:
        super().__init__(pool, callback, error_callback)
        self._progress = progress
        self._items: list[Any] = [None] * length
        self._chunksize = chunksize
        self._left = -(-length // chunksize)  # chunks still to come
        self._lock = threading.Lock()
        if length == 0:
            self._set(True, [])

    def _set_chunk(self, index: int, ok: bool, value: Any) -> None:
        if not ok:
            self._set(False, value)
            return
        start = index * self._chunksize
        with self._lock:
            self._items[start : start + len(value)] = value  # C speed, as the stdlib does
            self._left -= 1
            done = self._left == 0
        if done:
            self._set(True, self._items)

    def _set(self, ok: bool, value: Any) -> None:
        # The bar closes before get() returns, so nothing the caller prints lands inside it.
        if self._progress is not None:
            self._progress.close(failed=not ok)
        super()._set(ok, value)

    def _interrupted(self) -> None:
        """The caller stopped waiting (Ctrl-C): leave the bar stopped where it is."""
        if self._progress is not None:
            self._progress.close(failed=True)


class IMapIterator(Generic[T]):
    """Results of :meth:`Pool.imap` (in order) or :meth:`Pool.imap_unordered`.

    The iterable is consumed lazily: at most ``window`` chunks are submitted
    and not yet consumed (the workers compute that far ahead while the
    consumer is busy), topped up in batches as results are taken. The window
    is 512 items (at least 8 chunks per worker), smaller when the first
    results show it would hold more than ``_RESULT_BUDGET`` bytes of results
    waiting for the consumer. A result is not referenced by the iterator once
    it has been yielded.
    """

    def __init__(
        self,
        pool: Submitter,
        *,
        kind: int,
        func: Callable[..., T],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        progress: Progress | None = None,
    ) -> None:
        self._pool, self._kind, self._func = pool, kind, func
        self._progress = progress
        if progress is not None:  # an iterator dropped half-way still closes its bar
            weakref.finalize(self, progress.close, True)
        self._fn_blob: FnBlob | None = None  # the function, pickled once for every round
        self._source = enumerate(chunked(iterable, chunksize))
        self._chunksize = chunksize
        self._ordered = ordered
        self._cond = threading.Condition()
        self._done: dict[int, tuple[bool, Any]] = {}
        self._order: collections.deque[int] = collections.deque()  # completion order
        self._submitted = 0
        self._next_chunk = 0
        self._exhausted = False
        self._buffer: list[T] = []  # the current chunk's results, reversed
        self._window = max(8 * pool._processes, 512 // chunksize)
        self._calibrated = False

    def __iter__(self) -> IMapIterator[T]:
        return self

    def __next__(self) -> T:
        return self.next()

    def next(self, timeout: float | None = None) -> T:
        """Next result, waiting at most ``timeout`` seconds.

        Raises:
            multiprocessing.TimeoutError: no result within ``timeout``.
            StopIteration: no more results.
        """
        while not self._buffer:
            ok, value = self._next_chunk_result(timeout)
            if not ok:
                # As the stdlib: with chunksize 1 the iteration goes on after a failed
                # item; with bigger chunks its generator ends at the first failure.
                if self._chunksize > 1:
                    self._exhausted, self._submitted = True, self._next_chunk
                raise value
            if not self._calibrated:
                self._calibrate(value)
            value.reverse()
            self._buffer = value
        return self._buffer.pop()

    def _next_chunk_result(self, timeout: float | None) -> tuple[bool, Any]:
        """The next finished chunk; closes the bar at the end, on a failure or on Ctrl-C."""
        bar = self._progress
        try:
            self._top_up()
            with self._cond:
                if self._exhausted and self._next_chunk >= self._submitted:
                    if bar is not None:
                        bar.close()
                    raise StopIteration
                done = self._wait_chunk(timeout)
        except (StopIteration, multiprocessing.TimeoutError):
            raise
        except BaseException:
            if bar is not None:
                bar.close(failed=True)
            raise
        if not done[0] and bar is not None:
            bar.close(failed=True)
        return done

    def _calibrate(self, chunk: list[Any]) -> None:
        """Shrink the window if results are big: at most about _RESULT_BUDGET bytes wait."""
        self._calibrated = True
        size = estimate_size(chunk)
        if size:
            floor = 2 * self._pool._processes
            self._window = max(floor, min(self._window, _RESULT_BUDGET // size))

    def _wait_chunk(self, timeout: float | None) -> tuple[bool, Any]:
        def ready() -> bool:
            return (self._next_chunk in self._done) if self._ordered else bool(self._order)

        if not self._cond.wait_for(ready, timeout):
            raise multiprocessing.TimeoutError
        key = self._next_chunk if self._ordered else self._order.popleft()
        self._next_chunk += 1
        return self._done.pop(key)

    def _top_up(self, everything: bool = False) -> None:
        """Submit chunks up to the window once it is half empty (all of them: ``everything``)."""
        ahead = self._submitted - self._next_chunk
        if self._exhausted or (not everything and ahead > self._window * 3 // 4):
            return
        tasks: list[tuple[list[Any], Callable[[bool, Any], None], int]] = []
        while everything or ahead + len(tasks) < self._window:
            try:
                item = next(self._source, None)
            except Exception as err:  # the caller's iterable raised: next() raises it, in turn
                self._exhausted = True
                self._set(self._submitted + len(tasks), False, err)
                self._submitted += 1
                break
            if item is None:
                self._exhausted = True
                break
            index, chunk = item
            on_done = counted(self._progress, functools.partial(self._set, index))
            tasks.append((chunk, on_done, index * self._chunksize))
        self._submitted += len(tasks)
        if tasks:
            self._fn_blob = self._pool._submit(self._kind, self._func, tasks, self._fn_blob)

    def _set(self, index: int, ok: bool, value: Any) -> None:
        with self._cond:
            self._done[index] = (ok, value)
            if not self._ordered:
                self._order.append(index)
            self._cond.notify()


def guarded_tasks(
    result: MapResult[Any], items: Iterable[Any], chunksize: int, bar: Progress | None = None
) -> Iterator[tuple[list[Any], Callable[[bool, Any], None], int]]:
    """A map's tasks, cut lazily: the first goes to a worker before the next is cut.

    An exception raised by the caller's iterable fails the map with that very
    exception, as the stdlib's ``_guarded_task_generation`` does. With a
    progress ``bar``, each chunk's items are counted as it finishes.
    """
    try:
        for index, chunk in enumerate(chunked(items, chunksize)):
            on_done = counted(bar, functools.partial(result._set_chunk, index))
            yield chunk, on_done, index * chunksize
    except Exception as err:
        result._set(False, err)


def chunked(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` consecutive items (the last one shorter)."""
    it = iter(iterable)
    while chunk := list(itertools.islice(it, size)):
        yield chunk
