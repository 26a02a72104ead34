"""Big task results of ``backend="ray"`` pools come back through Ray's object store.

Module forkref._launchers.ray.results, with the actor and channel around it,
on a real local Ray: the parts arrive equal and writable (as the stdlib
gives them), the store entries are freed once the driver has them (nothing
grows over many maps), an arrow table holds its entry until it dies, and the
parts outlive an actor that retired right after replying.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest

import ray_harness  # noqa: F401  (before Ray)
from conftest import wait_until
from ray_harness import no_leftovers  # noqa: F401  (the fixture, sparing the module's Ray)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")

import forkref  # noqa: E402
from forkref._launchers.ray import results  # noqa: E402
from forkref._launchers.ray.memory import object_store_use  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("ray_instance")]

MiB = 2**20
N = MiB  # 8 MiB of float64: above the 1 MiB default threshold, and stored in plasma


def big(i: int) -> Any:
    return np.full(N, float(i))


def mixed(i: int) -> dict[str, Any]:
    return {
        "df": pd.DataFrame({"a": np.arange(N // 4) + i, "b": np.ones(N // 4)}),
        "series": pd.Series(np.full(N // 4, float(i))),
        "small": np.arange(10),
        "pid": os.getpid(),
    }


def table(i: int) -> Any:
    return pa.table({"x": np.arange(N) + i})


def _store_used() -> int:
    stores, why = object_store_use(ray)
    assert why is None, why
    return sum(s.used for s in stores)


def _mapped_from(address: int) -> str:
    """``plasma`` if ``address`` lies in a mapping of Ray's object store, else the mapping."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            span, *rest = line.split()
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= address < high:
                name = " ".join(rest[4:]) or "anonymous"
                return "plasma" if "plasma" in name else name
    return "unmapped"


@pytest.fixture
def pool() -> Iterator[forkref.Pool]:
    with forkref.Pool(2, backend="ray") as p:
        yield p
    gc.collect()
    assert not results._arrived, "every part filed in the driver was received"


def test_big_arrays_arrive_equal_and_writable(pool: forkref.Pool) -> None:
    arrays = pool.map(big, range(4))
    assert [float(a[0]) for a in arrays] == [0.0, 1.0, 2.0, 3.0]
    assert all(len(a) == N and float(a[-1]) == float(i) for i, a in enumerate(arrays))
    assert all(a.flags.writeable for a in arrays)
    arrays[0] += 5.0  # as with the stdlib: an ordinary array of the driver's own
    assert float(arrays[0][7]) == 5.0
    assert float(arrays[1][7]) == 1.0


def test_frames_come_back_writable_and_small_parts_in_the_reply(pool: forkref.Pool) -> None:
    got = pool.apply(mixed, (3,))
    assert int(got["df"]["a"].iloc[0]) == 3
    assert float(got["df"]["b"].sum()) == N // 4
    assert got["small"].tolist() == list(range(10))
    got["df"].loc[0, "b"] = 5.0
    got["series"].iloc[0] = -1.0
    assert got["df"]["b"].iloc[0] == 5.0
    assert got["series"].iloc[:2].tolist() == [-1.0, 3.0]


def test_store_entries_are_freed_once_the_driver_has_the_results(pool: forkref.Pool) -> None:
    kept = []
    for round_ in range(12):  # 12 x 4 x 8 MiB = 384 MiB through a 256 MiB store
        arrays = pool.map(big, range(4))
        assert [float(a[-1]) for a in arrays] == [0.0, 1.0, 2.0, 3.0], round_
        kept.append(arrays)  # held: they are copies, their store entries are gone
    # The raylet's figure is about a second old: wait for it, bounded.
    assert wait_until(lambda: _store_used() == 0, 30), _store_used()
    assert float(kept[0][3][0]) == 3.0


def test_numpy_parts_are_copies_and_arrow_ones_stay_in_the_store(pool: forkref.Pool) -> None:
    array = pool.apply(big, (1,))
    got = pool.apply(table, (2,))
    assert got.column("x").to_pylist()[:2] == [2, 3]
    assert got.num_rows == N
    # Where the buffers live: Ray's store is one shared mapping of a "plasma" file.
    assert _mapped_from(got.column("x").chunks[0].buffers()[1].address) == "plasma"
    assert _mapped_from(array.ctypes.data) != "plasma"  # the driver's own copy


def test_parts_outlive_an_actor_retired_right_after_replying() -> None:
    with forkref.Pool(2, backend="ray", maxtasksperchild=1) as p:
        arrays = p.map(big, range(4), chunksize=1)
    assert [float(a[0]) for a in arrays] == [0.0, 1.0, 2.0, 3.0]


def test_big_results_below_the_threshold_or_with_none_take_the_reply() -> None:
    # Big enough for Ray to keep the call's return in its store, not inline.
    with forkref.Pool(1, backend="ray", result_threshold=None) as p:
        arrays = p.map(big, range(2))
    with forkref.Pool(1, backend="ray", result_threshold=16 * N) as p:
        arrays += p.map(big, range(2))
    assert [float(a[1]) for a in arrays] == [0.0, 1.0, 0.0, 1.0]
    assert all(a.flags.writeable for a in arrays)
    assert not results._arrived


def test_a_part_is_received_once() -> None:
    parts: results.Parts = []
    blob = results.dumps(np.ones(1000), 0, parts)
    ((token, _),) = parts
    results.arrive(parts)
    import pickle

    assert float(pickle.loads(blob).sum()) == 1000.0
    with pytest.raises(forkref.Error, match="can be unpickled once"):
        pickle.loads(blob)
    results.discard([token])
