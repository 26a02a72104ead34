"""Pickling a task: callables and big arguments become references.

A task is a function and ``(kind, data)``: ``CALL`` with ``data = (args,
kwargs)``, ``MAP``/``STARMAP`` with ``data`` a chunk of items. The function
is pickled once per call (:meth:`TaskEncoder.encode_function`, an
:class:`FnBlob` that a worker receives once), the data once per task
(:meth:`TaskBatch.encode`), both in the caller's thread; the encoder
collects every :class:`~forkref._refs.registry.Reference` the task carries
(explicit ``share()`` handles, automatic shares, callables sent by
reference), which the pool compares against what its workers inherited.

A task whose pickle is bigger than :data:`INLINE_LIMIT` is pickled in the
caller's thread only to find its references and its size (the bytes are
counted, not kept); the dispatcher pickles it again when a worker is free to
take it (:meth:`TaskEncoder.encode_late`), so the parent holds one big pickle
at a time, as the stdlib's pools do.

Two hooks do the work, because the C pickler calls ``reducer_override`` for
everything *except* exact ``int``/``float``/``bytes``/``str``/``list``/
``dict``/``tuple``/``set`` instances (documented under
``pickle.Pickler.reducer_override``):

* :meth:`TaskEncoder._walk` visits the arguments before pickling, looks
  into small builtin containers and replaces big values by references;
* :meth:`_TaskPickler.reducer_override` catches what lies deeper: functions
  that cannot be pickled by name (lambdas, closures, local definitions) go
  *by value* under fork (below); classes that cannot be pickled by name go by
  reference; big numpy/pandas/pyarrow objects
  and big plain objects (bound methods' ``self``, ``functools.partial``
  arguments) go through the same size policy.

**Functions by value** (fork only): a lambda or closure is sent as its
code (``marshal``, same interpreter on both ends), its module's name (the
worker uses that module's globals) and its captured values, defaults and
attributes, pickled with the task. Captured values above ``share_threshold``
go by reference, mutable or not: the worker sees them as they were when its
generation forked (snapshot), as if the function itself were shared; small
ones are pickled, so the worker sees their value at the submit. A new lambda
per call thus costs no fork. A function whose captured values cannot be
pickled (a lock, a socket) goes by reference as a whole: registered once
for as long as it lives, and a task that uses it after the workers forked
makes the pool fork a fresh generation.

**``__main__`` by value** (spawn and forkserver): functions, lambdas and
classes defined in ``__main__`` (a notebook, ``python -c``, a script) are
pickled by value with cloudpickle, as loky does, because those workers'
``__main__`` is not the parent's. Everything else keeps the stdlib's rules:
functions and classes of importable modules go by qualified name.

Non-goals: big *builtin* values nested inside a custom object's attributes
below the first level are pickled (pass ``forkref.share(obj)`` for those).
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import importlib
import io
import itertools
import marshal
import os
import pickle
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

from forkref._errors import ReleasedError, TaskPicklingError, file_limit_text, is_file_limit
from forkref._refs.registry import Reference, collect_references
from forkref._share.autoshare import AutoSharer, ByReference
from forkref._shm import export as _export

__all__ = [
    "CALL",
    "INLINE_LIMIT",
    "MAP",
    "STARMAP",
    "FnBlob",
    "TaskBatch",
    "TaskEncoder",
    "importable",
]

CALL, MAP, STARMAP = 0, 1, 2
#: Task pickles above this many bytes are made again when a worker is free to take them.
INLINE_LIMIT = 1 << 20
_fn_ids = itertools.count(1)
_FAST: frozenset[type] = frozenset({int, float, bool, complex, type(None)})
_MAX_DEPTH = 4
_WALKED: frozenset[type] = frozenset({tuple, list, dict})
_MAX_WALK = 256  # containers longer than this are judged as a whole, not item by item


def importable(obj: Any, forked: bool = True) -> bool:
    """Whether ``obj`` (a function or class) travels by qualified name, as the stdlib sends it.

    For workers not forked (``forked=False``), a ``__main__`` object does only
    if they import ``__main__`` too (a script's, not a notebook's or ``-c``'s).
    """
    if not forked and getattr(obj, "__module__", None) == "__main__" and not _main_importable():
        return False
    return _importable(obj)


def _importable(obj: Any) -> bool:
    """Whether pickle can save ``obj`` by qualified name (and find the same object)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
        return False
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found is obj


@dataclass(frozen=True, eq=False)
class FnBlob:
    """A task function pickled once for every task of a call.

    Attributes:
        id: unique in this process; a worker is sent ``blob`` once per id.
        blob: the pickled function.
        refs: references the function carries (captured big values,
            the function itself when it goes by reference).
    """

    id: int
    blob: bytes
    refs: list[Reference]


class _Sink:
    """The pickler's file: keeps what is written up to ``limit`` bytes, then only counts."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.parts: list[bytes] | None = []
        self.size = 0

    def reset(self) -> None:
        self.parts = []
        self.size = 0

    def write(self, data: Any) -> int:
        # The C pickler hands big payloads over as they are (a PickleBuffer of a
        # numpy block, say), without copying them into its frame.
        n = len(data) if type(data) is bytes else memoryview(data).nbytes
        self.size += n
        if self.parts is not None:
            if self.limit is None or self.size <= self.limit:
                self.parts.append(data if type(data) is bytes else bytes(memoryview(data)))
            else:
                self.parts = None  # too big to keep: pickled again at dispatch
        return int(n)

    def value(self) -> bytes | None:
        return None if self.parts is None else b"".join(self.parts)


class _TaskPickler(pickle.Pickler):
    def __init__(self, file: Any, encoder: TaskEncoder) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._encoder = encoder
        self.dispatch_table = _process_reducers()

    def reducer_override(self, obj: Any) -> Any:
        return self._encoder._reduce(obj)


def _process_reducers() -> dict[Any, Any]:
    """copyreg's reducers, plus those forkref's own types registered for other processes.

    A task goes to another process, as with multiprocessing's pickler: a
    compact container travels as a reference to one shared segment, not as
    its bytes. Only forkref's entries are borrowed from ForkingPickler (which
    a lower layer can read without importing the types): other libraries'
    (torch tensors, sockets) keep pickling as they do in a forkref task.
    """
    table = dict(copyreg.dispatch_table)
    forking = ForkingPickler(io.BytesIO()).dispatch_table
    table.update((cls, fn) for cls, fn in forking.items() if cls.__module__ == "forkref")
    return table


class TaskEncoder:
    """Pickles tasks for one pool, applying its by-reference policy."""

    #: The pickler class (a launcher's encoder may use another, e.g. cloudpickle's).
    pickler_class: Callable[[Any, TaskEncoder], pickle.Pickler] = _TaskPickler

    def __init__(self, sharer: AutoSharer, fork: bool, start_method: str) -> None:
        self.sharer = sharer
        #: Workers are forked from this process: callables can go by reference.
        self.fork = fork
        self.start_method = start_method

    def encode_function(self, fn: Any) -> FnBlob:
        """Pickle a task function once for all the tasks of a call.

        Raises:
            TaskPicklingError: the function cannot be pickled; says why and the fix.
            ReleasedError: it carries a released :class:`forkref.Shared` handle.
        """
        with collect_references() as refs, self._deferred():
            try:
                blob = self._dumps(fn)
            except Exception as err:
                raise self._explain(CALL, fn, ((), {}), err, 0) from err
        return FnBlob(next(_fn_ids), blob, refs)

    def encode_late(self, kind: int, fn: Any, data: Any, offset: int) -> bytes:
        """Pickle a big task's data now (at dispatch), in full.

        Raises:
            TaskPicklingError: it cannot be pickled any more (changed since submit).
            ReleasedError: it carries a handle released since submit.
        """
        sink = _Sink(None)
        try:
            with self.sharer.quiet(), self._deferred():
                self.pickler_class(sink, self).dump((kind, self._walk_data(kind, data, offset)))
        except Exception as err:
            raise self._explain(kind, fn, data, err, offset) from err
        payload = sink.value()
        assert payload is not None
        return payload

    @contextlib.contextmanager
    def batch(self) -> Iterator[TaskBatch]:
        """Encode several tasks with one pickler; ``batch.refs`` collects their references."""
        with collect_references() as refs, self._deferred():
            yield TaskBatch(self, refs)

    def _deferred(self) -> contextlib.AbstractContextManager[None]:
        # Forked workers inherit what their tasks use: handles pickled for them
        # only open the export socket, and the dispatcher starts the export
        # thread if a worker ever knocks (no thread to pause at each fork).
        return _export.deferred() if self.fork else contextlib.nullcontext()

    def _dumps(self, obj: object) -> bytes:
        buf = io.BytesIO()
        self.pickler_class(buf, self).dump(obj)
        return buf.getvalue()

    # -- the walk over arguments ---------------------------------------------

    def _walk_data(self, kind: int, data: Any, offset: int) -> Any:
        if self.sharer.threshold is None or not self.sharer.by_reference:
            return data
        if kind == CALL:
            args, kwargs = data
            new_args = tuple(self._walk(a, _where("argument", i)) for i, a in enumerate(args))
            new_kwargs = {
                k: self._walk(v, _where("keyword argument", k)) for k, v in kwargs.items()
            }
            return new_args, new_kwargs
        if set(map(type, data)) <= _FAST:  # C-speed pass: the common case of plain numbers
            return data
        return [
            x if type(x) in _FAST else self._walk(x, _where("item", offset + i, " of the iterable"))
            for i, x in enumerate(data)
        ]

    def _walk(self, obj: Any, where: Callable[[], str], depth: int = 0) -> Any:
        cls = type(obj)
        if cls in _FAST:
            return obj
        # A short container is judged by its items (a tuple of one big frame and
        # an int is not itself a big object); a long one as a whole.
        short = cls in _WALKED and len(obj) <= _MAX_WALK and depth < _MAX_DEPTH
        if not short:
            return self.sharer.consider(obj, where)
        if cls is tuple or cls is list:
            items = [self._walk(x, _nested(where, i), depth + 1) for i, x in enumerate(obj)]
            if any(a is not b for a, b in zip(items, obj, strict=True)):
                return cls(items)
        else:
            values = {k: self._walk(v, _nested(where, k), depth + 1) for k, v in obj.items()}
            if any(values[k] is not v for k, v in obj.items()):
                return values
        return obj

    # -- the pickler hook ----------------------------------------------------

    def _reduce(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            if self.fork and not _importable(obj):
                by_value = self._function_by_value(obj)
                return by_value if by_value is not None else self._by_reference(obj)
            if not self.fork and getattr(obj, "__module__", None) == "__main__":
                return _main_by_value(obj)
            return NotImplemented
        if isinstance(obj, ByReference):
            return NotImplemented
        if type(obj) is functools.partial:
            return self._reduce_partial(obj)
        new = self.sharer.consider(obj, lambda: f"a {type(obj).__qualname__} inside the task")
        if isinstance(new, ByReference):
            return new.__reduce__()
        return NotImplemented

    def _by_reference(self, obj: object) -> Any:
        return ByReference(self.sharer.register(obj)).__reduce__()

    def _function_by_value(self, fn: Any) -> Any:
        """The reduce value of a lambda/closure sent by value, or None to send it by reference."""
        if not isinstance(fn, types.FunctionType):
            return None
        module = sys.modules.get(fn.__module__ or "")
        if module is None or vars(module) is not fn.__globals__:
            return None  # globals of no importable module: only the object itself has them
        try:
            code = marshal.dumps(fn.__code__)
        except ValueError:
            return None
        where = lambda: f"a value captured by {fn.__qualname__}"  # noqa: E731
        snap = self.sharer.consider_captured
        cells = [
            _EMPTY if _cell_empty(c) else snap(c.cell_contents, where) for c in fn.__closure__ or ()
        ]
        defaults = tuple(snap(d, where) for d in fn.__defaults__ or ())
        kwdefaults = {k: snap(v, where) for k, v in (fn.__kwdefaults__ or {}).items()}
        state = (cells, defaults or None, kwdefaults or None, dict(vars(fn)) or None)
        if not self._state_picklable(fn, state):
            return None
        args = (code, fn.__module__, fn.__name__, fn.__qualname__, len(cells))
        return (_make_function, args, state, None, None, _set_function_state)

    def _state_picklable(self, fn: Any, state: Any) -> bool:
        """Try the captured values once (a recursive closure reaches itself: assume yes)."""
        trying: set[int] = _trial.__dict__.setdefault("ids", set())
        if id(fn) in trying:
            return True
        trying.add(id(fn))
        try:
            self._dumps(state)
        except Exception:
            return False
        finally:
            trying.discard(id(fn))
        return True

    def _reduce_partial(self, obj: functools.partial[Any]) -> Any:
        where = lambda: "an argument bound in the functools.partial"  # noqa: E731
        args = tuple(self._walk(a, where) for a in obj.args)
        keywords = {k: self._walk(v, where) for k, v in obj.keywords.items()}
        state = (obj.func, args, keywords or None, obj.__dict__ or None)
        return (functools.partial, (obj.func,), state)

    # -- explaining a failure ------------------------------------------------

    #: Who receives the task, in messages.
    destination = "a worker"

    def _explain(
        self, kind: int, fn: Any, data: Any, err: Exception, offset: int
    ) -> TaskPicklingError | ReleasedError:
        culprit, obj = self._find_culprit(kind, fn, data, offset)
        if culprit is None:
            culprit, obj = "the task", data
        if isinstance(err, ReleasedError):
            # Not a pickling problem but a use after release(): the same error
            # the stdlib's pools raise, with where the handle was in the task.
            return ReleasedError(f"{err} (the handle is in {culprit})")
        what = f"{culprit} ({type(obj).__module__}.{type(obj).__qualname__})"
        if is_file_limit(err):  # not the object's fault: no descriptor was left to pickle it
            assert isinstance(err, OSError)
            return TaskPicklingError(file_limit_text(f"pickle {what} for {self.destination}", err))
        return TaskPicklingError(
            f"cannot send {what} to {self.destination}: pickling failed with {err!r}; "
            f"{self._fix(culprit, fn)}"
        )

    def _fix(self, culprit: str, fn: Any) -> str:
        """What to do about an object of the task that cannot be pickled."""
        if culprit == "the function" and not self.fork and _defined_in_main(fn):
            return (
                "it is defined in __main__, so it travels by value (cloudpickle) with the "
                "globals it uses: pass the unpicklable ones as arguments, make them picklable, "
                "or use the 'fork' context (forkref's default)"
            )
        if culprit == "the function" and not self.fork:
            return (
                f"the {self.start_method!r} start method pickles functions by qualified name, so "
                "define it at module level, or use the 'fork' context (forkref's default)"
            )
        if self.fork:
            return "pass it by reference with forkref.share(obj), or make it picklable"
        return (
            f"make it picklable: workers started by {self.start_method!r} receive everything "
            "by pickle"
        )

    def _find_culprit(self, kind: int, fn: Any, data: Any, offset: int) -> tuple[str | None, Any]:
        if not self._picklable(fn):
            return "the function", fn
        if kind == CALL:
            args, kwargs = data
            for i, a in enumerate(args):
                if not self._picklable(a):
                    return f"argument {i}", a
            for k, v in kwargs.items():
                if not self._picklable(v):
                    return f"keyword argument {k!r}", v
            return None, None
        for i, x in enumerate(data):
            if not self._picklable(x):
                return f"item {offset + i} of the iterable", x
        return None, None

    def _picklable(self, obj: object) -> bool:
        try:
            self._dumps(obj)
        except Exception:
            return False
        return True


def _defined_in_main(fn: Any) -> bool:
    return getattr(fn, "__module__", None) == "__main__" or (
        isinstance(fn, functools.partial) and _defined_in_main(fn.func)
    )


def _main_by_value(obj: Any) -> Any:
    """The reduce value of a function or class of ``__main__`` for spawn/forkserver workers.

    Their ``__main__`` is not the parent's: a notebook or ``python -c`` has no
    file for them to import, so pickling by name fails there ("Can't get
    attribute 'colsum' on <module '__main__'>"). Like loky, send it by value
    with cloudpickle, the library made for this (code, closure, and the
    globals it uses). What the workers can import by name still goes by name:
    objects of importable modules, and those of a script's ``__main__``, which
    spawn workers re-import (the stdlib's rule, so a script behaves as before;
    only its lambdas and local functions go by value).
    """
    importable_main = _main_importable()
    if importable_main and _importable(obj):
        return NotImplemented
    buf = io.BytesIO()
    pickler = _main_pickler_class()(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.importable_main = importable_main
    pickler.dump(obj)
    return (_load_main_by_value, (buf.getvalue(),))


def _main_importable() -> bool:
    """Whether spawn workers re-import ``__main__`` (multiprocessing.spawn's own test)."""
    main = sys.modules["__main__"]
    if getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    return isinstance(path, str) and os.path.isfile(path)


@functools.cache
def _main_pickler_class() -> Any:
    # A dependency (untyped), imported the first time a __main__ object travels.
    import cloudpickle  # type: ignore[import-untyped]

    class MainPickler(cloudpickle.Pickler):  # type: ignore[misc]
        """cloudpickle, except that what a script's workers import by name goes by name."""

        importable_main = False

        def reducer_override(self, obj: Any) -> Any:
            by_name = self.importable_main and isinstance(obj, (types.FunctionType, type))
            if by_name and _importable(obj):
                return NotImplemented
            return super().reducer_override(obj)

    return MainPickler


def _load_main_by_value(blob: bytes) -> Any:
    """In a worker: rebuild a ``__main__`` object and make it findable there by name.

    A result (or exception) of a notebook class is pickled by name in the
    worker. So the object, and the ``__main__`` functions and classes it
    brought along as globals, are set in the worker's ``__main__`` (never
    replacing a name already there); the parent then unpickles the result as
    an instance of its own class.
    """
    obj = pickle.loads(blob)
    functions = [obj] if isinstance(obj, types.FunctionType) else []
    if isinstance(obj, type):
        functions = [f for f in vars(obj).values() if isinstance(f, types.FunctionType)]
    brought = [obj, *(g for f in functions for g in f.__globals__.values())]
    main = vars(sys.modules["__main__"])
    for found in brought:
        name = getattr(found, "__qualname__", "")
        mains = isinstance(found, (type, types.FunctionType)) and found.__module__ == "__main__"
        if mains and name.isidentifier():
            main.setdefault(name, found)
    return obj


_trial = threading.local()  # functions whose captured values are being tried, per thread


class _Empty:
    """Marks an unbound cell (a closure variable not assigned yet)."""


_EMPTY = _Empty()


def _cell_empty(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return True
    return False


def _make_function(code: bytes, module: str, name: str, qualname: str, ncells: int) -> Any:
    """In the worker: a function with the parent's code over its module's globals.

    Captured values are set afterwards (:func:`_set_function_state`), so that a
    closure that refers to itself unpickles.
    """
    globals_ = vars(sys.modules.get(module) or importlib.import_module(module))
    closure = tuple(types.CellType() for _ in range(ncells)) or None
    fn = types.FunctionType(marshal.loads(code), globals_, name, None, closure)
    fn.__qualname__ = qualname
    return fn


def _set_function_state(fn: Any, state: Any) -> Any:
    cells, defaults, kwdefaults, attrs = state
    for cell, value in zip(fn.__closure__ or (), cells, strict=True):
        if not isinstance(value, _Empty):
            cell.cell_contents = value
    fn.__defaults__ = defaults
    fn.__kwdefaults__ = kwdefaults
    if attrs:
        fn.__dict__.update(attrs)
    return fn


class TaskBatch:
    """Pickles the tasks of one call, reusing a pickler (see :meth:`TaskEncoder.batch`)."""

    def __init__(self, encoder: TaskEncoder, refs: list[Reference]) -> None:
        self._encoder = encoder
        #: References carried by the tasks encoded so far (appended by the pickling).
        self.refs = refs
        self._sink = _Sink(INLINE_LIMIT)
        self._pickler = encoder.pickler_class(self._sink, encoder)

    def encode(self, kind: int, fn: Any, data: Any, offset: int = 0) -> tuple[bytes | None, int]:
        """Pickle one task's data: ``(payload, size)``, payload None when over INLINE_LIMIT.

        Raises:
            TaskPicklingError: naming the argument or item that cannot be
                pickled, why, and the fix.
            ReleasedError: the task carries a released :class:`forkref.Shared` handle.
        """
        walked = self._encoder._walk_data(kind, data, offset)
        self._sink.reset()
        self._pickler.clear_memo()
        try:
            self._pickler.dump((kind, walked))
        except Exception as err:
            # The pickler's state is undefined after an error: a fresh one.
            self._pickler = self._encoder.pickler_class(self._sink, self._encoder)
            raise self._encoder._explain(kind, fn, data, err, offset) from err
        return self._sink.value(), self._sink.size


def _where(kind: str, key: object, suffix: str = "") -> Callable[[], str]:
    return lambda: f"{kind} {key!r}{suffix}"


def _nested(where: Callable[[], str], key: object) -> Callable[[], str]:
    return lambda: f"{where()}[{key!r}]"
