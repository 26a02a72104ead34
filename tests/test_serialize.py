"""Serialization into one segment (forkref._shm.serialize): round trips, zero copy, read-only."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import forkref
from forkref._shm import segments, serialize

pytestmark = pytest.mark.timeout(120)


class Segment:
    """An object written to an anonymous segment and mapped read-only."""

    def __init__(self, obj: object) -> None:
        self.plan = serialize.plan(obj)
        fd = segments.create_anonymous(self.plan.size, "a test object")
        try:
            serialize.write(self.plan, fd, "a test object")
            self.mapping = segments.map_readonly(fd, self.plan.size)
        finally:
            os.close(fd)
        # numpy can view a read-only mmap; its data pointer is the mapping's base.
        self.base = np.frombuffer(self.mapping, np.uint8).__array_interface__["data"][0]

    def rebuild(self) -> Any:
        return serialize.rebuild(self.mapping)

    def contains(self, address: int, nbytes: int = 1) -> bool:
        return self.base <= address and address + nbytes <= self.base + self.plan.size


def _numpy_address(arr: np.ndarray) -> int:
    return int(arr.__array_interface__["data"][0])


def _arrow_buffers(obj: Any) -> Iterator[pa.Buffer]:
    if isinstance(obj, pa.Table):
        for column in obj.columns:
            yield from _arrow_buffers(column)
    elif isinstance(obj, pa.ChunkedArray):
        for chunk in obj.chunks:
            yield from _arrow_buffers(chunk)
    else:
        for buf in obj.buffers():
            if buf is not None and buf.size:
                yield buf


def _frame() -> pd.DataFrame:
    n = 50_000
    return pd.DataFrame(
        {
            "f": np.arange(n, dtype=np.float64),
            "i": np.arange(n, dtype=np.int32),
            # Arrow-backed on every pandas (pandas 3's default "str" is too;
            # pandas 2's default is object dtype, which pickles in band).
            "s": pd.array([f"row{i}" for i in range(n)], dtype="string[pyarrow]"),
            "n": pd.array([None if i % 7 == 0 else i for i in range(n)], dtype="Int64"),
            "c": pd.Categorical(["a", "b", "c", "d"] * (n // 4)),
            "a": pd.array(np.arange(n, dtype=np.float32), dtype="float32[pyarrow]"),
        },
        index=pd.RangeIndex(n),
    )


@pytest.mark.smoke
def test_numpy_round_trip_is_zero_copy_aligned_and_read_only() -> None:
    arr = np.arange(1_000_000, dtype=np.float64).reshape(1000, 1000)
    seg = Segment(arr)
    again = seg.rebuild()
    np.testing.assert_array_equal(again, arr)
    assert seg.contains(_numpy_address(again), again.nbytes)
    assert _numpy_address(again) % serialize.ALIGN == 0
    assert not again.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        again[0, 0] = 1.0
    with pytest.raises(ValueError, match="WRITEABLE"):
        again.setflags(write=True)  # cannot be made writable either


def test_fortran_and_non_contiguous_arrays() -> None:
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    strided = np.arange(100.0)[::3]  # not contiguous: pickled in band, still right
    seg = Segment({"F": fortran, "strided": strided})
    again = seg.rebuild()
    np.testing.assert_array_equal(again["F"], fortran)
    assert again["F"].flags.f_contiguous
    assert seg.contains(_numpy_address(again["F"]), fortran.nbytes)
    np.testing.assert_array_equal(again["strided"], strided)


@pytest.mark.smoke
def test_dataframe_every_column_buffer_lies_in_the_segment() -> None:
    df = _frame()
    seg = Segment(df)
    again = seg.rebuild()
    pd.testing.assert_frame_equal(again, df)
    assert len(seg.plan.inband) < 4096  # only the object graph is in band
    for name in ("f", "i"):
        values = again[name].to_numpy(copy=False)
        assert seg.contains(_numpy_address(values), values.nbytes), name
    mask_array = again["n"].array
    assert seg.contains(_numpy_address(mask_array._data), mask_array._data.nbytes)
    assert seg.contains(_numpy_address(mask_array._mask), mask_array._mask.nbytes)
    codes = again["c"].array.codes
    assert seg.contains(_numpy_address(codes), codes.nbytes)
    for name in ("s", "a"):
        buffers = list(_arrow_buffers(again[name].array._pa_array))
        assert buffers, name
        for buf in buffers:
            assert seg.contains(buf.address, buf.size), name
            assert buf.address % 8 == 0


def test_dataframe_writes_never_reach_the_segment() -> None:
    df = _frame()
    seg = Segment(df)
    again = seg.rebuild()
    # In place on a read-only block: pandas refuses.
    with pytest.raises(ValueError, match="read-only"):
        again.iloc[0, 0] = -1.0
    # Replacing a column, or a modified copy: lands in private memory.
    again["f"] = again["f"] + 1
    plus = again.copy()
    plus.loc[1, "i"] = -5
    assert plus.loc[1, "i"] == -5
    # The segment still holds the original bytes.
    pd.testing.assert_frame_equal(seg.rebuild(), df)


def test_series_and_arrow_objects_are_zero_copy() -> None:
    table = pa.table(
        {"x": pa.array(np.arange(10_000.0)), "y": pa.array([str(i) for i in range(10_000)])}
    )
    chunked = pa.chunked_array([pa.array(np.arange(100)), pa.array(np.arange(50))])
    series = pd.Series(np.arange(10_000, dtype=np.int64), name="s")
    seg = Segment((table, chunked, series))
    table2, chunked2, series2 = seg.rebuild()
    assert table2.equals(table)
    assert chunked2.equals(chunked)
    pd.testing.assert_series_equal(series2, series)
    for buf in [*_arrow_buffers(table2), *_arrow_buffers(chunked2)]:
        assert seg.contains(buf.address, buf.size)
    values = series2.to_numpy(copy=False)
    assert seg.contains(_numpy_address(values), values.nbytes)


def test_object_dtype_strings_are_pickled_in_band() -> None:
    # The documented limit: Python objects (pandas 2's default string
    # column) have no buffer to hand over, so they are copied in band.
    n = 20_000
    df = pd.DataFrame({"s": pd.Series([f"row{i}" for i in range(n)], dtype=object)})
    seg = Segment(df)
    assert len(seg.plan.inband) > n * 4
    pd.testing.assert_frame_equal(seg.rebuild(), df)


def test_plain_python_objects_round_trip() -> None:
    obj = {"a": [1, 2, (3, "x")], "b": {"nested": b"bytes" * 100}, "c": None}
    seg = Segment(obj)
    assert seg.plan.buffers == ()
    assert seg.rebuild() == obj


def test_mapping_lives_as_long_as_a_rebuilt_buffer() -> None:
    seg = Segment(np.arange(1000.0))
    arr = seg.rebuild()
    mapping = seg.mapping
    del seg
    with pytest.raises(BufferError):
        mapping.close()  # still exported to the array: not unmapped under it
    assert arr.sum() == sum(range(1000))
    del arr
    mapping.close()


def test_corrupt_segment_is_a_clear_error() -> None:
    bad = mmap.mmap(-1, 4096)
    bad.write(b"NOTFORKREF" + b"\0" * 100)
    with pytest.raises(forkref.SharedMemoryError, match="corrupt forkref segment"):
        serialize.rebuild(bad)
    tiny = mmap.mmap(-1, 16)
    with pytest.raises(forkref.SharedMemoryError, match="corrupt"):
        serialize.rebuild(tiny)


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary()
)
_arrays = hnp.arrays(
    dtype=st.one_of(hnp.integer_dtypes(), hnp.floating_dtypes(), hnp.boolean_dtypes()),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=20),
)
_objects = st.recursive(
    st.one_of(_scalars, _arrays),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=60, deadline=None)
@given(_objects)
def test_round_trip_property(obj: Any) -> None:
    seg = Segment(obj)
    again = seg.rebuild()
    assert _equal(obj, again)
    for offset in seg.plan.offsets:
        assert offset % serialize.ALIGN == 0
