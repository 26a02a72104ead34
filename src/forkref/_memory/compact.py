"""Compact lists: many small items that other processes read without copying.

Why: after ``fork()`` a worker shares the parent's pages until it writes to
them, and CPython writes to every object it reads (the reference count lives
in the object). A worker iterating an inherited list of 2M small dicts writes
to every dict, int and str, so each of their pages is copied into the worker:
hundreds of MiB of private memory per worker. ``gc.freeze()`` cannot help;
most of those objects are not even gc-tracked. Under spawn and forkserver it
is worse: the list is pickled into every worker.

How: a :class:`CompactList` keeps its items in a few flat, immutable buffers,
laid out by :mod:`forkref._memory.layout` (records by column: typed arrays
for numbers, one UTF-8 buffer plus offsets for strings, one pickle per item
for irregular data). A read builds the item as a new, private object; the
only shared objects whose reference counts change are the container, its
layout and the buffer views (a few pages). The buffers are only read, so
they stay shared however many workers iterate, and none is gc-tracked.

Between processes::

    parent: c = compact(items)           buffers in the parent's heap
      │ pickled by multiprocessing (ForkingPickler: a Process, a queue, a pool task,
      │ a DataLoader worker under spawn/forkserver) or by forkref's task pickler
      v
    forkref._memory.handover: buffers copied ONCE into an anonymous segment,
      the parent re-points c at the mapping; the pickle is a ~200-byte reference
      v
    worker: maps the segment read-only (once per process), reads from it

``pickle.dumps(c)`` (storage, or any pickler that is not a process
hand-over) carries the buffers themselves, out of band from protocol 5, so
those bytes load anywhere.

Non-goals: the containers are read-only (build a new one to change them);
they are not a database (no queries, no partial loading from disk); identity
is not preserved (``c[0] is c[0]`` is false, and a float NaN does not equal
its copy, so a container holding NaN does not compare equal to its source).
"""

from __future__ import annotations

import pickle
import reprlib
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any, TypeVar, overload

from forkref._memory import handover
from forkref._memory.columns import build_layout
from forkref._memory.layout import Layout, from_parts

__all__ = ["CompactList", "compact", "exported", "pickled_buffers"]

T = TypeVar("T")


class CompactList(Sequence[T]):
    """A read-only list whose items live in a few flat buffers that processes share.

    Build it with :func:`forkref.compact`. It supports ``len``, indexing
    (negative too), slicing (a view on the same buffers, no copy), iteration,
    ``in``, ``index``, ``count``, ``reversed`` and equality with a list or
    another compact list holding equal items in the same order.

    Each read builds the item anew: the result is a new object, private to
    the reading process. That is what keeps workers from copying the
    parent's memory. Records (dicts sharing their keys, tuples, strings,
    numbers, token lists) are stored by column and read about 3x faster than
    an unpickle of the same record (``benchmarks/bench_compact_read.py``),
    still far slower than a list read; irregular items are unpickled.

    Pickled for another process by multiprocessing or a forkref pool, it
    travels as a reference to one shared, read-only segment written once;
    ``pickle.dumps`` carries the full buffers (out of band from protocol 5).
    """

    __module__ = "forkref"
    __slots__ = ("__weakref__", "_layout", "_range")

    _layout: Layout
    _range: range

    def __init__(self, iterable: Iterable[T] = ()) -> None:
        """Store the items of ``iterable``; prefer :func:`forkref.compact`, which reads better."""
        built = _pack(iterable)
        self._layout, self._range = built._layout, built._range

    @classmethod
    def _from_layout(cls, layout: Layout, rng: range | None = None) -> CompactList[Any]:
        self: CompactList[Any] = cls.__new__(cls)
        self._layout = layout
        self._range = range(layout.length) if rng is None else rng
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers this container holds (shared with its slices)."""
        return self._layout.nbytes

    def __len__(self) -> int:
        return len(self._range)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> CompactList[T]: ...

    def __getitem__(self, index: int | slice) -> T | CompactList[T]:
        if isinstance(index, slice):
            return CompactList._from_layout(self._layout, self._range[index])
        try:
            position = self._range[index]
        except IndexError:
            raise IndexError("compact list index out of range") from None
        except TypeError:
            raise TypeError(
                f"compact list indices must be integers or slices, not {type(index).__name__}"
            ) from None
        return self._layout.read(position)  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[T]:
        # map() drives the reads from C: no generator frame per item.
        return map(self._layout.read, self._range)

    def __reversed__(self) -> Iterator[T]:
        return map(self._layout.read, reversed(self._range))

    def _is_whole(self) -> bool:
        return self._range == range(self._layout.length)

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
        # A slice of a big container ships only its own items, not the whole buffers.
        whole = self if self._is_whole() else _pack(iter(self))
        layout = whole._layout
        return (_rebuild_list, (layout.spec(), *pickled_buffers(protocol, layout.buffers())))


def pickled_buffers(protocol: Any, views: Sequence[memoryview]) -> tuple[Any, ...]:
    """Buffers as pickle should carry them: out of band from protocol 5, bytes before."""
    if isinstance(protocol, int) and protocol >= 5:
        return tuple(pickle.PickleBuffer(view) for view in views)
    return tuple(view.tobytes() for view in views)


def _pack(items: Iterable[T], what: str = "item") -> CompactList[T]:
    if isinstance(items, CompactList) and items._is_whole():
        return items
    return CompactList._from_layout(build_layout(items, what))


def _rebuild_list(spec: Any, *buffers: Any) -> CompactList[Any]:
    """Unpickling hook: wrap the received buffers without copying them."""
    return CompactList._from_layout(from_parts(spec, buffers))


def compact(iterable: Iterable[T]) -> CompactList[T]:
    """Store ``iterable``'s items in a :class:`CompactList`: a few flat buffers, shared by workers.

    Use it for a large collection of small Python objects (dicts, tuples,
    strings, token lists, small numpy arrays) that worker processes read:
    forked workers leave the buffers' pages shared where reading a plain
    list copies them, and spawn/forkserver workers (a multiprocessing
    ``Process``, a PyTorch ``DataLoader`` worker, a pool task) map one
    shared segment instead of unpickling a copy each. The input is
    streamed: a generator of N items never has N items alive at once.

    Lists of dicts with the same keys, of tuples, of strings, numbers, lists
    of numbers or numpy arrays are stored by column and read fast; anything
    else is stored one pickle per item. Items read back are equal to the
    originals and of the same types; numpy arrays come back as read-only
    views of the shared buffer.

    Raises:
        CompactError: an item cannot be pickled.
    """
    return _pack(iterable)


# -- to another process: one shared segment (forkref._memory.handover) -----------

_export_lock = threading.Lock()


def exported(layout: Layout) -> handover.Segment:
    """The segment holding ``layout``'s buffers, written (once) and mapped here."""
    with _export_lock:
        if layout.segment is None:
            segment = handover.export(layout.buffers(), "a CompactList")
            # From now on this process reads the segment too: its heap copy is freed.
            layout.rebind(segment.views)
            layout.segment = segment
            segment.built = weakref.ref(layout)
        return layout.segment  # type: ignore[no-any-return]


def _reduce_for_process(c: CompactList[Any]) -> tuple[Any, ...]:
    """multiprocessing's reducer (ForkingPickler): a reference to a shared segment."""
    if c._layout.nbytes < handover.INLINE_BELOW and c._layout.segment is None:
        return c.__reduce_ex__(pickle.DEFAULT_PROTOCOL)
    segment = exported(c._layout)
    return (_attach_list, (segment.ref, c._layout.spec(), c._range))


def _attach_list(ref: tuple[Any, ...], spec: Any, rng: range) -> CompactList[Any]:
    """Unpickling hook in the receiving process: map the segment (once), read from it."""
    segment = handover.attach(ref, "a CompactList")
    layout = segment.built() if segment.built is not None else None
    if layout is None:
        layout = from_parts(spec, segment.views)
        layout.segment = segment
        segment.built = weakref.ref(layout)
    return CompactList._from_layout(layout, rng)


# Only multiprocessing's pickler (and forkref's task pickler, which borrows this
# entry) uses it: plain pickle.dumps still carries the buffers, for storage.
ForkingPickler.register(CompactList, _reduce_for_process)
