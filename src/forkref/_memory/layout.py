"""How a compact list lays its items out: typed columns in flat buffers.

Most big lists of small objects are lists of *records*: dicts with the same
keys in the same order (an annotations file), tuples of one arity, or one
kind of scalar (strings, ints, token lists, numpy arrays). A :class:`Layout`
stores each field of every item as one column of flat, read-only buffers::

    items   {"id": 7, "name": "cat", "box": [1, 2, 3]}, {"id": 8, ...}, ...
    id      int64   | 7 | 8 | ...                                   (1 buffer)
    name    utf-8   |cat|dog|...  + int64 offsets 0 3 6 ...         (2 buffers)
    box     int64   |1|2|3|4|5|...+ int64 offsets 0 3 5 ...         (2 buffers)

Reading item ``i`` reads one cell per column straight into a new Python
object (an int from an int64 buffer costs about what a list read does; a
string is one UTF-8 decode) and builds the dict with a generated function
(``{k0: g0(i), k1: g1(i), ...}``, the fastest way CPython builds a dict).
A field whose values do not fit one typed kind is a *pickle* column: one
pickle per cell, back to back. Irregular items (keys that differ, mixed
types) are one pickle column of whole items: the general case.

Column kinds and their buffers (``offsets`` are int64, one more than cells):

    int, float, bool     values                     ``q``, ``d``, ``?``
    str, bytes, pickle   data (bytes), offsets
    ints, floats         values (``q``/``d``), offsets   a list or tuple per cell
    array                data, byte offsets, shapes      a read-only numpy view per cell

Buffers are plain ``bytes`` (or views of a shared mapping): not gc-tracked,
never written after they are built, so forked readers leave their pages
shared. ``spec`` (the shape, keys and column kinds) plus ``buffers`` is all a
layout is; :func:`from_parts` rebuilds one from them without copying.

Non-goals: no schema declared by the user (kinds are inferred from the
data); identity and subclass types are not preserved (a bool stays a bool
and an int an int, but an ``IntEnum`` goes into a pickle column to keep its
type).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

from forkref._errors import CompactError

__all__ = ["ITEM", "Column", "Layout", "from_parts", "make_column"]

ITEM, DICT, TUPLE = "item", "dict", "tuple"
_SHAPES = (ITEM, DICT, TUPLE)
_FIXED = {"int": "q", "float": "d", "bool": "?"}
_RAGGED = {"ints": "q", "floats": "d"}
_loads = pickle.loads


class Column:
    """One field of every item: its kind, its buffers, and ``get(i)`` reading cell ``i``."""

    __slots__ = ("buffers", "extra", "get", "kind")

    def __init__(self, kind: str, extra: Any, buffers: list[memoryview], get: Any) -> None:
        self.kind = kind
        self.extra = extra  # what the kind needs besides buffers (container type, dtype)
        self.buffers = buffers
        self.get: Callable[[int], Any] = get


def _raw(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly()


def _typed(buffer: Any, fmt: str, what: str) -> memoryview:
    raw = _raw(buffer)
    size = 1 if fmt == "?" else 8
    if len(raw) % size:
        raise _corrupt(f"a {what} buffer has {len(raw)} bytes, not a multiple of {size}")
    typed: memoryview = raw.cast(fmt)  # type: ignore[call-overload]
    return typed


def _corrupt(detail: str) -> CompactError:
    return CompactError(
        f"rebuilding a compact container: {detail}; the pickle is truncated or corrupt, "
        "pickle the container again"
    )


def _check_offsets(offsets: memoryview, cells: int, end: int, what: str) -> None:
    if len(offsets) != cells + 1 or offsets[0] != 0 or offsets[-1] != end:
        raise _corrupt(f"the offsets of a {what} column do not match its data ({end} units)")


def make_column(kind: str, extra: Any, buffers: Sequence[Any], cells: int) -> Column:
    """A column over ``buffers`` (any buffer objects), checked against ``cells`` cells."""
    if kind in _FIXED:
        (values,) = buffers
        view = _typed(values, _FIXED[kind], kind)
        if len(view) != cells:
            raise _corrupt(f"an {kind} column has {len(view)} cells, not {cells}")
        return Column(kind, extra, [view], view.__getitem__)
    if kind in ("str", "bytes", "pickle"):
        data, offsets = _raw(buffers[0]), _typed(buffers[1], "q", "offsets")
        _check_offsets(offsets, cells, len(data), kind)
        return Column(kind, extra, [data, offsets], _VARIABLE[kind](data, offsets))
    if kind in _RAGGED:
        values = _typed(buffers[0], _RAGGED[kind], kind)
        offsets = _typed(buffers[1], "q", "offsets")
        _check_offsets(offsets, cells, len(values), kind)
        return Column(kind, extra, [values, offsets], _ragged_reader(values, offsets, extra))
    if kind == "array":
        return _array_column(extra, buffers, cells)
    raise _corrupt(f"unknown column kind {kind!r}")


def _str_reader(data: memoryview, offsets: memoryview) -> Callable[[int], str]:
    def get(i: int) -> str:
        return str(data[offsets[i] : offsets[i + 1]], "utf-8", "surrogatepass")

    return get


def _bytes_reader(data: memoryview, offsets: memoryview) -> Callable[[int], bytes]:
    def get(i: int) -> bytes:
        return data[offsets[i] : offsets[i + 1]].tobytes()

    return get


def _pickle_reader(data: memoryview, offsets: memoryview) -> Callable[[int], Any]:
    def get(i: int) -> Any:
        return _loads(data[offsets[i] : offsets[i + 1]])

    return get


_VARIABLE: dict[str, Callable[[memoryview, memoryview], Callable[[int], Any]]] = {
    "str": _str_reader,
    "bytes": _bytes_reader,
    "pickle": _pickle_reader,
}


def _ragged_reader(values: memoryview, offsets: memoryview, container: str) -> Any:
    if container == "tuple":

        def get_tuple(i: int) -> tuple[Any, ...]:
            return tuple(values[offsets[i] : offsets[i + 1]])

        return get_tuple

    def get_list(i: int) -> list[Any]:
        return values[offsets[i] : offsets[i + 1]].tolist()

    return get_list


def _array_column(extra: Any, buffers: Sequence[Any], cells: int) -> Column:
    import numpy as np  # only containers built from numpy arrays get here

    dtype_str, ndim = extra
    dtype = np.dtype(dtype_str)
    data, offsets = _raw(buffers[0]), _typed(buffers[1], "q", "offsets")
    shapes = _typed(buffers[2], "q", "shapes")
    _check_offsets(offsets, cells, len(data), "array")
    if len(shapes) != cells * ndim:
        raise _corrupt(f"an array column has {len(shapes)} shape entries, not {cells * ndim}")

    def get(i: int) -> Any:
        shape = tuple(shapes[i * ndim : (i + 1) * ndim])
        # A view of the buffer, not a copy: read-only because the buffer is.
        return np.frombuffer(data[offsets[i] : offsets[i + 1]], dtype=dtype).reshape(shape)

    return Column("array", extra, [data, offsets, shapes], get)


class Layout:
    """The items of a compact list: a shape (dict, tuple or item), keys, and columns.

    ``read(i)`` returns item ``i`` as a new Python object. A layout is
    immutable in content; :meth:`rebind` may move it onto other buffers with
    the same bytes (a shared mapping), which every container using it sees.
    """

    __slots__ = ("__weakref__", "columns", "keys", "length", "read", "segment", "shape")

    def __init__(self, shape: str, keys: tuple[Any, ...], columns: list[Column], length: int):
        self.shape, self.keys, self.length = shape, keys, length
        self.columns = columns
        self.read: Callable[[int], Any] = _reader(shape, keys, columns)
        self.segment: Any = None  # set by the hand-over to other processes

    def spec(self) -> tuple[Any, ...]:
        """What, with :meth:`buffers`, rebuilds this layout: small and picklable."""
        kinds = tuple((c.kind, c.extra) for c in self.columns)
        return (self.shape, self.keys, kinds, self.length, sys.byteorder)

    def buffers(self) -> list[memoryview]:
        """Every buffer, in column order, as flat byte views."""
        return [_raw(b) for c in self.columns for b in c.buffers]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for c in self.columns for b in c.buffers)

    def rebind(self, buffers: Sequence[Any]) -> None:
        """Read from ``buffers`` from now on: the same bytes, somewhere else."""
        rebuilt = from_parts(self.spec(), buffers)
        self.columns = rebuilt.columns
        self.read = rebuilt.read


# How the generated reader reads cell i of a column inline ({a}, {b}: the
# column's first two buffers): no Python call per cell. Kinds not listed
# (array) are read by calling the column's getter.
_INLINE = {
    "int": "{a}[i]",
    "float": "{a}[i]",
    "bool": "{a}[i]",
    "str": "str({a}[{b}[i] : {b}[i + 1]], 'utf-8', 'surrogatepass')",
    "bytes": "{a}[{b}[i] : {b}[i + 1]].tobytes()",
    "pickle": "_loads({a}[{b}[i] : {b}[i + 1]])",
    "ints list": "{a}[{b}[i] : {b}[i + 1]].tolist()",
    "floats list": "{a}[{b}[i] : {b}[i + 1]].tolist()",
    "ints tuple": "tuple({a}[{b}[i] : {b}[i + 1]])",
    "floats tuple": "tuple({a}[{b}[i] : {b}[i + 1]])",
}


def _cell(j: int, column: Column, names: dict[str, Any]) -> str:
    """Source reading cell ``i`` of column ``j``; binds what it uses in ``names``."""
    kind = f"{column.kind} {column.extra}" if column.kind in _RAGGED else column.kind
    template = _INLINE.get(kind)
    if template is None:
        names[f"g{j}"] = column.get
        return f"g{j}(i)"
    names[f"a{j}"] = column.buffers[0]
    names[f"b{j}"] = column.buffers[-1]
    return template.format(a=f"a{j}", b=f"b{j}")


def _reader(shape: str, keys: tuple[Any, ...], columns: list[Column]) -> Callable[[int], Any]:
    if shape == ITEM and columns[0].kind in _FIXED:
        return columns[0].get  # a bound memoryview.__getitem__: C all the way
    # A generated function, like namedtuple's and dataclasses': a dict display
    # with every cell read inline is several times faster than
    # dict(zip(keys, ...)). Only names made here enter the source; keys and
    # buffers are values in its namespace.
    names: dict[str, Any] = {"_loads": _loads}
    names.update({f"k{j}": k for j, k in enumerate(keys)})
    cells = [_cell(j, column, names) for j, column in enumerate(columns)]
    if shape == DICT:
        body = "{" + ", ".join(f"k{j}: {cell}" for j, cell in enumerate(cells)) + "}"
    elif shape == TUPLE:
        body = "(" + "".join(f"{cell}, " for cell in cells) + ")"
    else:
        body = cells[0]
    exec(f"def read(i):\n    return {body}\n", names)
    # Out of its own globals: no reference cycle, so its buffers go with the layout.
    return names.pop("read")  # type: ignore[no-any-return]


def from_parts(spec: Any, buffers: Sequence[Any]) -> Layout:
    """Rebuild a layout from :meth:`Layout.spec` and its buffers, without copying them."""
    try:
        shape, keys, kinds, length, byteorder = spec
        keys, kinds, length = tuple(keys), tuple(kinds), int(length)
    except (TypeError, ValueError) as exc:
        raise _corrupt("its description is malformed") from exc
    if byteorder != sys.byteorder:
        raise CompactError(
            f"rebuilding a compact container: it was built on a {byteorder}-endian machine "
            f"and this one is {sys.byteorder}-endian; build it again here from its source"
        )
    if shape not in _SHAPES or (shape == ITEM and len(kinds) != 1):
        raise _corrupt(f"unknown item shape {shape!r}")
    columns, start = [], 0
    for kind, extra in kinds:
        count = _buffer_count(kind)
        if start + count > len(buffers):
            raise _corrupt(f"it has {len(buffers)} buffers, fewer than its columns need")
        columns.append(make_column(kind, extra, buffers[start : start + count], length))
        start += count
    if start != len(buffers):
        raise _corrupt(f"it has {len(buffers)} buffers where its columns need {start}")
    return Layout(shape, keys, columns, length)


def _buffer_count(kind: str) -> int:
    return 1 if kind in _FIXED else 3 if kind == "array" else 2
