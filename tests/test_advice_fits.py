"""Error messages give advice that fits where they are raised: never what the user already does.

The same failure (an object the worker cannot get, a full segment directory, a
lambda under spawn) needs different advice in a stdlib pool, in a forkref pool
with spawn workers, and in a forkref pool with fork workers.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import numpy as np
import pytest

import forkref
from forkref._refs import registry as _registry
from forkref._shm import segments

pytestmark = pytest.mark.timeout(120)

MiB = 2**20


class Unpicklable:
    """Refuses pickle, so shared memory cannot carry it to a spawn worker."""

    def __init__(self) -> None:
        self.n = 3

    def __reduce__(self) -> Any:
        raise TypeError("an Unpicklable cannot be pickled")


def read_n(obj: Any) -> int:
    return int(obj.n)


def size_of(array: Any) -> int:
    return int(array.size)


# -- NotInheritedError --------------------------------------------------------


def test_not_inherited_in_a_forkref_spawn_pool_does_not_advise_forkref_pool() -> None:
    handle = forkref.share(Unpicklable())
    with (
        forkref.Pool(1, context=mp.get_context("spawn")) as pool,
        pytest.raises(forkref.NotInheritedError) as info,
    ):
        pool.apply(read_n, (handle,))
    message = str(info.value)
    assert "use forkref.Pool" not in message
    assert "'spawn' workers" in message
    assert "leave out its context/mp_context argument" in message


def test_not_inherited_in_a_stdlib_spawn_pool_still_points_to_forkref_pool() -> None:
    handle = forkref.share(Unpicklable())
    with (
        mp.get_context("spawn").Pool(1) as pool,
        pytest.raises(forkref.NotInheritedError) as info,
    ):
        pool.apply(read_n, (handle,))
    assert "use forkref.Pool" in str(info.value)


@pytest.mark.parametrize(
    ("worker", "absent"), [(None, "task's arguments"), ("fork", "use forkref")]
)
def test_a_late_object_is_advised_for_the_pool_the_worker_is_in(
    worker: str | None, absent: str
) -> None:
    """Inside a forkref fork worker, 'use forkref.Pool' cannot help; passing the handle can."""
    try:
        _registry.set_pool_worker(worker)
        fix = _registry._fix_late(True), _registry._fix_late(False)
    finally:
        _registry.set_pool_worker(None)
    for text in fix:
        assert absent not in text
    if worker == "fork":
        assert all("in the task's arguments" in text for text in fix)


def test_a_fork_child_is_no_pool_worker_until_its_worker_loop_says_so() -> None:
    """A stdlib pool made inside a forkref worker gets the stdlib's advice, not the pool's."""
    with forkref.Pool(1) as pool:
        assert pool.apply(_registry.pool_worker) == "fork"
        assert pool.apply(_pool_worker_of_a_stdlib_child) is None


def _pool_worker_of_a_stdlib_child() -> str | None:
    with mp.get_context("fork").Pool(1) as inner:
        return inner.apply(_registry.pool_worker)


# -- SharedMemoryFullError ------------------------------------------------------


def test_a_full_segment_directory_in_a_forkref_spawn_pool_advises_the_fork_default(
    small_tmpfs: str,
) -> None:
    handle = forkref.share(np.ones(2 * MiB))
    with (
        forkref.Pool(1, context=mp.get_context("spawn")) as pool,
        pytest.raises(forkref.SharedMemoryFullError) as info,
    ):
        pool.apply(size_of, (handle,))
    message = str(info.value)
    assert "--shm-size" in message
    assert "use forkref.Pool" not in message
    assert "or forkref.Pool)" not in message
    assert "leave out its context/mp_context argument" in message
    assert "multiprocessing.get_context('fork') for a stdlib pool" in message


def test_a_full_segment_directory_for_results_does_not_advise_fork(small_tmpfs: str) -> None:
    """Results go through segments under every start method: fork is no fix there."""
    with pytest.raises(forkref.SharedMemoryFullError) as info:
        segments.create_named(2 * MiB, "a result")
    message = str(info.value)
    assert "'fork'" not in message
    assert "import_result()" in message


# -- explain() on functions -------------------------------------------------------


def test_explain_a_lambda_under_fork_says_forkref_sends_it_by_value() -> None:
    why = forkref.explain(lambda: 0)
    assert "stdlib cannot pickle" in why.reason
    assert "as the stdlib does" not in why.reason
    assert why.fix is None  # nothing to fix: share() is no advice for a function


def test_explain_a_module_lambda_under_spawn_says_it_cannot_be_sent() -> None:
    why = forkref.explain(lambda: 0, context=mp.get_context("spawn"))
    assert "cannot be sent" in why.reason
    assert why.fix is not None
    assert "fork start method" in why.fix
    assert "share(" not in why.fix


def test_explain_a_main_lambda_under_spawn_says_cloudpickle() -> None:
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec("f = lambda: 0", namespace)
    why = forkref.explain(namespace["f"], context=mp.get_context("forkserver"))
    assert "cloudpickle" in why.reason
    assert why.fix is None


def test_explain_an_importable_function_says_by_name() -> None:
    why = forkref.explain(read_n)
    assert "qualified name" in why.reason
    assert why.fix is None
