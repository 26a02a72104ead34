"""pool.memory() tells a worker's segment pages (a shared object read zero-copy) from its own.

A spawn worker that reads a shared numpy array maps the export's segment from
the tmpfs; the pages it touched first count in its USS, though they are the
object's and not a copy. The report counts them apart (``segment_*``) and
``own_uss`` stays the worker's own memory.
"""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

import forkref

pytestmark = pytest.mark.timeout(180)

MiB = 2**20
SIZE = 256 * MiB


def touch_all(array: np.ndarray) -> float:
    return float(array.sum())  # reads every page of the segment, writes none


def test_a_spawn_worker_reading_a_shared_array_shows_segment_pages_apart() -> None:
    array = np.ones(SIZE // 8)
    with forkref.share(array) as handle, forkref.Pool(1, context=mp.get_context("spawn")) as pool:
        assert pool.apply(touch_all, (handle,)) == SIZE // 8
        report = pool.memory()
        (worker,) = report.by_role("worker")
        parent = report.by_pid(os.getpid())
    assert worker.segment_rss >= 0.8 * SIZE, worker  # the array's pages, mapped from the tmpfs
    assert worker.segment_rss <= worker.rss
    assert worker.segment_pss <= worker.pss
    assert worker.segment_uss <= worker.uss
    assert worker.own_uss < 0.3 * SIZE, worker  # the interpreter and numpy, not the array
    assert worker.own_uss == worker.uss - worker.segment_uss
    assert parent.segment_rss <= parent.rss
    table = report.table()
    assert "segments" in table.splitlines()[0]
    assert "own_uss" in table.splitlines()[0]
    assert f"{worker.segment_rss / MiB:.1f}" in table


def test_a_fork_worker_that_maps_no_shared_object_has_next_to_no_segment_pages() -> None:
    """At most the export board (a few KiB) it inherited, if this process ever exported."""
    with forkref.Pool(1) as pool:
        assert pool.apply(abs, (-1,)) == 1
        (worker,) = pool.memory().by_role("worker")
    assert worker.segment_rss <= MiB
    assert worker.own_uss == worker.uss - worker.segment_uss
