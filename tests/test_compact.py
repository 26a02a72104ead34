"""compact() and compact_dict(): behaviour, round trips, streaming, pickling, fork sharing."""

from __future__ import annotations

import copy
import gc
import mmap
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import forkref
from forkref import CompactDict, CompactError, CompactList

# Picklable values with value equality (no NaN: a NaN never equals its copy).
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
        | st.frozensets(st.integers(), max_size=4)
    ),
    max_leaves=10,
)
hashable_keys = st.integers() | st.text(max_size=10) | st.tuples(st.integers(), st.text(max_size=3))


def records(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "name": f"item-{i}", "value": i * 0.5}


# --- CompactList behaviour -------------------------------------------------


@pytest.mark.smoke
def test_reads_like_the_list_it_came_from() -> None:
    source = list(records(50))
    c = forkref.compact(source)
    assert isinstance(c, CompactList)
    assert len(c) == 50
    assert c[0] == source[0]
    assert c[49] == source[49]
    assert c[-1] == source[-1]
    assert c[-50] == source[0]
    assert list(c) == source
    assert list(reversed(c)) == source[::-1]
    assert source[7] in c
    assert {"id": -1} not in c
    assert c.index(source[3]) == 3
    assert c.count(source[3]) == 1
    assert c == source
    assert source == c
    assert c != source[:-1]
    assert c != [*source[:-1], {"id": 0}]


def test_items_come_back_as_fresh_private_copies() -> None:
    c = forkref.compact([{"a": [1, 2]}])
    first = c[0]
    first["a"].append(3)
    assert c[0] == {"a": [1, 2]}
    assert c[0] is not c[0]


def test_bad_indices_raise_like_a_list() -> None:
    c = forkref.compact(range(3))
    with pytest.raises(IndexError, match="out of range"):
        c[3]
    with pytest.raises(IndexError, match="out of range"):
        c[-4]
    with pytest.raises(TypeError, match="integers or slices, not str"):
        c["1"]  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        c[0] = 5  # type: ignore[index]


def test_slices_are_views_on_the_same_buffer() -> None:
    c = forkref.compact(range(100))
    view = c[10:90:3]
    assert isinstance(view, CompactList)
    assert list(view) == list(range(100))[10:90:3]
    assert view._layout is c._layout  # no copy of the data
    assert view[1:3] == list(range(100))[10:90:3][1:3]  # a view of a view
    assert view[::-1] == list(range(100))[10:90:3][::-1]


def test_equality_is_with_lists_and_compact_lists_only() -> None:
    c = forkref.compact([1, 2])
    assert c == forkref.compact(iter([1, 2]))
    assert c == forkref.compact([0, 1, 2, 3])[1:3]
    assert c != (1, 2)  # like list == tuple
    assert c != forkref.compact([1, 2.5])
    with pytest.raises(TypeError):
        hash(c)


def test_compact_of_a_compact_list_shares_or_repacks() -> None:
    c = forkref.compact(range(10))
    assert forkref.compact(c) is c
    repacked = forkref.compact(c[2:5])
    assert repacked == [2, 3, 4]
    assert repacked._layout is not c._layout
    assert copy.copy(c) is c
    assert copy.deepcopy(c) is c


def test_empty() -> None:
    c = forkref.compact([])
    assert len(c) == 0
    assert list(c) == []
    assert c == []
    assert pickle.loads(pickle.dumps(c, protocol=5)) == []
    assert pickle.loads(pickle.dumps(c, protocol=2)) == []


def test_an_unpicklable_item_is_a_clear_error() -> None:
    with pytest.raises(CompactError, match=r"item 2 \(a function\) cannot be pickled") as info:
        forkref.compact([1, 2, lambda: 3])
    assert "Store only picklable values" in str(info.value)
    assert info.value.__cause__ is not None


def test_buffers_are_invisible_to_the_garbage_collector() -> None:
    """gc never writes to the data pages: neither buffer is a gc-tracked object."""
    c = forkref.compact(records(1000))
    buffers = c._layout.buffers()
    assert len(buffers) == 4  # id, name (data, offsets), value: laid out by column
    assert not any(gc.is_tracked(buffer.obj) for buffer in buffers)


@settings(max_examples=150, deadline=None)
@given(st.lists(values, max_size=30))
def test_round_trip_of_mixed_values(items: list[Any]) -> None:
    c = forkref.compact(iter(items))
    assert c == items
    assert [c[i] for i in range(-len(items), len(items))] == items + items


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_slicing_with_any_step_matches_a_list(data: st.DataObject) -> None:
    items = data.draw(st.lists(st.integers() | st.text(max_size=4), max_size=40))
    first = data.draw(st.slices(max(len(items), 1)))
    second = data.draw(st.slices(max(len(items), 1)))
    c = forkref.compact(items)
    assert c[first] == items[first]
    assert c[first][second] == items[first][second]
    assert list(reversed(c[first])) == items[first][::-1]
    for index in range(-len(items[first]), len(items[first])):
        assert c[first][index] == items[first][index]


@settings(max_examples=60, deadline=None)
@given(st.lists(values, max_size=20), st.integers(0, pickle.HIGHEST_PROTOCOL), st.data())
def test_pickles_at_every_protocol_including_slices(
    items: list[Any], protocol: int, data: st.DataObject
) -> None:
    c = forkref.compact(items)
    part = data.draw(st.slices(max(len(items), 1)))
    assert pickle.loads(pickle.dumps(c, protocol=protocol)) == items
    assert pickle.loads(pickle.dumps(c[part], protocol=protocol)) == items[part]


# --- streaming construction -------------------------------------------------


def test_building_from_a_generator_keeps_no_item_alive() -> None:
    """Peak traced memory while compacting 200k records is far below the list's."""
    n = 200_000
    tracemalloc.start()
    try:
        as_list = list(records(n))
        _, list_peak = tracemalloc.get_traced_memory()
        del as_list
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        c = forkref.compact(records(n))
        _, compact_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(c) == n
    assert c[-1] == {"id": n - 1, "name": f"item-{n - 1}", "value": (n - 1) / 2}
    # The compact buffers themselves are ~1/3 of the list; the peak may add
    # the buffer's growth slack, never N live records.
    assert compact_peak - before < 0.6 * list_peak, (compact_peak - before, list_peak)
    assert c.nbytes < 0.5 * list_peak


# --- pickling: out of band, zero copy ---------------------------------------


def test_protocol_5_hands_both_buffers_out_of_band_and_rebuilds_without_copy() -> None:
    c = forkref.compact(records(1000))
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(c, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 4  # id, name (data and offsets), value
    assert len(payload) < 300  # the data travels out of band, not in the pickle
    # What a shared-memory transport does: put the bytes somewhere, hand views back.
    received = [bytearray(buffer.raw()) for buffer in buffers]
    rebuilt = pickle.loads(payload, buffers=received)
    assert rebuilt == c
    name_data = rebuilt._layout.columns[1].buffers[0]
    assert name_data.obj is received[1]  # wraps the received memory, no copy
    with pytest.raises(TypeError):
        name_data[0:1] = b"x"  # read-only even over a writable buffer


def test_a_slice_pickles_only_its_items() -> None:
    c = forkref.compact(records(10_000))
    assert len(pickle.dumps(c[:100], protocol=5)) < len(pickle.dumps(c, protocol=5)) / 50


def test_a_corrupt_pickle_is_a_clear_error() -> None:
    c = forkref.compact(records(10))
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(c, protocol=5, buffer_callback=buffers.append)
    truncated = [buffers[0], bytes(buffers[1].raw())[:-5], *buffers[2:]]
    with pytest.raises(CompactError, match="truncated or corrupt"):
        pickle.loads(payload, buffers=truncated)


# --- under fork: by reference ------------------------------------------------


def identity_and_total(c: CompactList[dict[str, Any]]) -> tuple[int, float]:
    return id(c), sum(item["value"] for item in c)


def lookup(d: CompactDict[str, int], key: str) -> int:
    return d[key]


@pytest.mark.timeout(60)
def test_shared_compact_list_reaches_fork_workers_by_reference() -> None:
    c = forkref.compact(records(10_000))
    expected = sum(item["value"] for item in records(10_000))
    handle = forkref.share(c)
    with forkref.fork_hygiene(), mp.get_context("fork").Pool(2) as pool:
        results = pool.map(identity_and_total, [handle] * 4, chunksize=1)
    # The worker holds the very object the parent built (inherited), not a copy.
    assert results == [(id(c), expected)] * 4


@pytest.mark.timeout(60)
def test_shared_compact_dict_reaches_fork_workers_by_reference() -> None:
    d = forkref.compact_dict((f"k{i}", i) for i in range(5000))
    handle = forkref.share(d)
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.starmap(lookup, [(handle, "k17"), (handle, "k4999")]) == [17, 4999]


@pytest.mark.timeout(60)
def test_compact_list_pickles_to_a_spawn_worker() -> None:
    c = forkref.compact(records(1000))
    with mp.get_context("spawn").Pool(1) as pool:
        _, total = pool.apply(identity_and_total, (c,))
    assert total == sum(item["value"] for item in records(1000))


# --- CompactDict --------------------------------------------------------------


@pytest.mark.smoke
def test_dict_reads_like_the_dict_it_came_from() -> None:
    source = {"a": 1, "b": [2], (1, "x"): {"n": None}, 7: "seven"}
    d = forkref.compact_dict(source)
    assert isinstance(d, CompactDict)
    assert len(d) == 4
    assert list(d) == list(source)
    assert d["a"] == 1
    assert d[(1, "x")] == {"n": None}
    assert d[7] == "seven"
    assert d.get("zz") is None
    assert d.get("zz", 0) == 0
    assert "b" in d
    assert "zz" not in d
    assert list(d.items()) == list(source.items())
    assert list(d.values()) == list(source.values())
    assert ("a", 1) in d.items()
    assert ("a", 2) not in d.items()
    assert d == source
    assert source == d
    assert d != {**source, "a": 2}
    assert d != {"a": 1}
    with pytest.raises(KeyError):
        d["zz"]
    with pytest.raises(TypeError):
        d[["unhashable"]]  # type: ignore[index]
    with pytest.raises(TypeError):
        d["a"] = 2  # type: ignore[index]


def test_dict_key_semantics_follow_dict() -> None:
    d = forkref.compact_dict([(1, "int"), ("x", 0), (1.0, "float"), ("x", 2)])
    assert dict(d) == dict([(1, "int"), ("x", 0), (1.0, "float"), ("x", 2)]) == {1: "float", "x": 2}
    assert list(d) == [1, "x"]  # first position kept, last value wins
    assert d[True] == "float"  # True == 1 == 1.0, as in a dict
    assert -1 in forkref.compact_dict({-1: 0})
    assert -2 not in forkref.compact_dict({-1: 0})


def test_dict_build_errors_are_clear() -> None:
    with pytest.raises(CompactError, match=r"key 1 \(a list\) is unhashable"):
        forkref.compact_dict([("a", 1), (["b"], 2)])
    with pytest.raises(CompactError, match=r"item 0 \(str\) is not a \(key, value\) pair"):
        forkref.compact_dict(["abc"])  # type: ignore[list-item]
    with pytest.raises(CompactError, match=r"value 0 \(a function\) cannot be pickled"):
        forkref.compact_dict({"f": lambda: 1})


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(hashable_keys, values), max_size=40))
def test_dict_round_trip(pairs: list[tuple[Any, Any]]) -> None:
    expected = dict(pairs)
    d = forkref.compact_dict(iter(pairs))
    assert d == expected
    assert list(d) == list(expected)
    for key, value in expected.items():
        assert d[key] == value
    assert pickle.loads(pickle.dumps(d, protocol=5)) == expected
    assert pickle.loads(pickle.dumps(d, protocol=2)) == expected


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.integers(1, 300))
def test_dict_with_colliding_hashes(shift: int, n: int) -> None:
    """Keys sharing their low bits (multiples of 2**shift) resolve: probing mixes in high bits."""
    expected = {i << shift: i for i in range(n)}
    d = forkref.compact_dict(expected)
    assert all(d[key] == value for key, value in expected.items())
    assert (n << shift) not in d
    assert 1 not in d


def test_dict_with_many_keys_and_misses() -> None:
    d = forkref.compact_dict((f"key-{i}", i) for i in range(50_000))
    assert all(d[f"key-{i}"] == i for i in range(0, 50_000, 7))
    assert not any(f"miss-{i}" in d for i in range(5000))


_SCRIPT = textwrap.dedent(
    """
    import pickle, sys
    import forkref
    from forkref._memory import compactdict as _compact
    if sys.argv[1] == "dump":
        d = forkref.compact_dict((f"k{i}", i) for i in range(2000))
        sys.stdout.buffer.write(pickle.dumps(d, protocol=5))
    else:
        d = pickle.loads(sys.stdin.buffer.read())
        assert d._hash_probe != _compact._HASH_PROBE, "same hash salt: test is void"
        assert all(d[f"k{i}"] == i for i in range(2000)) and "k2000" not in d
        print("ok")
    """
)


@pytest.mark.timeout(60)
def test_dict_rebuilds_its_index_in_a_process_with_another_hash_salt() -> None:
    """A spawned process has its own str-hash salt: lookups must still work."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    dumped = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "dump"],
        env={**env, "PYTHONHASHSEED": "1"},
        capture_output=True,
        check=True,
    ).stdout
    loaded = subprocess.run(
        [sys.executable, "-c", _SCRIPT, "load"],
        env={**env, "PYTHONHASHSEED": "2"},
        input=dumped,
        capture_output=True,
        check=True,
    )
    assert loaded.stdout.strip() == b"ok"


def test_rebuilt_from_a_shared_memory_segment_without_copy() -> None:
    """Through forkref's segment serializer (issue 4) the buffers stay views of the mapping."""
    serialize = pytest.importorskip("forkref._shm.serialize")
    np = pytest.importorskip("numpy")
    if not all(hasattr(serialize, name) for name in ("plan", "write", "rebuild")):
        pytest.skip("forkref._shm.serialize has no plan/write/rebuild")
    c = forkref.compact(records(10_000))
    d = forkref.compact_dict((f"k{i}", i) for i in range(1000))
    in_list = lambda r: r._layout.buffers()[1]  # noqa: E731  # the names' UTF-8
    in_dict = lambda r: r._values._layout.buffers()[0]  # noqa: E731
    for obj, data in ((c, in_list), (d, in_dict)):
        plan = serialize.plan(obj)
        fd = os.memfd_create("forkref-test")
        try:
            os.ftruncate(fd, plan.size)
            serialize.write(plan, fd, "test")
            mapping = mmap.mmap(fd, plan.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        rebuilt = serialize.rebuild(mapping)
        assert rebuilt == obj
        base = np.frombuffer(mapping, dtype=np.uint8).__array_interface__["data"][0]
        inside = np.frombuffer(data(rebuilt), dtype=np.uint8).__array_interface__["data"][0]
        assert base <= inside < base + plan.size


_NONE_KEYS_SCRIPT = textwrap.dedent(
    """
    import pickle, sys
    import forkref
    if sys.argv[1] == "dump":
        d = forkref.compact_dict(((None, f"k{i}"), i) for i in range(500))
        sys.stdout.buffer.write(pickle.dumps(d, protocol=5))
    else:
        d = pickle.loads(sys.stdin.buffer.read())
        assert all(d[(None, f"k{i}")] == i for i in range(500))
        assert (None, "k500") not in d
        print("ok")
    """
)


@pytest.mark.timeout(60)
def test_dict_with_none_in_keys_survives_a_fixed_hash_seed() -> None:
    """Before 3.12 hash(None) is an address: a fixed PYTHONHASHSEED does not make it stable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONHASHSEED": "0"}
    dumped = subprocess.run(
        [sys.executable, "-c", _NONE_KEYS_SCRIPT, "dump"], env=env, capture_output=True, check=True
    ).stdout
    loaded = subprocess.run(
        [sys.executable, "-c", _NONE_KEYS_SCRIPT, "load"],
        env=env,
        input=dumped,
        capture_output=True,
        check=True,
    )
    assert loaded.stdout.strip() == b"ok"
