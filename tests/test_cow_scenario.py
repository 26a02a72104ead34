"""The refcount copy-on-write scenario: 2M small dicts read by 2 forked workers.

Reading an object writes its reference count, so a worker iterating an
inherited plain list copies the pages of every dict it touches. A compact()
list stores the same records in one buffer that workers only read. Also here:
the gc half of the story, a child's gc.collect() with and without
forkref.fork_hygiene().
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

import forkref

N_ITEMS = 2_000_000
BOUND = 0.05  # each worker's USS at most 5% of the plain list's size
MiB = 2**20

_barrier: Any = None


def records(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "name": f"item-{i}", "value": i * 0.5}


def _uss() -> int:
    return psutil.Process().memory_full_info().uss


@dataclass(frozen=True)
class Containers:
    plain: list[dict[str, Any]]
    plain_size: int  # the parent's USS growth while building the plain list
    compact: forkref.CompactList[dict[str, Any]]
    checksum: float


@pytest.fixture(scope="module")
def containers() -> Iterator[Containers]:
    """Both containers of the same 2M records, built once for the module."""
    gc.collect()
    before = _uss()
    plain = list(records(N_ITEMS))
    plain_size = _uss() - before
    compact = forkref.compact(records(N_ITEMS))  # streamed from a generator, not from `plain`
    yield Containers(plain, plain_size, compact, sum(item["value"] for item in plain))
    del plain, compact
    gc.collect()


def _set_barrier(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def iterate_all(items: Sequence[dict[str, Any]]) -> tuple[int, int, float, int]:
    """In a worker: read every item, collect garbage, report (pid, count, checksum, USS)."""
    # Both workers start together, so each task surely runs in its own worker.
    _barrier.wait(timeout=120)
    count, total = 0, 0.0
    for item in items:
        count += 1
        total += item["value"]
    gc.collect()
    return os.getpid(), count, total, _uss()


def _run_two_workers(
    container: Sequence[dict[str, Any]], plain_size: int
) -> list[tuple[int, int, float, int]]:
    ctx = mp.get_context("fork")
    handle = forkref.share(container)
    try:
        with (
            forkref.fork_hygiene(),
            ctx.Pool(2, initializer=_set_barrier, initargs=(ctx.Barrier(2),)) as pool,
        ):
            results = pool.map(iterate_all, [handle, handle], chunksize=1)
    finally:
        handle.release()
    usses = ", ".join(f"{uss / MiB:.1f} MiB" for *_, uss in results)
    print(
        f"\n{type(container).__name__} of {N_ITEMS} dicts ({plain_size / MiB:.0f} MiB as a list): "
        f"worker USS after reading all: {usses}"
    )
    return results


@pytest.mark.timeout(300)
def test_workers_reading_a_compact_list_stay_under_5_percent(containers: Containers) -> None:
    assert containers.plain_size > 300 * MiB, "the plain list should take ~0.7 GiB"
    results = _run_two_workers(containers.compact, containers.plain_size)
    assert len({pid for pid, *_ in results}) == 2
    limit = BOUND * containers.plain_size
    for _, count, total, uss in results:
        assert count == N_ITEMS
        assert total == containers.checksum
        assert uss <= limit, (
            f"worker USS {uss / MiB:.0f} MiB > {limit / MiB:.0f} MiB "
            f"(5% of the plain list's {containers.plain_size / MiB:.0f} MiB)"
        )


@pytest.mark.timeout(300)
def test_workers_reading_the_plain_list_copy_it(containers: Containers) -> None:
    """The control: the same bound fails for a plain list, because reads write refcounts."""
    results = _run_two_workers(containers.plain, containers.plain_size)
    assert len({pid for pid, *_ in results}) == 2
    for _, count, total, uss in results:
        assert count == N_ITEMS
        assert total == containers.checksum
        assert uss > BOUND * containers.plain_size
        assert uss > 0.25 * containers.plain_size  # typically about half of it


# --- gc hygiene ------------------------------------------------------------------

GC_OBJECTS = 1_000_000


def _child_uss_growth_after_collect() -> int:
    """Fork; the child runs gc.collect() and reports how much its USS grew."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            before = _uss()
            gc.collect()
            os.write(write_end, struct.pack("q", _uss() - before))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = os.read(read_end, 8)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert len(data) == 8, "the child died before reporting"
    (growth,) = struct.unpack("q", data)
    return int(growth)


@pytest.mark.timeout(120)
def test_child_gc_collect_unshares_tracked_objects_unless_fork_hygiene() -> None:
    gc.collect()
    before = _uss()
    tracked = [[i] for i in range(GC_OBJECTS)]  # small lists: gc-tracked containers
    size = _uss() - before
    assert gc.is_tracked(tracked[0])

    without = _child_uss_growth_after_collect()
    with forkref.fork_hygiene():
        with_hygiene = _child_uss_growth_after_collect()
    print(
        f"\nchild USS growth after gc.collect() over {size / MiB:.0f} MiB of tracked objects: "
        f"{without / MiB:.1f} MiB without fork_hygiene, {with_hygiene / MiB:.1f} MiB with it"
    )
    assert without > 0.3 * size  # the collector wrote into every object's header
    assert with_hygiene < 0.05 * size
    del tracked
