"""Compact containers handed to other processes: one shared segment, never copied per worker.

multiprocessing's pickler (ForkingPickler) and forkref's task pickler send a
reference to an anonymous segment; plain ``pickle.dumps`` sends the bytes,
which load in an unrelated process. Nothing is left behind.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import operator
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import pytest

import forkref
from forkref import CompactError
from forkref._shm import segments

METHODS = ["fork", "forkserver", "spawn"]


def records(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "name": f"item-{i}", "value": i * 0.5, "tokens": [i, i + 1]}


def _segment_fds() -> set[str]:
    """Descriptors of this process that point into the segment directory."""
    directory = os.path.realpath(segments.segment_dir())
    found = set()  # a mapping may hold a duplicate of the descriptor (before 3.13)
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(directory + "/"):
            found.add(target)
    return found


def test_forking_pickler_sends_a_reference_pickle_dumps_the_bytes() -> None:
    c = forkref.compact(records(50_000))
    by_reference = bytes(ForkingPickler.dumps(c))
    for_storage = pickle.dumps(c)
    assert len(by_reference) < 1000
    assert len(for_storage) > c.nbytes
    assert pickle.loads(by_reference) == c  # in this process: the same buffers
    assert pickle.loads(for_storage) == c
    # The parent reads the segment from now on: its heap copy is gone.
    assert type(c._layout.buffers()[0].obj).__name__ == "mmap"


def test_stored_bytes_load_in_an_unrelated_process() -> None:
    c = forkref.compact(records(20_000))
    d = forkref.compact_dict((f"k{i}", i) for i in range(20_000))
    ForkingPickler.dumps(c)  # exported first: storage must still carry the bytes
    ForkingPickler.dumps(d)
    script = textwrap.dedent(
        """
        import pickle, sys
        c, d = pickle.loads(sys.stdin.buffer.read())
        print(len(c), sum(r["value"] for r in c), c[7]["tokens"], d["k19999"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps((c, d)),
        capture_output=True,
        check=True,
    ).stdout.split()
    assert out == [b"20000", str(sum(r["value"] for r in c)).encode(), b"[7,", b"8]", b"19999"]


def _where_it_reads(c: forkref.CompactList[dict[str, Any]]) -> tuple[int, float, str]:
    return len(c), sum(item["value"] for item in c), type(c._layout.buffers()[0].obj).__name__


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_stdlib_pool_workers_map_the_segment(method: str) -> None:
    gc.collect()
    before = _segment_fds()
    c = forkref.compact(records(30_000))
    expected = sum(item["value"] for item in records(30_000))
    with mp.get_context(method).Pool(2) as pool:
        results = pool.map(_where_it_reads, [c, c, c[:10]], chunksize=1)
    assert results[:2] == [(30_000, expected, "mmap")] * 2
    assert results[2] == (10, sum(i * 0.5 for i in range(10)), "mmap")
    fds = _segment_fds() - before
    assert len(fds) == 1, fds  # one segment, written once for every task
    del c, results
    assert _segment_fds() == before  # released with the container, without a gc pass


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_process_and_a_queue_receive_a_dict(method: str) -> None:
    d = forkref.compact_dict((f"k{i}", {"n": i}) for i in range(50_000))
    with mp.get_context(method).Pool(1) as pool:
        assert pool.apply(operator.getitem, (d, "k49999")) == {"n": 49999}
        assert pool.apply(operator.contains, (d, "k50000")) is False
    assert len(bytes(ForkingPickler.dumps(d))) < 2000


def test_a_reference_to_a_released_container_is_a_clear_error() -> None:
    c = forkref.compact(records(20_000))
    reference = bytes(ForkingPickler.dumps(c))
    script = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    del c
    gc.collect()
    failed = subprocess.run(
        [sys.executable, "-c", script], input=reference, capture_output=True, check=False
    )
    assert failed.returncode != 0
    assert b"CompactError" in failed.stderr
    assert b"keep the container alive" in failed.stderr.replace(b"\n", b" ").lower() or (
        b"Keep the container alive" in failed.stderr
    )


def test_a_malformed_reference_is_a_clear_error() -> None:
    from forkref._memory import handover

    with pytest.raises(CompactError, match="malformed"):
        handover.attach((1, 2), "a CompactList")


def _total(c: forkref.CompactList[dict[str, Any]]) -> float:
    return sum(item["value"] for item in c)


@pytest.mark.timeout(120)
def test_forkref_spawn_pool_tasks_carry_a_reference() -> None:
    c = forkref.compact(records(30_000))
    with forkref.Pool(2, context=mp.get_context("spawn"), share_threshold=None) as pool:
        assert pool.map(_total, [c] * 3) == [_total(c)] * 3
    assert type(c._layout.buffers()[0].obj).__name__ == "mmap"  # went through the segment


def test_thousands_of_hand_overs_write_one_segment() -> None:
    """What every epoch without persistent workers does: pickle the dataset again."""
    gc.collect()
    before = _segment_fds()
    c = forkref.compact(records(20_000))
    first = bytes(ForkingPickler.dumps(c))
    for _ in range(3000):
        assert bytes(ForkingPickler.dumps(c)) == first
        assert pickle.loads(first)._layout is c._layout
    assert len(_segment_fds() - before) == 1
