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


def frame_total(frame: object, part: int) -> float:
    import numpy as np

    return float(np.asarray(frame)[part::8].sum())


@pytest.mark.timeout(120)
def test_pickled_arguments_stream_with_bounded_parent_memory() -> None:
    """Issue 8: forkref pickled every task up front (8 x 128 MiB held at once).

    Now a big task is pickled when a worker is free to take it, as the
    stdlib's pools do, and its pickle dropped once sent: the parent holds a
    few at a time, and the fork server, forked at the first task, holds none.
    Bounds are generous (the stdlib itself peaks near 2 frames here).
    """
    import numpy as np
    import psutil

    frame = np.random.default_rng(0).random(128 * MIB // 8)  # a 128 MiB array
    me = psutil.Process()
    base = me.memory_info().rss
    with forkref.Pool(2, share_threshold=None) as pool:
        with forkref.MemorySampler([me.pid], interval=0.01) as sampler:
            totals = pool.starmap(frame_total, [(frame, i) for i in range(8)], chunksize=1)
        [zygote] = pool._engine.zygote_pids()
        zygote_uss = forkref.memory_report([zygote]).by_pid(zygote).uss
    assert totals == [frame_total(frame, i) for i in range(8)]
    grew = sampler.peaks().by_pid(me.pid).rss - base
    assert grew < 4 * frame.nbytes, f"the parent grew by {grew / MIB:.0f} MiB"
    assert zygote_uss < frame.nbytes // 4, f"the fork server holds {zygote_uss / MIB:.0f} MiB"
