"""share() anywhere: what a user runs, on the stdlib pools, with the thread's own code.

The discussion that started forkref ends with code that takes the reference
inside ``with Pool(2)``, after the workers forked. These tests run it as
written (``share`` for ``ref``) and check that nothing is pickled, that big
frames stay shared, and that an object born after the fork is never taken
for another.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import multiprocessing
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pytest

import forkref
from forkref import share
from forkref._shm import export
from helpers import read_n

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
Pool = multiprocessing.get_context("fork").Pool


class BigObject:
    """The thread's BigObject, which refuses to be pickled."""

    def __init__(self, n: int = 1, payload: int = 4 * MiB) -> None:
        self.n = n
        self.payload = bytearray(payload)

    def __reduce__(self) -> Any:
        raise AssertionError("a BigObject was pickled")

    def compute_something(self) -> int:
        return self.n * 2


def child(bo: BigObject) -> int:  # forkref hands the object itself: no deref() needed
    return bo.compute_something()


def parent() -> list[int]:
    bo1 = BigObject(1)
    bo2 = BigObject(2)
    with Pool(2) as pool:
        result = pool.map(child, [share(bo1), share(bo2)])
    return result


@pytest.mark.smoke
def test_the_threads_code_verbatim_pickles_nothing() -> None:
    before = export.stats()
    assert parent() == [2, 4]  # BigObject.__reduce__ raises: nothing was pickled
    after = export.stats()
    assert after.exports == before.exports  # nor exported through shared memory
    assert after.served == before.served


# -- big objects stay shared ---------------------------------------------------------


def uss_after_reading(obj: Any) -> tuple[int, float]:
    """In a worker: read every value of ``obj``, then report this process's USS."""
    total = float(np.asarray(obj).sum())
    return psutil.Process().memory_full_info().uss, total


def frame_and_array() -> tuple[list[tuple[int, float]], float, float, int]:
    frame = pd.DataFrame({f"c{i}": np.arange(4 * MiB, dtype=np.float64) for i in range(4)})
    array = np.ones(16 * MiB, dtype=np.float64)
    with Pool(2) as pool:
        seen = pool.map(uss_after_reading, [share(frame), share(array)] * 2, chunksize=1)
    return seen, float(frame.to_numpy().sum()), float(array.sum()), int(frame.memory_usage().sum())


def test_a_frame_and_an_array_shared_after_the_fork_stay_shared() -> None:
    seen, frame_total, array_total, frame_bytes = frame_and_array()
    assert [t for _, t in seen] == [frame_total, array_total] * 2
    size = min(frame_bytes, 16 * MiB * 8)  # 128 MiB each
    for uss, _ in seen:
        # Reading every value of an inherited frame copies nothing: a worker's
        # private memory is its interpreter, far below a copy of the object.
        assert uss < size // 4, (uss, size)


# -- objects born after the fork --------------------------------------------------------


class Wide:
    """Over 512 bytes, so malloc allocates it: a freed one's address comes back at once."""

    __slots__ = ("__weakref__", "n", *(f"s{i}" for i in range(100)))

    def __init__(self, n: int, payload: int = 0) -> None:
        self.n = n


class WideUnpicklable(Wide):
    __slots__ = ()

    def __reduce__(self) -> Any:
        raise AssertionError("a WideUnpicklable was pickled")


def late_objects(kind: type) -> tuple[str, object]:
    """An object dies after the fork; one of the same type takes its address; share it."""
    old = kind(1, payload=0)
    address = id(old)
    with Pool(1) as pool:  # the workers hold `old` at `address`, and the fork recorded it
        del old
        gc.collect()
        kept, new = [], None
        for _ in range(20_000):  # small objects: what is kept while searching stays small
            candidate = kind(2, payload=0)
            if id(candidate) == address:
                new = candidate
                break
            kept.append(candidate)
        if new is None:
            return "no reuse", None
        try:
            return "ok", pool.apply(read_n, (share(new),))
        except forkref.NotInheritedError as err:
            return "error", str(err)


@pytest.mark.parametrize("kind", [WideUnpicklable, Wide])
def test_an_object_born_at_a_dead_ones_address_is_never_taken_for_it(kind: type) -> None:
    outcome, value = late_objects(kind)
    if outcome == "no reuse":
        pytest.skip("the allocator did not reuse the address")
    if kind is Wide:
        assert (outcome, value) == ("ok", 2)  # the new one, through shared memory
    else:  # it refuses pickling: a clear error, never the old object's 1
        assert outcome == "error"
        assert "shared after this process was forked" in str(value)


def resolve_in_executor() -> int:
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex:
        bo = BigObject(21)  # exists before the first submit, when the executor forks
        assert ex.submit(abs, -1).result() == 1
        return ex.submit(child, share(bo)).result()


def test_stdlib_executor_forks_at_first_submit_and_resolves_later_shares() -> None:
    assert resolve_in_executor() == 42


def replacement_workers() -> list[int]:
    bo = BigObject(5)
    # maxtasksperchild=1: every task after the first runs in a worker forked
    # from the pool's handler thread, whose frames hold none of these locals.
    with Pool(1, maxtasksperchild=1) as pool:
        return [pool.apply(child, (share(bo),)) for _ in range(3)]


@pytest.mark.forks_with_threads  # the stdlib Pool forks replacements from its handler thread
def test_replacement_workers_forked_from_a_handler_thread_resolve_too() -> None:
    assert replacement_workers() == [10, 10, 10]


# -- messages --------------------------------------------------------------------------


def late_unpicklable() -> str:
    with Pool(1) as pool:
        late = BigObject(3)  # created after the workers forked
        try:
            pool.apply(child, (share(late),))
        except forkref.NotInheritedError as err:
            return str(err)
    raise AssertionError("the late object resolved")


def spawned_unpicklable() -> str:
    bo = BigObject(4)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        try:
            pool.apply(child, (share(bo),))
        except forkref.NotInheritedError as err:
            return str(err)
    raise AssertionError("the object resolved in a spawn worker")


def test_shared_after_the_fork_and_not_forked_are_different_messages() -> None:
    late, spawned = late_unpicklable(), spawned_unpicklable()
    assert "shared after this process was forked" in late
    assert "not forked from the sharing process" not in late
    assert "before the pool starts its workers" in late  # its fix
    assert "not forked from the sharing process" in spawned
    assert "shared after" not in spawned
    assert "Make the object picklable" in spawned  # its fix
    for message in (late, spawned):
        assert "could not pickle it" in message  # why shared memory could not stand in
        assert ".." not in message
        assert " Shared memory could not stand in" in message
        assert message.index(". Shared memory") > 0  # a full stop before it
        assert message.endswith(".")


def unweakrefable_alive_at_fork() -> str:
    table = {"fn": lambda: 1}  # alive at the fork, but a dict takes no weak reference
    with Pool(1) as pool:
        try:
            pool.apply(len, (share(table),))
        except forkref.NotInheritedError as err:
            return str(err)
    raise AssertionError("the dict resolved")


def test_an_object_without_weak_references_says_so_and_how_to_fix_it() -> None:
    message = unweakrefable_alive_at_fork()
    assert "a builtins.dict cannot be weakly referenced" in message
    assert "put it in an object of your own class" in message
