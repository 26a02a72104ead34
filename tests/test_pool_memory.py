"""pool.memory() and MemorySampler(pool.pids) on forkref's pools, with real allocations."""

from __future__ import annotations

import mmap
import os
import time

import pytest

import forkref

MIB = 2**20


def allocate_touch_and_free(mib: int, hold_s: float) -> int:
    """Touch ``mib`` MiB, hold it, free it; return this worker's pid."""
    # An anonymous mapping, not malloc: munmap always hands the pages back, where
    # free() may keep them depending on thresholds other libraries moved.
    block = mmap.mmap(-1, mib * MIB)
    for i in range(0, len(block), mmap.PAGESIZE):
        block[i] = 1
    time.sleep(hold_s)
    block.close()
    return os.getpid()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pool_cls", ["Pool", "ProcessPoolExecutor"])
def test_sampler_on_pool_pids_catches_a_workers_peak(pool_cls: str) -> None:
    with getattr(forkref, pool_cls)(2) as pool:
        assert pool.pids() == []  # lazily forked: nothing yet
        run = pool.apply if pool_cls == "Pool" else (lambda f, a: pool.submit(f, *a).result())
        run(abs, (1,))  # the workers exist now
        with forkref.MemorySampler(pool.pids, interval=0.02) as sampler:
            worker = run(allocate_touch_and_free, (64, 0.5))
        report = pool.memory()
        assert worker in pool.pids()
    peak = sampler.peaks().by_pid(worker)
    assert peak.uss > 48 * MIB
    assert report.by_pid(worker).role == "worker"
    assert report.by_pid(worker).uss < peak.uss - 32 * MIB  # freed after the task
    assert report.by_pid(os.getpid()).role == "parent"
