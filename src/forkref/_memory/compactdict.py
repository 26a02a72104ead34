"""Compact dicts: a read-only mapping whose keys and values live in shared buffers.

A :class:`CompactDict` is two compact lists (keys, values; each laid out by
column like any :class:`~forkref.CompactList`), an int64 array of key
hashes and an open-addressing hash table of entry numbers (CPython's probing
scheme)::

    lookup(key) ── hash ──> table slot ──> entry e ──> hashes[e] == hash?
                                                  └─> keys[e] == key? ──> values[e]

No Python dict of the keys exists, so forked workers looking keys up leave
every page shared; under spawn/forkserver the whole mapping travels as one
shared segment (:mod:`forkref._memory.handover`).

Non-goals: read-only; keys must have value-based equality and hashing.
"""

from __future__ import annotations

import itertools
import pickle
import reprlib
import sys
import threading
from array import array
from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from multiprocessing.reduction import ForkingPickler
from typing import Any, TypeVar

from forkref._errors import CompactError
from forkref._memory import handover
from forkref._memory.columns import build_layout, pickle_column
from forkref._memory.compact import CompactList, pickled_buffers

__all__ = ["CompactDict", "compact_dict"]

K = TypeVar("K")
V = TypeVar("V")

_PROTOCOL = 5
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
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view.toreadonly()


def _int64_view(buffer: Any) -> memoryview:
    raw = _readonly_bytes(buffer)
    if len(raw) % 8:
        raise CompactError(
            f"rebuilding a CompactDict: an int64 table has {len(raw)} bytes, not a multiple "
            "of 8; the pickle is truncated or corrupt, pickle the mapping again"
        )
    return raw.cast("q")


def _frozen(table: array[int]) -> memoryview:
    """An int64 array as a read-only view over a bytes copy (bytes is not gc-tracked)."""
    return memoryview(table.tobytes()).cast("q")


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
    """A read-only dict whose keys and values live in shared buffers.

    Build it with :func:`forkref.compact_dict`. Keys and values are compact
    lists (by column where they are regular). Lookups hash the key, probe an
    int64 table and read only the stored keys with the same hash, so no
    Python object per key exists in shared memory. Iteration follows
    insertion order, like a dict; a key given twice keeps its first position
    and its last value, like a dict. Equality holds with any mapping that has
    equal keys and values.

    Keys must have value-based equality and hashing (str, bytes, numbers,
    tuples of those, ...): a stored key is a copy, so a key hashed by
    identity can never be found.

    Pickled for another process by multiprocessing or a forkref pool, it
    travels as references to shared segments; ``pickle.dumps`` carries the
    bytes.
    """

    __module__ = "forkref"
    __slots__ = (
        "__weakref__",
        "_hash_probe",
        "_hashes",
        "_keys",
        "_local_index",
        "_segment",
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
        self._segment: handover.Segment | None = None

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
        self._segment = None
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
        hashes, table = pickled_buffers(protocol, (self._hashes, self._table))
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
    if byteorder != sys.byteorder:
        raise CompactError(
            f"rebuilding a CompactDict: it was built on a {byteorder}-endian machine and this "
            f"one is {sys.byteorder}-endian; build it again here from its source"
        )
    hashes_view, table_view = _int64_view(hashes), _int64_view(table)
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
        # Pickles while building (a key must be read back to spot a repeat);
        # laid out by column at the end.
        self.keys = pickle_column()
        self.values = pickle_column()
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
                stored = self.keys.read(entry)
                if stored is key or stored == key:
                    return entry
            perturb >>= _PERTURB_SHIFT
            slot = (slot * 5 + perturb + 1) & mask
        return -1

    def finish(self) -> CompactDict[Any, Any]:
        overrides, loads = self.overrides, pickle.loads
        values = (
            loads(overrides[entry]) if entry in overrides else self.values.read(entry)
            for entry in range(self.values.count)
        )
        keys = CompactList._from_layout(build_layout(self.keys.cells(), "key"))
        values_list = CompactList._from_layout(build_layout(values, "value"))
        hashes, table = _frozen(self.hashes), _frozen(self.table)
        return CompactDict._from_parts(keys, values_list, hashes, table, _HASH_PROBE)


def _pickled_value(value: object, position: int) -> bytes:
    try:
        return pickle.dumps(value, protocol=_PROTOCOL)
    except Exception as exc:
        raise CompactError(
            f"building a CompactDict: value {position} (a {type(value).__qualname__}) cannot "
            f"be pickled: {exc}. Store only picklable values"
        ) from exc


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


# -- to another process: keys and values as compact lists, the index in a segment --

_export_lock = threading.Lock()


def _reduce_for_process(d: CompactDict[Any, Any]) -> tuple[Any, ...]:
    """multiprocessing's reducer: the keys and values lists travel by their own
    reducer (the same pickler), the hash index as a reference to a segment."""
    if d._hashes.nbytes + d._table.nbytes < handover.INLINE_BELOW and d._segment is None:
        return d.__reduce_ex__(pickle.DEFAULT_PROTOCOL)
    with _export_lock:
        if d._segment is None:
            segment = handover.export([_raw(d._hashes), _raw(d._table)], "a CompactDict's index")
            d._hashes, d._table = (view.cast("q") for view in segment.views)
            d._segment = segment
    args = (d._keys, d._values, d._segment.ref, d._hash_probe)
    return (_attach_dict, args)


def _raw(view: memoryview) -> memoryview:
    return view.cast("B")


def _attach_dict(
    keys: CompactList[Any], values: CompactList[Any], ref: tuple[Any, ...], hash_probe: int
) -> CompactDict[Any, Any]:
    """Unpickling hook in the receiving process: the index is read from the segment."""
    segment = handover.attach(ref, "a CompactDict's index")
    hashes, table = (view.cast("q") for view in segment.views)
    d = CompactDict._from_parts(keys, values, hashes, table, hash_probe)
    d._segment = segment
    return d


ForkingPickler.register(CompactDict, _reduce_for_process)
