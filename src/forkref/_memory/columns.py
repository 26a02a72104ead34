"""Building a :class:`~forkref._memory.layout.Layout` from a stream of items.

The first item proposes the layout (a dict record, a tuple record, or a
single value) and the kind of each column; later items either fit or demote:

    add(item) ──> same shape? ──no──> every item so far becomes one pickle
                     │ yes            (re-read from the columns built so far)
                     v
                  each value fits its column's kind? ──no──> that column
                                                            becomes a pickle column

So the input is streamed (no item is kept once written) and any input is
accepted; typed columns are what regular data earns. At the end, a record
layout with mostly pickle columns becomes whole-item pickles (one unpickle
per read beats one per field).
"""

from __future__ import annotations

import io
import pickle
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from forkref._errors import CompactError
from forkref._memory.layout import DICT, ITEM, TUPLE, Column, Layout, make_column

__all__ = ["LayoutBuilder", "build_layout", "pickle_column"]

_PROTOCOL = 5
_MAX_FIELDS = 256  # wider records are irregular enough: whole-item pickles
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _fits_int64(value: Any) -> bool:
    return _INT64[0] <= value <= _INT64[1]  # type: ignore[no-any-return]


class _Builder:
    """Collects one column's cells; ``add`` returns False when a value does not fit."""

    kind = ""
    extra: Any = None

    def __init__(self) -> None:
        self.count = 0

    def add(self, value: Any, what: str) -> bool:
        raise NotImplementedError

    def parts(self) -> list[bytes]:
        raise NotImplementedError

    def finish(self) -> Column:
        return make_column(self.kind, self.extra, self.parts(), self.count)


class _Fixed(_Builder):
    def __init__(self, kind: str, cls: type) -> None:
        super().__init__()
        self.kind, self.cls = kind, cls
        self.values: Any = array("q" if kind == "int" else "d") if kind != "bool" else bytearray()

    def add(self, value: Any, what: str) -> bool:
        if type(value) is not self.cls:
            return False
        if self.kind == "int" and not _fits_int64(value):
            return False
        self.values.append(value)
        self.count += 1
        return True

    def parts(self) -> list[bytes]:
        return [bytes(self.values)]


class _Variable(_Builder):
    """Cells of variable size back to back (str, bytes, pickles), with int64 offsets."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.sink = io.BytesIO()
        self.offsets = array("q", [0])
        # One reusable pickler with its memo cleared per cell: standalone pickles.
        self.pickler = pickle.Pickler(self.sink, protocol=_PROTOCOL) if kind == "pickle" else None

    def add(self, value: Any, what: str) -> bool:
        if self.pickler is not None:
            self._dump(value, what)
        elif self.kind == "str" and type(value) is str:
            self.sink.write(value.encode("utf-8", "surrogatepass"))
        elif self.kind == "bytes" and type(value) is bytes:
            self.sink.write(value)
        else:
            return False
        self.offsets.append(self.sink.tell())
        self.count += 1
        return True

    def _dump(self, value: Any, what: str) -> None:
        assert self.pickler is not None
        start = self.offsets[-1]
        try:
            self.pickler.dump(value)
        except Exception as exc:
            # Drop any partial output so the buffer stays a sequence of whole pickles.
            self.sink.seek(start)
            self.sink.truncate()
            raise CompactError(
                f"building a compact container: {what} (a {type(value).__qualname__}) "
                f"cannot be pickled: {exc}. Store only picklable values, or convert this "
                "one first (e.g. to a tuple or dict of plain values)"
            ) from exc
        finally:
            self.pickler.clear_memo()

    def read(self, index: int) -> Any:
        """Unpickle a cell already written (a pickle column only)."""
        with self.sink.getbuffer() as buffer:
            return pickle.loads(buffer[self.offsets[index] : self.offsets[index + 1]])

    def cells(self) -> Iterator[Any]:
        """Every cell written so far, unpickled in order (a pickle column only)."""
        return map(self.read, range(self.count))

    def parts(self) -> list[bytes]:
        # getvalue() hands over the internal bytes object (shrunk in place),
        # not a second copy of the data.
        data = self.sink.getvalue()
        self.sink = io.BytesIO()
        return [data, self.offsets.tobytes()]


class _Ragged(_Builder):
    """Lists (or tuples) of ints, or of floats: one flat typed buffer plus offsets."""

    def __init__(self, kind: str, container: type) -> None:
        super().__init__()
        self.kind, self.container = kind, container
        self.extra = container.__name__
        self.element = int if kind == "ints" else float
        self.values: Any = array("q" if kind == "ints" else "d")
        self.offsets = array("q", [0])

    def add(self, value: Any, what: str) -> bool:
        if type(value) is not self.container or not _all_of(value, self.element):
            return False
        size = len(self.values)
        try:
            self.values.extend(value)
        except OverflowError:  # an int beyond int64, after the ones before it went in
            del self.values[size:]
            return False
        self.offsets.append(len(self.values))
        self.count += 1
        return True

    def parts(self) -> list[bytes]:
        return [self.values.tobytes(), self.offsets.tobytes()]


def _all_of(values: Any, cls: type) -> bool:
    return all(type(v) is cls for v in values)


class _Arrays(_Builder):
    """numpy arrays of one dtype and number of dimensions, each read back as a view."""

    kind = "array"

    def __init__(self, first: Any) -> None:
        super().__init__()
        self.dtype, self.ndim = first.dtype, first.ndim
        self.extra = (first.dtype.str, first.ndim)
        self.sink = io.BytesIO()
        self.offsets = array("q", [0])
        self.shapes = array("q")

    @staticmethod
    def accepts(value: Any) -> bool:
        dtype = getattr(value, "dtype", None)
        return (
            type(value).__name__ == "ndarray"
            and type(value).__module__ == "numpy"
            and dtype is not None
            and dtype.kind in "biufcmM"
            and dtype.fields is None
        )

    def add(self, value: Any, what: str) -> bool:
        if not self.accepts(value) or value.dtype != self.dtype or value.ndim != self.ndim:
            return False
        self.sink.write(value.tobytes(order="C"))
        self.offsets.append(self.sink.tell())
        self.shapes.extend(value.shape)
        self.count += 1
        return True

    def parts(self) -> list[bytes]:
        return [self.sink.getvalue(), self.offsets.tobytes(), self.shapes.tobytes()]


def _builder_for(value: Any) -> _Builder:
    cls = type(value)
    if cls is int and _fits_int64(value):
        return _Fixed("int", int)
    if cls is float:
        return _Fixed("float", float)
    if cls is bool:
        return _Fixed("bool", bool)
    if cls is str or cls is bytes:
        return _Variable(cls.__name__)
    if cls is list or cls is tuple:
        for kind, element in (("ints", int), ("floats", float)):
            if value and _all_of(value, element):
                return _Ragged(kind, cls)
    if _Arrays.accepts(value):
        return _Arrays(value)
    return _Variable("pickle")


def pickle_column() -> _Variable:
    """A pickle column's builder that can read back its cells (CompactDict's keys, values)."""
    return _Variable("pickle")


def _pickled(cells: Iterable[Any], what: str) -> _Variable:
    column = _Variable("pickle")
    for index, cell in enumerate(cells):
        column.add(cell, f"{what} {index}")
    return column


class LayoutBuilder:
    """Streams items into columns, demoting what does not fit (see the module docstring)."""

    def __init__(self, what: str = "item") -> None:
        self.what = what  # how messages name an item: "item", "key", "value"
        self.shape = ""
        self.keys: tuple[Any, ...] = ()
        self.columns: list[_Builder] = []
        self.count = 0

    def add(self, item: Any) -> None:
        if not self.count:
            self._start(item)
        if self.shape == DICT:
            fits = type(item) is dict and len(item) == len(self.keys) and tuple(item) == self.keys
            cells: Any = item.values() if fits else None
        elif self.shape == TUPLE:
            fits = type(item) is tuple and len(item) == len(self.keys)
            cells = item
        else:
            fits, cells = True, (item,)
        if not fits:
            self._to_items()
            cells = (item,)
        for number, (column, cell) in enumerate(zip(self.columns, cells, strict=True)):
            if not column.add(cell, self._where(number)):
                self._to_pickles(number).add(cell, self._where(number))
        self.count += 1

    def _start(self, item: Any) -> None:
        cls = type(item)
        if cls is dict and 0 < len(item) <= _MAX_FIELDS and _all_of(item, str):
            self.shape, self.keys, cells = DICT, tuple(item), list(item.values())
        elif cls is tuple and 0 < len(item) <= _MAX_FIELDS:
            self.shape, self.keys, cells = TUPLE, tuple(range(len(item))), list(item)
        else:
            self.shape, cells = ITEM, [item]
        self.columns = [_builder_for(cell) for cell in cells]

    def _where(self, number: int) -> str:
        if self.shape == ITEM:
            return f"{self.what} {self.count}"
        return f"{self.what} {self.count}[{self.keys[number]!r}]"

    def _to_pickles(self, number: int) -> _Variable:
        """Column ``number`` becomes a pickle column holding the same cells."""
        old = self.columns[number].finish()
        column = _pickled(map(old.get, range(self.count)), self.what)
        self.columns[number] = column
        return column

    def _to_items(self) -> None:
        """Every item so far becomes one pickle: the items are not regular records."""
        so_far = self._layout()
        self.shape, self.keys = ITEM, ()
        self.columns = [_pickled(map(so_far.read, range(self.count)), self.what)]

    def _layout(self) -> Layout:
        columns = [column.finish() for column in self.columns]
        return Layout(self.shape or ITEM, self.keys, columns, self.count)

    def finish(self) -> Layout:
        if not self.count:
            return Layout(ITEM, (), [_Variable("pickle").finish()], 0)
        pickles = sum(isinstance(c, _Variable) and c.kind == "pickle" for c in self.columns)
        if self.shape != ITEM and 2 * pickles > len(self.columns):
            self._to_items()
        return self._layout()


def build_layout(items: Iterable[Any], what: str = "item") -> Layout:
    """Lay ``items`` out in columns (streamed: no item is kept once written)."""
    builder = LayoutBuilder(what)
    for item in items:
        builder.add(item)
    return builder.finish()
