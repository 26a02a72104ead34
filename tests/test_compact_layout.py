"""The column layout: what real datasets hold round-trips exactly, by column when it can."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import forkref
from forkref import CompactError

int64s = st.integers(-(1 << 63), (1 << 63) - 1)
floats = st.floats(allow_nan=False)
cells = (
    int64s
    | st.integers()
    | floats
    | st.booleans()
    | st.text(max_size=12)
    | st.binary(max_size=8)
    | st.none()
    | st.lists(int64s, max_size=5)
    | st.tuples(floats, floats)
)
field_names = st.lists(st.text(max_size=6), min_size=1, max_size=5, unique=True)


def _kinds(c: forkref.CompactList[Any]) -> list[str]:
    return [column.kind for column in c._layout.columns]


def _same(items: list[Any], c: forkref.CompactList[Any]) -> None:
    """Equal, same length, same types at the top and in each field, by index and iteration."""
    assert len(c) == len(items)
    assert list(c) == items
    for i, item in enumerate(items):
        got = c[i]
        assert got == item
        assert type(got) is type(item)
        if isinstance(item, dict):
            assert list(got) == list(item)
            assert [type(v) for v in got.values()] == [type(v) for v in item.values()]


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_records_sharing_their_keys(data: st.DataObject) -> None:
    keys = data.draw(field_names)
    kinds = {
        key: data.draw(st.sampled_from([int64s, floats, st.text(max_size=8), cells]))
        for key in keys
    }
    record = st.fixed_dictionaries({key: kinds[key] for key in keys})
    items = data.draw(st.lists(record, max_size=30))
    c = forkref.compact(iter(items))
    _same(items, c)
    part = data.draw(st.slices(max(len(items), 1)))
    assert c[part] == items[part]
    assert pickle.loads(pickle.dumps(c)) == items


@settings(max_examples=120, deadline=None)
@given(st.lists(st.tuples(int64s, st.text(max_size=5), st.lists(int64s, max_size=4)), max_size=30))
def test_tuples_of_one_arity(items: list[tuple[Any, ...]]) -> None:
    c = forkref.compact(items)
    _same(items, c)
    if items:
        assert _kinds(c) == ["int", "str", "ints"] or "pickle" in _kinds(c)


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.text(max_size=20), max_size=40)
    | st.lists(st.lists(int64s, min_size=1, max_size=8), max_size=30)
    | st.lists(st.tuples(int64s, int64s), max_size=30)
    | st.lists(cells, max_size=30)
)
def test_lists_of_one_kind_of_value(items: list[Any]) -> None:
    _same(items, forkref.compact(items))


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.int64, np.uint8]),
            shape=hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=5),
        ),
        max_size=15,
    )
)
def test_numpy_arrays_come_back_as_read_only_views(arrays: list[Any]) -> None:
    c = forkref.compact(arrays)
    assert len(c) == len(arrays)
    for got, original in zip(c, arrays, strict=True):
        assert got.dtype == original.dtype
        assert got.shape == original.shape
        np.testing.assert_array_equal(got, original)


def test_regular_data_is_stored_by_column() -> None:
    items = [
        {"id": i, "name": f"n{i}", "w": i / 3, "ok": i % 2 == 0, "tok": [i, 2]} for i in range(50)
    ]
    assert _kinds(forkref.compact(items)) == ["int", "str", "float", "bool", "ints"]
    assert _kinds(forkref.compact(f"s{i}" for i in range(9))) == ["str"]
    arrays = forkref.compact([np.arange(i, dtype=np.float32) for i in range(1, 9)])
    assert _kinds(arrays) == ["array"]
    view = arrays[3]
    assert not view.flags.writeable
    assert not view.flags.owndata  # a view of the shared buffer, not a copy
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1


def test_a_field_that_changes_type_becomes_a_pickle_column_others_stay() -> None:
    items = [{"id": i, "label": i} for i in range(20)] + [{"id": 20, "label": "x"}]
    c = forkref.compact(items)
    assert _kinds(c) == ["int", "pickle"]
    _same(items, c)


def test_irregular_items_become_whole_pickles() -> None:
    items: list[Any] = [{"a": 1}, {"b": 2}, [1, "x"], None, {"a": 1, "b": 2}]
    c = forkref.compact(items)
    assert _kinds(c) == ["pickle"]
    _same(items, c)
    with pytest.raises(CompactError, match=r"item 3\['a'\] \(a function\) cannot be pickled"):
        forkref.compact([{"a": 1}, {"a": 2}, {"a": 3}, {"a": lambda: 0}])


class Flag(int):
    """An int subclass: must come back as itself, not as an int."""


def test_ints_beyond_int64_and_subclasses_keep_their_values_and_types() -> None:
    items = [1, 2, 1 << 70, True, Flag(3)]
    c = forkref.compact(items)
    _same(items, c)
    assert type(c[4]) is Flag


def test_dicts_of_string_keys_to_token_lists() -> None:
    vocab = {f"word{i}": [i, i + 1, i + 2] for i in range(1000)}
    d = forkref.compact_dict(vocab)
    assert d == vocab
    assert d["word999"] == [999, 1000, 1001]
    assert [column.kind for column in d._keys._layout.columns] == ["str"]
    assert [column.kind for column in d._values._layout.columns] == ["ints"]


@pytest.mark.parametrize(
    "items",
    [
        [[0, 1 << 63]],  # overflows int64 after a first element went in
        [[1, 2], [3, -(1 << 64)], [4]],
        [(1.5, 2.5), (3.5, 4)],  # an int among floats
        [[1, 2], (3, 4)],  # a tuple among lists
    ],
)
def test_token_lists_that_do_not_fit_keep_their_values(items: list[Any]) -> None:
    _same(items, forkref.compact(items))
