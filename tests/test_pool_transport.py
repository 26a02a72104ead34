"""forkref's own pools with share() handles under every start method.

Under fork the workers inherit the objects; under spawn and forkserver the
handles resolve through the shared-memory transport, once per worker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import Any

import pytest

import forkref
from helpers import total

np = pytest.importorskip("numpy")

METHODS = ["fork", "forkserver", "spawn"]


def checksum_and_pid(arr: Any) -> tuple[float, int, int, bool]:
    return float(arr.sum()), os.getpid(), id(arr), bool(arr.flags.writeable)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_pool_resolves_handles_under_every_start_method(method: str) -> None:
    arr = np.arange(2_000_000, dtype=np.float64)
    handle = forkref.share(arr)
    with forkref.Pool(2, context=mp.get_context(method)) as pool:
        results = pool.map(checksum_and_pid, [handle] * 8, chunksize=1)
    assert {r[0] for r in results} == {float(arr.sum())}
    by_worker: dict[int, set[int]] = {}
    for _, pid, obj_id, _ in results:
        by_worker.setdefault(pid, set()).add(obj_id)
    assert all(len(ids) == 1 for ids in by_worker.values())  # one object per worker
    if method == "fork":
        assert all(r[2] == id(arr) for r in results)  # the inherited object itself
    else:
        assert not any(r[3] for r in results)  # a read-only view of the segment


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_executor_resolves_handles_under_every_start_method(method: str) -> None:
    arr = np.arange(1_000_000, dtype=np.float64)
    handle = forkref.share(arr)
    with forkref.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
        sums = [ex.submit(checksum_and_pid, handle).result(timeout=60)[0]]
        sums += [r[0] for r in ex.map(checksum_and_pid, [handle] * 4, timeout=60)]
    assert set(sums) == {float(arr.sum())}


@pytest.mark.timeout(120)
def test_small_late_object_goes_through_shared_memory_not_a_new_generation() -> None:
    from forkref._shm import export as _export

    with forkref.Pool(2) as pool:
        pool.apply(abs, (1,))  # generation 1 is up
        generation = pool._engine.generation
        exports = _export.stats().exports
        late = np.arange(1000, dtype=np.float64)  # 8 KB: one export beats 3 forks
        assert pool.map(total, [forkref.share(late)] * 4) == [float(late.sum())] * 4
        assert pool._engine.generation == generation
        assert _export.stats().exports == exports + 1  # once, whatever the task count


@pytest.mark.timeout(120)
def test_big_late_object_forks_a_new_generation() -> None:
    from forkref._shm import export as _export

    with forkref.Pool(2) as pool:
        pool.apply(abs, (1,))
        generation = pool._engine.generation
        exports = _export.stats().exports
        late = np.ones(2**26, dtype=np.float64)  # 512 MiB: 3 forks of this process are cheaper
        assert pool.apply(total, (forkref.share(late),)) == float(2**26)
        assert pool._engine.generation == generation + 1
        assert _export.stats().exports == exports
