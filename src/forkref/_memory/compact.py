"""Compact containers: many small items that forked workers read without copying.

Why: after ``fork()`` a worker shares the parent's pages until it writes to
them, and CPython writes to every object it reads (the reference count lives
in the object). A worker iterating an inherited list of 2M small dicts writes
to every dict, int and str, so each of their pages is copied into the worker:
hundreds of MiB of private memory per worker. ``gc.freeze()`` cannot help;
most of those objects are not even gc-tracked.

How: a :class:`CompactList` stores its items pickled (protocol 5) back to back
in ONE immutable buffer, plus one array of 64-bit offsets::

    data     | item 0 | item 1 | item 2 | ...           (a bytes object)
    offsets  0        o1       o2       o3  ...  len(data)  (int64, n + 1)

Reading item ``i`` unpickles ``data[offsets[i]:offsets[i + 1]]`` into a new,
private object. The only shared objects whose reference counts change are the
container and its two buffer views (a few pages); the buffer pages are only
read, so they stay shared however many workers iterate. Neither buffer is
gc-tracked, so a worker's ``gc.collect()`` never touches them either.

A :class:`CompactDict` adds an open-addressing hash table (an int64 array of
entry numbers, CPython's probing scheme) and an int64 array of key hashes to
a compact list of keys and one of values: a lookup probes the table and
unpickles only the keys whose hash matches. No Python dict of the keys exists.

The trade-off: every read is an unpickle (about 0.5 us for a three-key
dict, where a list read costs about 0.03 us; iterating 2M records while
reading a field is 2-3x slower than with a plain list in
``benchmarks/bench_cow.py``), and items come back as fresh copies, so
mutating one changes nothing in the container.

Non-goals: the containers are read-only (build a new one to change them);
they are not a database (no queries, no partial loading from disk); identity
is not preserved (``c[0] is c[0]`` is false, and a float NaN does not equal
its copy, so a container holding NaN does not compare equal to its source).
"""

from __future__ import annotations

import io
import itertools
import pickle
import reprlib
import sys
from array import array
from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
    ValuesView,
)
from typing import Any, TypeVar, overload

from forkref._errors import CompactError

__all__ = ["CompactDict", "CompactList", "compact", "compact_dict"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

_PROTOCOL = 5
_loads = pickle.loads

# Hashes of str, bytes and datetime are salted per interpreter
# (PYTHONHASHSEED). Forked children inherit the salt; spawned processes and
# other hosts do not. A CompactDict records this probe when it is built and
# rebuilds its hash index privately in a process whose probe differs.
# None is in the probe because before Python 3.12 hash(None) is its address,
# which differs between spawned processes even with a fixed PYTHONHASHSEED.
_HASH_PROBE = hash(("forkref compact_dict hash probe", None))
_UNSIGNED = (1 << 64) - 1
_PERTURB_SHIFT = 5


def _readonly_bytes(buffer: Any) -> memoryview:
    """A read-only, flat, byte-format view of any buffer (bytes, PickleBuffer, mmap...)."""
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly()


def _int64_view(buffer: Any, byteorder: str) -> memoryview:
    """Offsets or hashes as a read-only int64 view, swapped if they come from another byte order."""
    raw = _readonly_bytes(buffer)
    if len(raw) % 8:
        raise CompactError(
            f"rebuilding a compact container: an int64 table has {len(raw)} bytes, "
            "not a multiple of 8; the pickle is truncated or corrupt, pickle the container again"
        )
    if byteorder == sys.byteorder:
        return raw.cast("q")
    swapped = array("q")
    swapped.frombytes(raw)
    swapped.byteswap()
    return _frozen(swapped)


def _frozen(table: array[int]) -> memoryview:
    """An int64 array as a read-only view over a bytes copy.

    bytes, unlike array, is not gc-tracked: a collection in a forked worker
    never writes to it, and nothing can resize or write it under a view.
    """
    return memoryview(table.tobytes()).cast("q")


class _Packer:
    """Streams pickled items into one growing buffer; holds no item after it is written."""

    __slots__ = ("_offsets", "_pickler", "_sink")

    def __init__(self) -> None:
        self._sink = io.BytesIO()
        self._offsets = array("q", [0])
        # One reusable pickler with its memo cleared per item: each item is a
        # standalone pickle, without a bytes object per item in between.
        self._pickler = pickle.Pickler(self._sink, protocol=_PROTOCOL)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def add(self, item: object, what: str) -> None:
        start = self._offsets[-1]
        try:
            self._pickler.dump(item)
        except Exception as exc:
            # Drop any partial output so the buffer stays a sequence of whole pickles.
            self._sink.seek(start)
            self._sink.truncate()
            raise CompactError(
                f"building a compact container: {what} (a {type(item).__qualname__}) "
                f"cannot be pickled: {exc}. Store only picklable values, or convert this "
                "one first (e.g. to a tuple or dict of plain values)"
            ) from exc
        finally:
            self._pickler.clear_memo()
        self._offsets.append(self._sink.tell())

    def add_pickled(self, pickled: bytes | memoryview) -> None:
        self._sink.write(pickled)
        self._offsets.append(self._sink.tell())

    def item(self, index: int) -> Any:
        """Unpickle an item already written (used to compare keys while building)."""
        with self._sink.getbuffer() as buffer:
            return _loads(buffer[self._offsets[index] : self._offsets[index + 1]])

    def finish(self) -> CompactList[Any]:
        # getvalue() hands over the internal bytes object, shrunk in place
        # (realloc), rather than copying it: no second copy of the data at peak.
        data = self._sink.getvalue()
        self._sink = io.BytesIO()
        offsets = _frozen(self._offsets)
        return CompactList._from_parts(memoryview(data), offsets, range(len(offsets) - 1))


class CompactList(Sequence[T]):
    """A read-only list whose items live pickled in one shared buffer.

    Build it with :func:`forkref.compact`. It supports ``len``, indexing
    (negative too), slicing (a view on the same buffer, no copy), iteration,
    ``in``, ``index``, ``count``, ``reversed`` and equality with a list or
    another compact list holding equal items in the same order.

    Each read unpickles the item: the result is a new object, private to the
    reading process. That is what keeps forked workers from copying the
    parent's memory, and what makes a read slower than a list's.

    Pickling with protocol 5 hands the two buffers out of band
    (:class:`pickle.PickleBuffer`), so a shared-memory transport can map them
    without a copy; a slice pickles only its own items.
    """

    __module__ = "forkref"
    __slots__ = ("__weakref__", "_data", "_offsets", "_range")

    _data: memoryview
    _offsets: memoryview
    _range: range

    def __init__(self, iterable: Iterable[T] = ()) -> None:
        """Store the items of ``iterable``; prefer :func:`forkref.compact`, which reads better."""
        built = _pack(iterable)
        self._data, self._offsets, self._range = built._data, built._offsets, built._range

    @classmethod
    def _from_parts(cls, data: memoryview, offsets: memoryview, rng: range) -> CompactList[Any]:
        self: CompactList[Any] = cls.__new__(cls)
        self._data, self._offsets, self._range = data, offsets, rng
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this container holds (shared with its slices)."""
        return self._data.nbytes + self._offsets.nbytes

    def __len__(self) -> int:
        return len(self._range)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> CompactList[T]: ...

    def __getitem__(self, index: int | slice) -> T | CompactList[T]:
        if isinstance(index, slice):
            return CompactList._from_parts(self._data, self._offsets, self._range[index])
        try:
            position = self._range[index]
        except IndexError:
            raise IndexError("compact list index out of range") from None
        except TypeError:
            raise TypeError(
                f"compact list indices must be integers or slices, not {type(index).__name__}"
            ) from None
        offsets = self._offsets
        return _loads(self._data[offsets[position] : offsets[position + 1]])  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[T]:
        rng = self._range
        if rng.step == 1:
            return self._iter_contiguous(rng.start, rng.stop)
        return self._iter_positions(rng)

    def __reversed__(self) -> Iterator[T]:
        return self._iter_positions(reversed(self._range))

    def _iter_contiguous(self, start: int, stop: int) -> Iterator[T]:
        # Local names: this loop runs once per item in every worker.
        data, offsets, loads = self._data, self._offsets, _loads
        begin = offsets[start]
        for position in range(start + 1, stop + 1):
            end = offsets[position]
            yield loads(data[begin:end])
            begin = end

    def _iter_positions(self, positions: Iterable[int]) -> Iterator[T]:
        data, offsets, loads = self._data, self._offsets, _loads
        for position in positions:
            yield loads(data[offsets[position] : offsets[position + 1]])

    def _pickled(self) -> Iterator[memoryview]:
        """The items' pickles, in order, without unpickling them."""
        data, offsets = self._data, self._offsets
        for position in self._range:
            yield data[offsets[position] : offsets[position + 1]]

    def _is_whole(self) -> bool:
        return self._range == range(len(self._offsets) - 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (CompactList, list)):
            return NotImplemented
        if len(self) != len(other):
            return False
        pairs = zip(self, other, strict=True)
        return all(mine is theirs or mine == theirs for mine, theirs in pairs)

    __hash__ = None  # type: ignore[assignment]  # equal to a list, so unhashable like one

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(reprlib.repr(self[i]) for i in range(min(n, 3)))
        more = ", ..." if n > 3 else ""
        return (
            f"<forkref.CompactList of {n:,} item{'' if n == 1 else 's'} "
            f"({self.nbytes:,} bytes of buffers): [{head}{more}]>"
        )

    def __copy__(self) -> CompactList[T]:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> CompactList[T]:
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # A slice of a big container ships only its own items, not the whole buffer.
        whole = self if self._is_whole() else _repack(self)
        data, offsets = _pickled_buffers(protocol, whole._data, whole._offsets)
        return (_rebuild_list, (data, offsets, sys.byteorder))


def _repack(view: CompactList[T]) -> CompactList[T]:
    packer = _Packer()
    for pickled in view._pickled():
        packer.add_pickled(pickled)
    return packer.finish()


def _pack(items: Iterable[T]) -> CompactList[T]:
    if isinstance(items, CompactList):
        return items if items._is_whole() else _repack(items)
    packer = _Packer()
    for index, item in enumerate(items):
        packer.add(item, f"item {index}")
    return packer.finish()


def _rebuild_list(data: Any, offsets: Any, byteorder: str) -> CompactList[Any]:
    """Unpickling hook: wrap the received buffers without copying them."""
    data_view = _readonly_bytes(data)
    offsets_view = _int64_view(offsets, byteorder)
    if len(offsets_view) == 0 or offsets_view[-1] != len(data_view) or offsets_view[0] != 0:
        raise CompactError(
            "rebuilding a CompactList: its offsets do not match its data buffer "
            f"({len(data_view)} bytes); the pickle is truncated or corrupt, pickle the list again"
        )
    return CompactList._from_parts(data_view, offsets_view, range(len(offsets_view) - 1))


def compact(iterable: Iterable[T]) -> CompactList[T]:
    """Store ``iterable``'s items in a :class:`CompactList`: one buffer, shared across forks.

    Use it for a large collection of small Python objects (dicts, tuples,
    strings) that forked workers read: each worker's reads leave the
    buffer's pages shared, where reading a plain list copies them. The input
    is streamed: a generator of N items never has N items alive at once.

    The cost: each read unpickles the item into a new object, about 0.5 us
    for a small dict; iterating is 2-3x slower than over a plain list.

    Raises:
        CompactError: an item cannot be pickled.
    """
    return _pack(iterable)


class _CompactItemsView(ItemsView[K, V]):
    _mapping: CompactDict[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        # Pairs come from the two lists in step, not from one lookup per key.
        return zip(self._mapping._keys, self._mapping._values, strict=True)


class _CompactValuesView(ValuesView[V]):
    _mapping: CompactDict[Any, V]

    def __iter__(self) -> Iterator[V]:
        return iter(self._mapping._values)


_MISSING: Any = object()


class CompactDict(Mapping[K, V]):
    """A read-only dict whose keys and values live pickled in shared buffers.

    Build it with :func:`forkref.compact_dict`. Lookups hash the key, probe an
    int64 table and unpickle only the stored keys with the same hash, so no
    Python object per key exists in shared memory. Iteration follows
    insertion order, like a dict; a key given twice keeps its first position
    and its last value, like a dict. Equality holds with any mapping that has
    equal keys and values.

    Keys must have value-based equality and hashing (str, bytes, numbers,
    tuples of those, ...): a stored key is a copy, so a key hashed by
    identity can never be found.
    """

    __module__ = "forkref"
    __slots__ = (
        "__weakref__",
        "_hash_probe",
        "_hashes",
        "_keys",
        "_local_index",
        "_table",
        "_values",
    )

    _keys: CompactList[K]
    _values: CompactList[V]
    _hashes: memoryview
    _table: memoryview
    _hash_probe: int
    _local_index: tuple[memoryview, memoryview] | None

    def __init__(self, mapping_or_items: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        """Store the pairs; prefer :func:`forkref.compact_dict`, which reads better."""
        built = _pack_dict(mapping_or_items)
        self._keys, self._values = built._keys, built._values
        self._hashes, self._table = built._hashes, built._table
        self._hash_probe, self._local_index = built._hash_probe, None

    @classmethod
    def _from_parts(
        cls,
        keys: CompactList[Any],
        values: CompactList[Any],
        hashes: memoryview,
        table: memoryview,
        hash_probe: int,
    ) -> CompactDict[Any, Any]:
        self: CompactDict[Any, Any] = cls.__new__(cls)
        self._keys, self._values, self._hashes, self._table = keys, values, hashes, table
        self._hash_probe, self._local_index = hash_probe, None
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this mapping holds (keys, values, hashes and table)."""
        return self._keys.nbytes + self._values.nbytes + self._hashes.nbytes + self._table.nbytes

    def _index(self) -> tuple[memoryview, memoryview]:
        if self._hash_probe == _HASH_PROBE:
            return self._hashes, self._table
        if self._local_index is None:
            # Another hash salt (spawned process): hash the keys again, privately.
            hashes, table = _build_index(map(hash, self._keys), len(self._keys))
            self._local_index = (hashes, table)
        return self._local_index

    def _entry(self, key: object) -> int:
        """The entry number of ``key``, or -1."""
        key_hash = hash(key)
        hashes, table = self._index()
        keys = self._keys
        mask = len(table) - 1
        perturb = key_hash & _UNSIGNED
        slot = perturb & mask
        while True:
            entry = table[slot] - 1
            if entry < 0:
                return -1
            if hashes[entry] == key_hash:
                stored = keys[entry]
                if stored is key or stored == key:
                    return int(entry)
            perturb >>= _PERTURB_SHIFT
            slot = (slot * 5 + perturb + 1) & mask

    def __getitem__(self, key: K) -> V:
        entry = self._entry(key)
        if entry < 0:
            raise KeyError(key)
        return self._values[entry]

    def __contains__(self, key: object) -> bool:
        return self._entry(key) >= 0  # an unhashable key raises TypeError, as with a dict

    def __iter__(self) -> Iterator[K]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> ItemsView[K, V]:
        """A view of the (key, value) pairs, read in step without lookups."""
        return _CompactItemsView(self)

    def values(self) -> ValuesView[V]:
        """A view of the values, in insertion order."""
        return _CompactValuesView(self)

    def __eq__(self, other: object) -> bool:
        # Mapping's default builds a dict of both sides; compare pair by pair instead.
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        for key, value in self.items():
            theirs = other.get(key, _MISSING)
            if theirs is _MISSING or not (theirs is value or theirs == value):
                return False
        return True

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = len(self)
        first = itertools.islice(self.items(), 3)
        pairs = [f"{reprlib.repr(k)}: {reprlib.repr(v)}" for k, v in first]
        more = ", ..." if n > 3 else ""
        return (
            f"<forkref.CompactDict of {n:,} item{'' if n == 1 else 's'} "
            f"({self.nbytes:,} bytes of buffers): {{{', '.join(pairs)}{more}}}>"
        )

    def __copy__(self) -> CompactDict[K, V]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> CompactDict[K, V]:
        return self

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        hashes, table = _pickled_buffers(protocol, self._hashes, self._table)
        args = (self._keys, self._values, (hashes, table), self._hash_probe, sys.byteorder)
        return (_rebuild_dict, args)


def _rebuild_dict(
    keys: CompactList[Any],
    values: CompactList[Any],
    index: tuple[Any, Any],
    hash_probe: int,
    byteorder: str,
) -> CompactDict[Any, Any]:
    """Unpickling hook: wrap the received buffers without copying them."""
    hashes, table = index
    hashes_view = _int64_view(hashes, byteorder)
    table_view = _int64_view(table, byteorder)
    size = len(table_view)
    if len(hashes_view) != len(keys) or len(values) != len(keys) or size & (size - 1) or not size:
        raise CompactError(
            f"rebuilding a CompactDict: its tables do not match its {len(keys)} keys; "
            "the pickle is truncated or corrupt, pickle the mapping again"
        )
    return CompactDict._from_parts(keys, values, hashes_view, table_view, hash_probe)


def _table_size(count: int) -> int:
    """A power of two with at least twice ``count`` slots: short probe chains."""
    size = 8
    while size < 2 * count:
        size *= 2
    return size


def _insert(table: array[int], key_hash: int, entry: int) -> None:
    mask = len(table) - 1
    perturb = key_hash & _UNSIGNED
    slot = perturb & mask
    while table[slot]:
        perturb >>= _PERTURB_SHIFT
        slot = (slot * 5 + perturb + 1) & mask
    table[slot] = entry + 1


def _build_index(key_hashes: Iterable[int], count: int) -> tuple[memoryview, memoryview]:
    hashes = array("q", key_hashes)
    table = array("q", bytes(8 * _table_size(count)))
    for entry, key_hash in enumerate(hashes):
        _insert(table, key_hash, entry)
    return _frozen(hashes), _frozen(table)


class _DictBuilder:
    """Streams pairs into key and value packers, indexing keys as they come."""

    def __init__(self) -> None:
        self.keys = _Packer()
        self.values = _Packer()
        self.hashes = array("q")
        self.table = array("q", bytes(8 * 8))
        # Values of keys seen again, by entry: rare, applied once at the end.
        self.overrides: dict[int, bytes] = {}

    def add(self, key: object, value: object, position: int) -> None:
        try:
            key_hash = hash(key)
        except TypeError as exc:
            raise CompactError(
                f"building a CompactDict: key {position} (a {type(key).__qualname__}) is "
                "unhashable; use hashable keys such as str, int or tuples of them"
            ) from exc
        entry = self._find(key, key_hash)
        if entry >= 0:
            self.overrides[entry] = _pickled_value(value, position)
            return
        self.keys.add(key, f"key {position}")
        self.values.add(value, f"value {position}")
        self.hashes.append(key_hash)
        if 2 * len(self.hashes) > len(self.table):
            self.table = array("q", bytes(8 * _table_size(len(self.hashes))))
            for number, stored_hash in enumerate(self.hashes):
                _insert(self.table, stored_hash, number)
        else:
            _insert(self.table, key_hash, len(self.hashes) - 1)

    def _find(self, key: object, key_hash: int) -> int:
        table, mask = self.table, len(self.table) - 1
        perturb = key_hash & _UNSIGNED
        slot = perturb & mask
        while (entry := table[slot] - 1) >= 0:
            if self.hashes[entry] == key_hash:
                stored = self.keys.item(entry)
                if stored is key or stored == key:
                    return entry
            perturb >>= _PERTURB_SHIFT
            slot = (slot * 5 + perturb + 1) & mask
        return -1

    def finish(self) -> CompactDict[Any, Any]:
        values = self.values.finish()
        if self.overrides:
            values = _with_overrides(values, self.overrides)
        hashes, table = _frozen(self.hashes), _frozen(self.table)
        return CompactDict._from_parts(self.keys.finish(), values, hashes, table, _HASH_PROBE)


def _pickled_buffers(protocol: Any, *views: memoryview) -> tuple[Any, ...]:
    """Buffers as pickle should carry them: out of band from protocol 5, bytes before."""
    if isinstance(protocol, int) and protocol >= 5:
        return tuple(pickle.PickleBuffer(view) for view in views)
    return tuple(view.tobytes() for view in views)


def _pickled_value(value: object, position: int) -> bytes:
    try:
        return pickle.dumps(value, protocol=_PROTOCOL)
    except Exception as exc:
        raise CompactError(
            f"building a CompactDict: value {position} (a {type(value).__qualname__}) cannot "
            f"be pickled: {exc}. Store only picklable values"
        ) from exc


def _with_overrides(values: CompactList[Any], overrides: dict[int, bytes]) -> CompactList[Any]:
    packer = _Packer()
    for entry, pickled in enumerate(values._pickled()):
        packer.add_pickled(overrides.get(entry, pickled))
    return packer.finish()


def _pairs(mapping_or_items: Mapping[K, V] | Iterable[tuple[K, V]]) -> Iterator[tuple[K, V]]:
    if isinstance(mapping_or_items, Mapping):
        yield from mapping_or_items.items()
        return
    for position, pair in enumerate(mapping_or_items):
        try:
            key, value = pair
        except (TypeError, ValueError) as exc:
            raise CompactError(
                f"building a CompactDict: item {position} ({type(pair).__qualname__}) is not a "
                "(key, value) pair; pass a mapping or an iterable of 2-tuples"
            ) from exc
        yield key, value


def _pack_dict(mapping_or_items: Mapping[K, V] | Iterable[tuple[K, V]]) -> CompactDict[K, V]:
    if isinstance(mapping_or_items, CompactDict):
        return mapping_or_items
    builder = _DictBuilder()
    for position, (key, value) in enumerate(_pairs(mapping_or_items)):
        builder.add(key, value, position)
    return builder.finish()


def compact_dict(mapping_or_items: Mapping[K, V] | Iterable[tuple[K, V]]) -> CompactDict[K, V]:
    """Store a mapping (or ``(key, value)`` pairs) in a :class:`CompactDict`.

    The read-only lookup-table form of :func:`compact`: forked workers look
    keys up without copying the parent's memory, because neither the keys
    nor the values exist as Python objects in the shared pages. Pairs are
    streamed; a key given twice keeps its last value, as in ``dict(pairs)``.

    The cost: a lookup hashes the key, probes an int64 table and unpickles
    the matching stored key and the value. In a process with another hash
    salt (a spawn worker receiving the mapping through shared memory), the
    first lookup rebuilds the hash index privately: 24 bytes per key.

    Raises:
        CompactError: a key is unhashable, or a key or value cannot be pickled,
            or an item is not a pair.
    """
    return _pack_dict(mapping_or_items)
