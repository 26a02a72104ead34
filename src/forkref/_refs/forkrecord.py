"""Fork records: prove, after the fact, that a forked child holds an object.

``share(obj)`` called *after* a worker forked can still name ``obj`` in that
worker without pickling it, if ``obj`` was alive when the worker forked: the
worker has its own copy at the same address. What must be proven is that the
object at that address in the worker *is* ``obj``, and not an older object
that died in the parent, leaving its address to ``obj``. A raw address proves
nothing, so forkref keeps a table of weak references, filled at every fork::

    parent                                          child forked at fork F
    ------                                          ----------------------
    os.fork() -> before-fork hook (record()):       inherits the table
      walk the forking thread's frames: locals,     (copy-on-write)
      their modules' globals and __main__'s,
      one level into lists, tuples and dicts
      (and into a local object's attributes);
      for each weakref-able object o:
        table[id(o)] = weakref(o) tagged (token of F, seq)
        unless the table already holds o itself
        (then its earlier fork stands)
    share(o) later: find(o) -> (id, token, seq)
      only if table[id(o)]() is o                reference carries (id, token)
                                            ---> lookup(id, token):
                                                   rec = table.get(id)
                                                   rec.token == token ? rec() : None

Why this is safe: a weak reference is cleared when its object dies, before
the address can be reused, and never points to another object. In the parent,
``table[id(o)]() is o`` therefore proves that the entry was made for ``o``
itself, at the fork named by its token, and that ``o`` has lived ever since.
Tokens are 64 random bits per fork, so an entry the child made at a fork of
its own (or that an unrelated branch of the process tree made) never matches.
In the child, the entry with that token is the inherited one: ``rec()`` is
the child's copy of ``o``, or ``None`` if the child has dropped it. No address
is ever dereferenced.

The table is cumulative: an object seen at several forks keeps one entry,
tagged with the first fork that saw it, so it costs one weak reference however
often the process forks, and children forked later (replacement workers
forked from a pool's handler thread, whose frames hold none of the caller's
variables) still inherit it. A dead object's entry leaves with it (weakref
callback).

Package API:
    install() -> None          register the before-fork hook (once, at import)
    set_enabled(flag) -> bool  stop or resume recording in this process
    find(obj) -> Record | None the fork record that proves ``obj`` lived since
    lookup(key, token) -> object | None   this process's copy, if it holds one
    last_fork() -> int         seq of the last fork the calling thread made
    weakrefable(obj) -> bool
    record(frame) -> int       record now, as the hook does (tests, benchmarks)

Limits: only objects that can be weakly referenced are covered: not plain
``list``, ``dict``, ``tuple``, ``bytes``, ``str``, ``int`` or ``bytearray``
objects (they go through shared memory when shared late), unless they sit
inside a weakref-able object that is itself shared. Only what the forking
thread can see is recorded: its frames' variables, their modules' globals and
``__main__``'s, one level deep. Containers are looked into up to
``EXPAND_LIMIT`` items, a module's globals up to its ``NAMESPACE_LIMIT`` most
recently added ones, and the local variables of the ``INNER_FRAMES`` innermost
and ``OUTER_FRAMES`` outermost frames (a deep recursion's middle is skipped).
The globals of standard-library modules and of forkref itself are skipped
(they hold no user data and cost time at every fork).
The cost per fork (``benchmarks/bench_share_anywhere.py`` measures it): a
dict probe per object looked at, and a weak reference per object seen for
the first time.

Python 3.10 to 3.12 build a dict of a function's local variables when its
frame's ``f_locals`` is read, and keep it on the frame: a variable rebound or
deleted later would stay alive in that dict. The hook reads it and clears it
again when nothing else holds it (a later read rebuilds it; tracers rebuild it
before they write it back). Python 3.13 (PEP 667) keeps no such dict.

Non-goals: no record of objects only other threads can see; no guarantee for
objects a child drops (it then fetches them through shared memory).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import secrets
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

__all__ = [
    "EXPAND_LIMIT",
    "Record",
    "find",
    "install",
    "last_fork",
    "lookup",
    "record",
    "set_enabled",
    "weakrefable",
]

EXPAND_LIMIT = 1024  # items looked at in one list, tuple or dict
NAMESPACE_LIMIT = 2048  # globals looked at in one module: the most recently added
# Frames whose local variables are looked at: the innermost (the function that
# starts the pool and its callers) and the outermost (main(), the script).
INNER_FRAMES, OUTER_FRAMES = 64, 16
_CO_OPTIMIZED = 0x0001  # a function's frame: f_locals is a snapshot, not the namespace
_PEP_667 = sys.version_info >= (3, 13)
# The frame's own reference, ours, and getrefcount's argument.
_SNAPSHOT_REFS = 3


class Record(NamedTuple):
    """Where a fork record proves an object lived.

    Attributes:
        key: ``id()`` of the object, in this process and in the forked children.
        token: random id of the fork that recorded it (64 bits).
        seq: number of that fork in this process's lineage (increasing).
    """

    key: int
    token: int
    seq: int


class _Rec(weakref.ref[Any]):
    """A table entry: the weak reference itself, tagged with the fork that made it."""

    __slots__ = ("key", "seq", "token")
    key: int
    token: int
    seq: int

    def __new__(
        cls, obj: object, callback: Callable[[Any], object], key: int, token: int, seq: int
    ) -> _Rec:
        self = super().__new__(cls, obj, callback)
        self.key, self.token, self.seq = key, token, seq
        return self

    def __init__(
        self, obj: object, callback: Callable[[Any], object], key: int, token: int, seq: int
    ) -> None:
        # weakref.ref.__init__ accepts (obj, callback) only; typeshed omits it.
        super().__init__(obj, callback)  # type: ignore[call-arg]


_table: dict[int, _Rec] = {}
_enabled = True
_installed = False
_prepare: Callable[[], object] | None = None
_seq = 0
_last = threading.local()


def _forget(rec: _Rec) -> None:
    # The object died: its address may be reused, so the entry must go. Only
    # this very entry: a later fork may have replaced it already.
    if _table.get(rec.key) is rec:
        del _table[rec.key]


def install(prepare: Callable[[], object]) -> None:
    """Register the before-fork hook that records. Idempotent.

    Called when forkref is imported: the first fork to record is often the
    one a ``multiprocessing.Pool`` constructor makes, before any forkref call.
    ``prepare`` runs first at each recording fork (the registry makes sure
    its tree secret exists, so the child can verify references).
    """
    global _installed, _prepare
    _prepare = prepare
    if not _installed:
        _installed = True
        os.register_at_fork(before=_before_fork)


def set_enabled(flag: bool) -> bool:
    """Record at forks from now on (``True``) or not; returns the previous setting.

    A fork server turns it off: its workers inherit the table it inherited,
    and nothing the fork server itself holds is ever shared.
    """
    global _enabled
    previous, _enabled = _enabled, flag
    return previous


def last_fork() -> int:
    """Seq of the last fork made by the calling thread with recording on (0: none).

    A pool reads it right after forking a generation: objects whose
    :class:`Record` has ``seq`` at most this value are inherited by it.
    """
    return int(getattr(_last, "seq", 0))


def weakrefable(obj: object) -> bool:
    """Whether ``obj`` can be weakly referenced, hence covered by fork records."""
    return type(obj).__weakrefoffset__ != 0


def find(obj: object) -> Record | None:
    """The record proving ``obj`` has lived since a fork of this process, if any."""
    key = id(obj)
    rec = _table.get(key)
    if rec is None or rec() is not obj:
        return None
    return Record(key, rec.token, rec.seq)


def lookup(key: int, token: int) -> object | None:
    """This process's copy of the object recorded under ``(key, token)``, or ``None``.

    ``None`` when this process was forked before that fork, from another
    branch of the tree, or has dropped the object since.
    """
    rec = _table.get(key)
    if rec is None or rec.token != token:
        return None
    return rec()


def _before_fork() -> None:
    global _seq
    if not _enabled:
        return
    # A failure here must never break the fork: it only means that objects
    # shared later go through shared memory instead.
    with contextlib.suppress(Exception):
        if _prepare is not None:
            _prepare()
        _seq += 1
        _last.seq = _seq
        record(sys._getframe(1), token=secrets.randbits(64), seq=_seq)


def record(frame: types.FrameType | None, token: int | None = None, seq: int = 0) -> int:
    """Record the objects reachable from ``frame`` and its callers; return how many were new."""
    scan = _Scan()
    main = sys.modules.get("__main__")
    if main is not None and isinstance(getattr(main, "__dict__", None), dict):
        scan.namespace(vars(main))
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    # Bounded: a deep recursion must not make every fork slower. Its middle
    # frames still contribute their modules' globals.
    inner = len(frames) - OUTER_FRAMES
    for depth, each in enumerate(frames):
        scan.frame(each, with_locals=depth < INNER_FRAMES or depth >= inner)
    return scan.commit(secrets.randbits(64) if token is None else token, seq)


# -- the scan --------------------------------------------------------------------

_RECORD, _EXPAND, _ATTRS = 1, 2, 4
_kinds: dict[type, int] = {}
_NEVER = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    types.CodeType,
    types.FrameType,
    property,
    staticmethod,
    classmethod,
    weakref.ref,
    threading.Thread,
)
_SKIP_MODULES = frozenset(getattr(sys, "stdlib_module_names", ())) | {"forkref"}


def _classify(cls: type) -> int:
    """What to do with an object of type ``cls`` (cached per type)."""
    kind = 0
    if not issubclass(cls, _NEVER) and not _is_handle(cls):
        if cls.__weakrefoffset__:
            kind |= _RECORD
        if issubclass(cls, (list, tuple, dict)):
            kind |= _EXPAND
        elif cls.__dictoffset__ and cls.__flags__ & (1 << 9):  # Py_TPFLAGS_HEAPTYPE
            kind |= _ATTRS
    _kinds[cls] = kind
    return kind


def _is_handle(cls: type) -> bool:
    # forkref's own handles and placeholders: never worth a record.
    module = str(getattr(cls, "__module__", ""))
    return module == "forkref" or module.startswith("forkref.")


def _items(obj: Any) -> Iterable[object]:
    """Up to EXPAND_LIMIT items of a list, tuple or dict (values), bypassing overrides."""
    cls = type(obj)
    if cls is list or cls is tuple:  # the common case, sliced in C
        return obj[:EXPAND_LIMIT]  # type: ignore[no-any-return]
    if cls is dict and len(obj) <= EXPAND_LIMIT:
        return obj.values()  # type: ignore[no-any-return]
    if isinstance(obj, dict):
        return itertools.islice(dict.values(obj), EXPAND_LIMIT)
    if isinstance(obj, list):
        return itertools.islice(list.__iter__(obj), EXPAND_LIMIT)
    return itertools.islice(tuple.__iter__(obj), EXPAND_LIMIT)


class _Scan:
    """One walk over a thread's frames; candidates first, the table touched once at the end."""

    __slots__ = ("expanded", "found", "namespaces")

    def __init__(self) -> None:
        self.found: list[object] = []
        self.expanded: set[int] = set()
        self.namespaces: set[int] = set()

    def namespace(self, names: dict[str, Any]) -> None:
        """A module's globals, the most recent first, and one level into containers."""
        self.namespaces.add(id(names))
        # A list first: another thread may bind a global meanwhile. Bounded:
        # the cost of a fork must not grow with a huge generated module.
        self.values(list(itertools.islice(reversed(names.values()), NAMESPACE_LIMIT)), False)

    def frame(self, frame: types.FrameType, with_locals: bool) -> None:
        names = frame.f_globals
        if id(names) not in self.namespaces:
            module = str(names.get("__name__") or "").partition(".")[0]
            if module in _SKIP_MODULES:
                self.namespaces.add(id(names))
            else:
                self.namespace(names)
        if not with_locals:
            return
        if frame.f_code.co_flags & _CO_OPTIMIZED:
            self.values(_local_values(frame), attrs=True)
        elif frame.f_locals is not names:  # a class body, exec() with its own namespace
            self.values(list(frame.f_locals.values()), attrs=False)

    def values(self, values: Iterable[object], attrs: bool) -> None:
        kinds, found = _kinds, self.found
        for obj in values:
            kind = kinds.get(type(obj))
            if kind is None:
                kind = _classify(type(obj))
            if not kind:
                continue
            if kind & _RECORD:
                found.append(obj)
            if kind & _EXPAND or (attrs and kind & _ATTRS):
                self.expand(obj, kind)

    def expand(self, obj: object, kind: int) -> None:
        if id(obj) in self.expanded:
            return
        self.expanded.add(id(obj))
        # Copies: another thread may change the container meanwhile.
        inner = list(_items(obj)) if kind & _EXPAND else _attribute_values(obj)
        kinds, found = _kinds, self.found
        for item in inner:  # one level only: records, never expands further
            item_kind = kinds.get(type(item))
            if item_kind is None:
                item_kind = _classify(type(item))
            if item_kind & _RECORD:
                found.append(item)

    def commit(self, token: int, seq: int) -> int:
        table, new = _table, 0
        for obj in self.found:
            key = id(obj)
            rec = table.get(key)
            if rec is not None and rec() is obj:
                continue  # recorded at an earlier fork: that one stands
            try:
                table[key] = _Rec(obj, _forget, key, token, seq)
            except TypeError:  # a type that claims weakref support but refuses it
                continue
            new += 1
        return new


def _attribute_values(obj: object) -> list[object]:
    """The values of an object's attributes, without touching the object.

    Not ``obj.__dict__``: since 3.11 CPython keeps an instance's attributes
    inline and builds a dict only when ``__dict__`` is asked for, so reading it
    would leave a dict on every local object at every fork. The garbage
    collector's view (``tp_traverse``) gives the same values, slots included,
    and runs no Python code. A dict among them (a materialized ``__dict__``)
    is looked into.
    """
    values: list[object] = []
    for ref in gc.get_referents(obj)[:EXPAND_LIMIT]:
        if type(ref) is dict:
            values.extend(_items(ref))
        elif not isinstance(ref, type):
            values.append(ref)
    return values


def _local_values(frame: types.FrameType) -> list[object]:
    """The values of a function frame's local variables, leaving no trace on the frame."""
    if _PEP_667:
        return list(frame.f_locals.values())
    snapshot = frame.f_locals
    values = list(snapshot.values())
    # 3.10-3.12 keep the dict built by f_locals on the frame, with a strong
    # reference to every value: a variable deleted or rebound later would
    # stay alive until the function returns. Clear it unless someone holds
    # it (locals() kept by user code, a debugger): the next f_locals or
    # locals() rebuilds it, and a trace function rebuilds it before writing
    # it back (sysmodule.c call_trampoline), so no variable is lost.
    if sys.getrefcount(snapshot) <= _SNAPSHOT_REFS:
        snapshot.clear()
    return values
