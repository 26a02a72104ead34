"""Automatic by-reference: which task arguments are big, which are safe to share.

A pool pickles each task with :mod:`forkref._share.taskpickle`; every argument on
the way passes through :meth:`AutoSharer.consider`, which decides:

* small (estimated under ``share_threshold``): pickled as the stdlib would;
* big and immutable (``bytes``, ``str``, pyarrow arrays/tables, tuples and
  frozensets of immutable things): registered once and sent as a reference;
* big and mutable (numpy arrays, DataFrames, lists, dicts, sets,
  ``bytearray``): by reference only with ``auto_share=True`` (the worker sees
  the object as it was when the worker forked: snapshot semantics); otherwise
  pickled, with one :class:`~forkref.PerformanceWarning` per call site.

Sizes are *estimated*, never measured by pickling: ``nbytes`` (numpy,
pyarrow, and any object with the buffer protocol, like ``array.array``),
``memory_usage(deep=False)``, ``len`` and ``sys.getsizeof`` over a bounded
sample of items (builtin containers, their subclasses,
``collections.deque``). Other containers are of unknown size and pickled
without a warning. An estimate can be off for ragged containers; it only
decides between two correct ways of sending the object.

Non-goals: no detection of mutation. An object shared automatically is
treated as frozen from its first use by the pool.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from forkref._errors import NotInheritedError, PerformanceWarning
from forkref._refs.registry import Reference, note_reference, registry

__all__ = ["AutoSharer", "ByReference", "estimate_size", "is_immutable"]

_SAMPLE = 16
_ATOMS: frozenset[type] = frozenset({int, float, bool, complex, type(None), str, bytes})
_IMMUTABLE_ARROW = ("Array", "ChunkedArray", "Table", "RecordBatch", "Scalar")
_BUILTIN_CONTAINERS = (list, tuple, dict, set, frozenset)
_LIBRARIES = ("numpy", "pandas", "pyarrow")


def estimate_size(obj: object) -> int | None:
    """Estimated in-memory size of ``obj`` in bytes, or ``None`` if unknown.

    Cost is bounded: at most a few dozen items of a container, or attributes
    of a plain object (one level deep), are looked at.
    """
    size = _flat_size(obj)
    if size is None and _plain_object(obj):
        size = _object_size(obj)
    return size


def _plain_object(obj: object) -> bool:
    return hasattr(obj, "__dict__") and not isinstance(
        obj, (type, types.ModuleType, types.FunctionType, types.MethodType)
    )


def _object_size(obj: object) -> int | None:
    """What a plain object holds: the sum of its known-size attributes."""
    try:
        values = list(vars(obj).values())[:64]
    except TypeError:
        return None
    sizes = [s for s in map(_flat_size, values) if s is not None]
    return sum(sizes) if sizes else None


def _flat_size(obj: object) -> int | None:
    cls = type(obj)
    if cls is bytes or cls is bytearray:
        return len(obj)  # type: ignore[arg-type]
    if cls is str:
        return sys.getsizeof(obj)
    if cls is memoryview:
        return obj.nbytes  # type: ignore[attr-defined, no-any-return]
    if cls in _BUILTIN_CONTAINERS:
        return _container_size(obj)
    size = _library_size(obj, cls)
    if size is None:
        size = _other_size(obj)
    return size


def _other_size(obj: object) -> int | None:
    """Buffers (``array.array``, ``mmap``) and other concrete containers (deque, subclasses)."""
    if isinstance(obj, (*_BUILTIN_CONTAINERS, collections.deque)):
        return _container_size(obj)
    if isinstance(obj, (str, bytes, bytearray, range)):
        return None  # exact types are sized above; ranges pickle as three ints
    try:
        with memoryview(obj) as view:  # type: ignore[arg-type]
            return view.nbytes
    except (TypeError, ValueError, BufferError):
        return None


def _container_size(obj: Any) -> int:
    n = len(obj)
    if n == 0:
        return sys.getsizeof(obj)
    if isinstance(obj, dict):
        sample = [_shallow(k) + _shallow(obj[k]) for k in _sample_keys(obj)]
    elif isinstance(obj, (list, tuple)):
        step = max(1, n // _SAMPLE)
        sample = [_shallow(obj[i]) for i in range(0, n, step)[:_SAMPLE]]
    else:
        sample = [_shallow(x) for x in itertools.islice(obj, _SAMPLE)]
    return sys.getsizeof(obj) + n * sum(sample) // len(sample)


def _sample_keys(obj: dict[Any, Any]) -> list[Any]:
    return list(itertools.islice(obj, _SAMPLE))


def _shallow(item: object) -> int:
    """Size of an item of a container, one level into small containers."""
    cls = type(item)
    if cls.__module__.partition(".")[0] in _LIBRARIES:  # their __sizeof__ may be deep and slow
        return _library_size(item, cls) or 0
    size = sys.getsizeof(item)
    if cls in _BUILTIN_CONTAINERS:
        sub: Any = item
        values = sub.values() if isinstance(sub, dict) else sub
        for x in itertools.islice(values, 32):
            size += sys.getsizeof(x)
    return size


def _library_size(obj: object, cls: type) -> int | None:
    root = cls.__module__.partition(".")[0]
    try:
        if root == "numpy" and hasattr(obj, "nbytes"):
            return int(obj.nbytes)
        if root == "pandas" and hasattr(obj, "memory_usage"):
            usage = obj.memory_usage(deep=False)
            return int(usage.sum()) if hasattr(usage, "sum") else int(usage)
        if root == "pyarrow" and hasattr(obj, "nbytes"):
            return int(obj.nbytes)
    except Exception:  # an odd subclass: unknown size, pickle as usual
        return None
    return None


def is_immutable(obj: object, depth: int = 0) -> bool:
    """Whether ``obj`` can never change after it is shared (so sharing it is always safe)."""
    cls = type(obj)
    if cls in _ATOMS:
        return True
    if cls is tuple or cls is frozenset:
        if depth > 8:
            return False
        items: Any = obj
        kinds = set(map(type, items))
        if kinds <= _ATOMS:
            return True
        return all(is_immutable(x, depth + 1) for x in items)
    return cls.__module__.partition(".")[0] == "pyarrow" and cls.__name__ in _IMMUTABLE_ARROW


class ByReference:
    """Stands for a registered object inside a pickled task: pickles as its reference."""

    __slots__ = ("ref",)

    def __init__(self, ref: Reference) -> None:
        self.ref = ref

    def __reduce__(self) -> tuple[Any, ...]:
        from forkref._share.handle import _resolve

        note_reference(self.ref)  # the pool learns which objects the task refers to
        return (_resolve, (self.ref,))


class _Entry:
    __slots__ = ("obj", "own_refs", "ref", "uses")

    def __init__(self, obj: object, ref: Reference, own_refs: int) -> None:
        self.obj = obj
        self.ref = ref
        self.uses = 0
        #: References to ``obj`` that forkref holds for this entry (registry + entry).
        self.own_refs = own_refs

    def held_elsewhere(self) -> bool:
        """Whether anything but forkref holds the object (the caller keeps it for more tasks)."""
        # getrefcount's own argument counts one; _REFCOUNT_ARG says how many.
        return sys.getrefcount(self.obj) - _REFCOUNT_ARG > self.own_refs


def _refcount_arg() -> int:
    probe = object()
    return sys.getrefcount(probe) - 1  # minus the ``probe`` variable


_REFCOUNT_ARG = _refcount_arg()


class AutoSharer:
    """A pool's automatic registrations: each object registered once, released at close.

    ``acquire``/``done`` count the queued and running tasks that use each
    registration, so that :meth:`release_idle` (called when the pool forks a
    fresh generation of workers) drops the ones no task needs any more.
    """

    def __init__(self, threshold: int | None, auto_share: bool, by_reference: bool) -> None:
        self.threshold = threshold
        self.auto_share = auto_share
        #: Whether workers inherit the parent (fork): only then can references resolve.
        self.by_reference = by_reference
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # by id(obj); the entry holds obj alive
        self._by_key: dict[bytes, _Entry] = {}  # the same entries by reference key
        # Explicit handles' objects held for queued tasks: key -> (reference, count).
        self._pins: dict[bytes, tuple[Reference, int]] = {}
        self._holding = threading.local()  # see holding()

    # -- deciding -----------------------------------------------------------

    def consider(self, obj: object, where: Callable[[], str]) -> object:
        """Return ``obj`` itself (pickle it) or a :class:`ByReference` standing for it."""
        if self.threshold is None or not self.by_reference:
            return obj
        entry = self._entries.get(id(obj))
        if entry is not None and entry.obj is obj:  # already ours: skip the sizing
            return ByReference(self.register(obj))
        size = estimate_size(obj)
        if size is None or size <= self.threshold:
            return obj
        if is_immutable(obj) or self.auto_share:
            return ByReference(self.register(obj))
        if not getattr(self._holding, "quiet", False):
            _warn_pickled(obj, size, where())
        return obj

    def consider_captured(self, obj: object, where: Callable[[], str]) -> object:
        """Like :meth:`consider` for a value captured by a closure sent by value.

        A big captured value goes by reference even if mutable (snapshot, as
        the closure itself would be if it went by reference): a closure over
        a big local object is the plain-``fork()`` pattern forkref keeps cheap.
        """
        if self.threshold is None or not self.by_reference:
            return obj
        size = estimate_size(obj)
        if size is None or size <= self.threshold:
            return obj
        return ByReference(self.register(obj))

    def register(self, obj: object) -> Reference:
        """Register ``obj`` for this pool (once, whatever the number of tasks).

        Inside :meth:`holding`, the registration is held (one use) until the
        block ends: the task is not queued yet, and another thread forking a
        generation meanwhile must not release what it is about to carry.
        """
        with self._lock:
            entry = self._entries.get(id(obj))
            if entry is None or entry.obj is not obj:
                before = sys.getrefcount(obj)
                ref = registry().register(obj)
                entry = self._entries[id(obj)] = _Entry(obj, ref, 0)
                entry.own_refs = sys.getrefcount(obj) - before
                self._by_key[entry.ref.key] = entry
            held: list[_Entry] | None = getattr(self._holding, "entries", None)
            if held is not None:
                entry.uses += 1
                held.append(entry)
            return entry.ref

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No PerformanceWarning in this thread inside the block.

        A big task is pickled twice: at submit (where the warning points to
        the caller's line) and again at dispatch, in the dispatcher thread.
        """
        self._holding.quiet = True
        try:
            yield
        finally:
            self._holding.quiet = False

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold every registration handed out in this thread until the block ends.

        A submit wraps its pickling and queueing in this: between pickling a
        reference and :meth:`acquire` for the queued task, the object counts
        as used, so :meth:`release_idle` (another thread forking a fresh
        generation) cannot drop it from under the task.
        """
        outer: list[_Entry] | None = getattr(self._holding, "entries", None)
        held: list[_Entry] = []
        self._holding.entries = held
        try:
            yield
        finally:
            self._holding.entries = outer
            with self._lock:
                for entry in held:
                    entry.uses -= 1

    def acquire(self, refs: list[Reference]) -> list[Reference]:
        """A task carrying ``refs`` is queued: keep what they name registered until :meth:`done`.

        Automatic shares count one more use. Objects of explicit ``share()``
        handles are *pinned* (one more registration, dropped by :meth:`done`):
        a caller may drop its handle right after ``submit()``, and a
        generation forked later must still inherit the object. Returns the
        references to pass to :meth:`done`.
        """
        ours: list[Reference] = []
        if not refs:
            return ours
        reg = registry()
        with self._lock:
            for ref in refs:
                entry = self._by_key.get(ref.key)
                if entry is not None:
                    entry.uses += 1
                    ours.append(ref)
                    continue
                try:
                    reg.register(reg.lookup(ref))  # the same entry: one more registration
                except NotInheritedError:
                    continue  # not registered here: the task will say so in the worker
                _, count = self._pins.get(ref.key, (ref, 0))
                self._pins[ref.key] = (ref, count + 1)
                ours.append(ref)
        return ours

    def done(self, refs: list[Reference]) -> None:
        """A task whose :meth:`acquire` returned ``refs`` finished (or was dropped)."""
        if not refs:
            return
        unpin = []
        with self._lock:
            for ref in refs:
                entry = self._by_key.get(ref.key)
                if entry is not None:
                    entry.uses -= 1
                elif ref.key in self._pins:
                    _, count = self._pins[ref.key]
                    if count > 1:
                        self._pins[ref.key] = (ref, count - 1)
                    else:
                        del self._pins[ref.key]
                    unpin.append(ref)
        for ref in unpin:
            registry().release(ref)

    # -- releasing ----------------------------------------------------------

    def release_idle(self) -> None:
        """Release registrations no task uses and nobody else holds.

        Called before a fresh generation forks, so the parent does not keep
        every big argument of a long loop alive. An object the caller still
        holds stays registered: the new generation inherits it too, and
        using it again needs no fork (alternating two live objects would
        otherwise fork at every switch).
        """
        with self._lock:
            idle = [k for k, e in self._entries.items() if e.uses <= 0 and not e.held_elsewhere()]
            entries = [self._entries.pop(k) for k in idle]
            for entry in entries:
                del self._by_key[entry.ref.key]
        for entry in entries:
            registry().release(entry.ref)

    def release_all(self) -> None:
        """Release every registration and pin. Idempotent."""
        with self._lock:
            refs = [e.ref for e in self._entries.values()]
            self._entries.clear()
            self._by_key.clear()
            for ref, count in self._pins.values():
                refs += [ref] * count
            self._pins.clear()
        for ref in refs:
            registry().release(ref)

    def __len__(self) -> int:
        return len(self._entries)


# -- the warning --------------------------------------------------------------

_warned_sites: set[tuple[str, int]] = set()
_warned_lock = threading.Lock()


def _warn_pickled(obj: object, size: int, where: str) -> None:
    frame = _user_frame()
    site = (frame.f_code.co_filename, frame.f_lineno) if frame else ("?", 0)
    with _warned_lock:
        if site in _warned_sites:
            return
        _warned_sites.add(site)
    cls = type(obj)
    message = (
        f"{where} is a {cls.__module__}.{cls.__qualname__} of about {_mib(size)} and is "
        "pickled for every task that uses it. Pass forkref.share(obj) instead, or create "
        "the pool with auto_share=True to send big mutable arguments by reference "
        "(workers then see the object as it was when they forked). "
        "print(forkref.explain(obj)) shows how an object travels and what it costs."
    )
    module = frame.f_globals.get("__name__", "?") if frame else "?"
    warnings.warn_explicit(message, PerformanceWarning, site[0], site[1], module=module)


def _user_frame() -> FrameType | None:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("forkref"):
        frame = frame.f_back  # type: ignore[assignment]
    return frame


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size < 2**30 else f"{size / 2**30:.2f} GiB"
