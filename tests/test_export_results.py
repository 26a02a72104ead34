"""Big results back to the parent through a segment: export_result / import_result."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import forkref
from forkref._shm import segments as _shm
from procmaps import mapping_of

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _stop_janitor() -> Iterator[None]:
    # A janitor started by this test process would outlive the test.
    yield
    _shm.stop_janitor()


def _segments() -> set[str]:
    return {n for n in os.listdir(_shm.segment_dir()) if n.startswith(_shm.RESULT_PREFIX)}


def big_result(n: int) -> Any:
    """Worker: a result of ``n`` float64 values, exported when big."""
    return forkref.export_result(np.arange(n, dtype=np.float64))


def frame_result(n: int) -> Any:
    return forkref.export_result(
        pd.DataFrame({"x": np.arange(n, dtype=np.float64), "s": [str(i) for i in range(n)]})
    )


def failing_result(n: int) -> Any:
    return forkref.export_result(np.ones(n))


def test_small_and_unsupported_results_are_returned_unchanged() -> None:
    small = np.arange(10.0)
    assert forkref.export_result(small) is small
    big_list = list(range(1_000_000))
    assert forkref.export_result(big_list) is big_list
    big = np.ones(2 * MiB)
    assert forkref.export_result(big, threshold=None) is big
    assert forkref.import_result(big) is big
    assert forkref.import_result("anything") == "anything"
    assert _segments() == set()


@pytest.mark.smoke
@pytest.mark.parametrize("kind", ["numpy", "pandas", "arrow"])
def test_round_trip_is_zero_copy_read_only_and_unlinks_at_once(kind: str) -> None:
    n = 300_000
    obj: Any = {
        "numpy": np.arange(n, dtype=np.float64),
        "pandas": pd.DataFrame({"x": np.arange(n, dtype=np.float64)}),
        "arrow": pa.table({"x": pa.array(np.arange(n, dtype=np.float64))}),
    }[kind]
    token = forkref.export_result(obj)
    assert isinstance(token, forkref.ResultToken)
    assert len(pickle.dumps(token)) < 300
    assert len(_segments()) == 1
    again = forkref.import_result(pickle.loads(pickle.dumps(token)))
    assert _segments() == set()  # the name went at import
    if kind == "numpy":
        np.testing.assert_array_equal(again, obj)
        data, writeable = again.__array_interface__["data"][0], again.flags.writeable
    elif kind == "pandas":
        pd.testing.assert_frame_equal(again, obj)
        values = again["x"].to_numpy(copy=False)
        data, writeable = values.__array_interface__["data"][0], values.flags.writeable
    else:
        assert again.equals(obj)
        buffer = again.column("x").chunk(0).buffers()[1]
        data, writeable = buffer.address, buffer.is_mutable
    mapping = mapping_of(data)
    assert mapping.startswith(
        os.path.join(os.path.realpath(_shm.segment_dir()), _shm.RESULT_PREFIX)
    )
    assert mapping.endswith("(deleted)")
    assert not writeable
    with pytest.raises(forkref.SharedMemoryError, match="already imported"):
        forkref.import_result(token)


@pytest.mark.parametrize("kind", ["Pool", "ProcessPoolExecutor"])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_results_from_stdlib_pool_workers(kind: str, method: str) -> None:
    ctx = mp.get_context(method)
    sizes = [MiB, 10, 300_000]  # 8 MiB, tiny, 2.3 MiB
    if kind == "Pool":
        with ctx.Pool(2) as pool:
            raw = pool.map(big_result, sizes)
            frames = pool.map(frame_result, [200_000])
    else:
        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            raw = list(ex.map(big_result, sizes))
            frames = list(ex.map(frame_result, [200_000]))
    assert [type(r).__name__ for r in raw] == ["ResultToken", "ndarray", "ResultToken"]
    results = [forkref.import_result(r) for r in raw]
    for n, arr in zip(sizes, results, strict=True):
        np.testing.assert_array_equal(arr, np.arange(n, dtype=np.float64))
    df = forkref.import_result(frames[0])
    assert isinstance(df, pd.DataFrame)
    assert df["x"].sum() == float(sum(range(200_000)))
    assert _segments() == set()


def test_no_room_for_a_result_raises_in_the_worker_and_reaches_the_caller(
    small_tmpfs: str,
) -> None:
    # The directory setting is inherited by the spawn worker through the environment.
    with mp.get_context("spawn").Pool(1) as pool:
        with pytest.raises(forkref.SharedMemoryFullError, match="needs"):
            pool.apply(failing_result, (MiB,))
        assert pool.apply(big_result, (10,)).size == 10  # the pool is healthy
    assert os.listdir(small_tmpfs) == []


def test_unimported_result_is_unlinked_when_its_token_dies_in_the_receiver() -> None:
    # The parent stays alive (so the janitor would not act): a map whose
    # caller throws the tokens away must not leave segments behind.
    with mp.get_context("fork").Pool(2) as pool:
        tokens = pool.map(big_result, [MiB, MiB, MiB])
    assert all(isinstance(t, forkref.ResultToken) for t in tokens)
    kept = forkref.import_result(tokens[0])
    forwarded = pickle.loads(pickle.dumps(tokens[1]))  # ownership moves to the copy
    paths = [t.path for t in tokens]  # type: ignore[union-attr]
    assert _segments() == {os.path.basename(p) for p in paths[1:]}
    del tokens
    assert _segments() == {os.path.basename(paths[1])}  # only the forwarded one is left
    pid = os.fork()
    if pid == 0:  # a forked child drops its copy: not its segment to unlink
        del forwarded
        os._exit(0)
    os.waitpid(pid, 0)
    assert _segments() == {os.path.basename(paths[1])}
    assert float(forkref.import_result(forwarded)[-1]) == MiB - 1  # type: ignore[index]
    assert float(kept[-1]) == MiB - 1  # type: ignore[index]
    assert _segments() == set()
