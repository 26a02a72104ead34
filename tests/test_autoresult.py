"""Big results come back through shared memory, with no change to the task.

Real pools under every start method, every map form of both pools; the
parent's result is checked for its values, for being writable and its own,
for coming from a segment (its mapping is in ``/proc/self/maps``), and for
the segment going when the result dies. Workers killed while writing or
before replying leave nothing in the segment directory.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import forkref
from conftest import wait_until
from forkref._shm import autoresult, segments

pytestmark = pytest.mark.timeout(300)
METHODS = ["fork", "forkserver", "spawn"]
N = 300_000  # 2.4 MB of float64: above the 1 MiB default threshold


def big(i: int) -> np.ndarray:
    return np.full(N, float(i))


def pair(i: int, j: int) -> tuple[np.ndarray, int]:
    return np.full(N, float(i + j)), i


def frames(i: int) -> dict[str, Any]:
    return {
        "df": pd.DataFrame({"a": np.arange(N) + i, "b": np.ones(N)}),
        "table": pa.table({"x": np.arange(N)}),
        "small": np.arange(10),
    }


def _segment_mappings() -> int:
    with open("/proc/self/maps") as fh:
        return fh.read().count(segments.RESULT_PREFIX)


def _names() -> list[str]:
    return [n for n in os.listdir(segments.segment_dir()) if n.startswith(segments.RESULT_PREFIX)]


@pytest.fixture(params=METHODS)
def ctx(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield mp.get_context(request.param)
    gc.collect()
    assert wait_until(lambda: _segment_mappings() == 0 and not _names())


def _check(arrays: list[np.ndarray], firsts: list[float]) -> None:
    assert [float(a[0]) for a in arrays] == firsts
    assert all(len(a) == N for a in arrays)
    assert _segment_mappings() >= len(arrays)  # each one is a mapping of its segment
    arrays[0][0] = -1.0  # writable, and its own: the other results are untouched
    assert float(arrays[0][0]) == -1.0
    assert [float(a[1]) for a in arrays] == firsts


def test_every_map_form_of_the_pool(ctx: Any) -> None:
    with forkref.Pool(2, context=ctx) as pool:
        _check(pool.map(big, range(3)), [0.0, 1.0, 2.0])
        _check(list(pool.imap(big, range(3))), [0.0, 1.0, 2.0])
        _check(sorted(pool.imap_unordered(big, range(3)), key=lambda a: a[1]), [0.0, 1.0, 2.0])
        _check([a for a, _ in pool.starmap(pair, [(1, 1), (2, 2)])], [2.0, 4.0])
        _check([pool.apply_async(big, (5,)).get(), pool.apply(big, (6,))], [5.0, 6.0])


def test_every_map_form_of_the_executor(ctx: Any) -> None:
    with forkref.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        _check(list(ex.map(big, range(3))), [0.0, 1.0, 2.0])
        futures = [ex.submit(big, i) for i in (7, 8)]
        wait(futures)
        _check([f.result() for f in futures], [7.0, 8.0])


def test_frames_and_tables_come_back_whole(ctx: Any) -> None:
    with forkref.Pool(1, context=ctx) as pool:
        got = pool.apply(frames, (3,))
    assert int(got["df"]["a"].iloc[0]) == 3
    assert got["df"]["b"].sum() == N
    assert got["table"].column("x").to_pylist()[-1] == N - 1
    assert _segment_mappings() >= 2
    got["df"].loc[0, "b"] = 5.0  # an ordinary writable DataFrame
    assert got["df"]["b"].iloc[0] == 5.0


def test_the_segment_goes_with_the_result() -> None:
    with forkref.Pool(1) as pool:
        result = pool.apply(big, (1,))
        assert _segment_mappings() == 1
        del result
        gc.collect()
        assert _segment_mappings() == 0
    assert not _names()


def test_result_threshold_none_keeps_the_pipe() -> None:
    with forkref.Pool(1, result_threshold=None) as pool:
        result = pool.apply(big, (1,))
    assert float(result[0]) == 1.0
    assert _segment_mappings() == 0
    with forkref.Pool(1, result_threshold=10 * N * 8) as pool:  # above the result's size
        pool.apply(big, (1,))
        assert _segment_mappings() == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "1M"])
def test_a_bad_result_threshold_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="result_threshold must be a number of bytes"):
        forkref.Pool(1, result_threshold=bad)


class _DieWhilePickled:
    """Kills the worker while its reply is pickled, after the big part was written."""

    def __reduce__(self) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        return (int, ())


def die_after_writing(i: int) -> tuple[np.ndarray, _DieWhilePickled]:
    return np.full(N, float(i)), _DieWhilePickled()


def test_a_worker_killed_before_replying_leaves_nothing(ctx: Any) -> None:
    with forkref.Pool(1, context=ctx) as pool:
        with pytest.raises(forkref.WorkerDiedError):
            pool.apply(die_after_writing, (1,))
        assert float(pool.apply(big, (2,))[0]) == 2.0  # the pool goes on
    # The array's segment was named before the worker died: the janitor,
    # watching the worker alone until the reply is sent, unlinks it.
    assert wait_until(lambda: not _names())


def test_dumps_without_threshold_is_plain_pickle() -> None:
    import pickle

    arr = np.arange(N, dtype=np.float64)
    assert autoresult.dumps(arr, None) == pickle.dumps(arr, pickle.HIGHEST_PROTOCOL)
    assert autoresult.big_nbytes(np.array(["a", None], dtype=object)) is None
    assert autoresult.big_nbytes([1, 2]) is None


def test_a_result_with_no_room_in_shared_memory_takes_the_pipe(small_tmpfs: str) -> None:
    with forkref.Pool(1, context=mp.get_context("spawn")) as pool:
        result = pool.apply(big, (4,))  # 2.4 MB: no room in a 1 MiB tmpfs
    assert float(result[-1]) == 4.0
    assert _segment_mappings() == 0
    assert not os.listdir(small_tmpfs)
