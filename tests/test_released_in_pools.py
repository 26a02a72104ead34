"""A released handle passed to a pool raises ReleasedError, in forkref's pools as in the stdlib's.

Using a handle after ``release()`` is a use-after-release, not a pickling
problem: ``except forkref.ReleasedError`` must catch it whichever pool runs
the task and whichever start method made the workers, and the message must
not advise ``forkref.share(obj)`` (the user already did). The pool goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import pytest

import forkref

pytestmark = pytest.mark.timeout(120)

METHODS = ["fork", "spawn", "forkserver"]


def length(handle: forkref.Shared[list[int]]) -> int:
    return len(handle.get())


def released() -> forkref.Shared[list[int]]:
    handle = forkref.share([1, 2, 3])
    handle.release()
    return handle


def _forkref_pool(method: str, run: Callable[[Any], object]) -> None:
    with forkref.Pool(2, context=mp.get_context(method)) as pool:
        run(pool)
        assert pool.apply(abs, (-2,)) == 2  # the pool goes on


def _forkref_executor(method: str, run: Callable[[Any], object]) -> None:
    with forkref.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
        run(ex)
        assert ex.submit(abs, -2).result(timeout=60) == 2


def _stdlib_pool(method: str, run: Callable[[Any], object]) -> None:
    with mp.get_context(method).Pool(2) as pool:
        run(pool)
        assert pool.apply(abs, (-2,)) == 2


def _stdlib_executor(method: str, run: Callable[[Any], object]) -> None:
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
        run(ex)
        assert ex.submit(abs, -2).result(timeout=60) == 2


def _apply(p: Any) -> object:
    return p.apply(length, (released(),))


def _apply_async(p: Any) -> object:
    return p.apply_async(length, (released(),)).get(60)


def _map(p: Any) -> object:
    return p.map(length, [released()])


def _imap(p: Any) -> object:
    return list(p.imap(length, [released()]))


def _submit(e: Any) -> object:
    return e.submit(length, released()).result(60)


def _executor_map(e: Any) -> object:
    return list(e.map(length, [released()], timeout=60))


Runner = Callable[[str, Callable[[Any], object]], None]
CASES: list[tuple[str, Runner, Callable[[Any], object]]] = [
    ("forkref.Pool.apply", _forkref_pool, _apply),
    ("forkref.Pool.apply_async", _forkref_pool, _apply_async),
    ("forkref.Pool.map", _forkref_pool, _map),
    ("forkref.Pool.imap", _forkref_pool, _imap),
    ("forkref.Executor.submit", _forkref_executor, _submit),
    ("forkref.Executor.map", _forkref_executor, _executor_map),
    ("stdlib Pool.apply", _stdlib_pool, _apply),
    ("stdlib Pool.map", _stdlib_pool, _map),
    ("stdlib Executor.submit", _stdlib_executor, _submit),
    ("stdlib Executor.map", _stdlib_executor, _executor_map),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "pool", "run"), CASES, ids=[c[0] for c in CASES])
def test_released_handle_raises_released_error(
    method: str, name: str, pool: Runner, run: Callable[[Any], object]
) -> None:
    def expect_released(target: Any) -> None:
        with pytest.raises(forkref.ReleasedError, match="released") as info:
            run(target)
        assert "forkref.share(obj)" not in str(info.value)
        assert not isinstance(info.value, forkref.TaskPicklingError)

    pool(method, expect_released)


@pytest.mark.parametrize("method", METHODS)
def test_released_handle_captured_by_the_function_raises_released_error(method: str) -> None:
    """The function's own pickle (a partial binding the handle) fails the same way."""

    task = functools.partial(length, released())
    context = mp.get_context(method)
    with forkref.ProcessPoolExecutor(1, mp_context=context) as ex:
        future = ex.submit(task)
        with pytest.raises(forkref.ReleasedError, match="the function"):
            future.result(timeout=60)
    with forkref.Pool(1, context=context) as pool, pytest.raises(forkref.ReleasedError):
        pool.apply(task)
