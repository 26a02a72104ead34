"""Handles: ``share(obj)`` and what a pickled handle turns into.

In the sharing process a :class:`Shared` handle holds the object and one
registration in the registry. Pickled, it is only its :class:`Reference`
(about 170 bytes, whatever the object's size). Unpickled, it is resolved by
:func:`_resolve`: in the sharing process, in processes forked from it after
the share, and in processes forked before the share while the object was
already alive (its fork record, :mod:`forkref._refs.forkrecord`), that yields the
original object itself, not a proxy, so worker functions take it as a plain
argument. A process that holds no copy (started by spawn or forkserver, or
forked before the object existed) asks the sharing process, which serializes
the object once into shared memory (``forkref._shm.export``); the worker maps
it, zero-copy for array buffers.

Resolution never raises. The stdlib pools lose the worker when unpickling a
task raises (``multiprocessing.Pool`` then hangs on that task forever,
``ProcessPoolExecutor`` turns into ``BrokenProcessPool``), so an unresolvable
reference becomes an :class:`Unavailable` placeholder that raises
:class:`~forkref.NotInheritedError` on first use: the task fails, the pool
lives.

Non-goals: a handle does not synchronise mutations. A worker sees the object
as it was when that worker was forked; its own writes stay in its private
copy-on-write pages and are never seen by the parent or other workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, NoReturn, TypeVar

from forkref._errors import Error, NotInheritedError, ReleasedError
from forkref._refs.registry import Reference, note_reference, registry
from forkref._shm import export as _export

__all__ = ["Shared", "Unavailable", "share", "supplied"]

T = TypeVar("T")


def _release(ref: Reference) -> None:
    registry().release(ref)


class Shared(Generic[T]):
    """A handle that travels to forked workers as a small reference.

    Create it with :func:`forkref.share`. Pass it wherever a task argument
    goes (nested in tuples, lists, dicts, dataclasses, ``functools.partial``,
    keyword arguments): a worker forked after the share receives the object
    itself. In the sharing process :meth:`get` returns the object.

    The object stays registered while any handle to it is alive in the
    sharing process, or until :meth:`release`; use the handle as a context
    manager to release it at the end of a block.
    """

    __module__ = "forkref"
    __slots__ = ("__weakref__", "_finalizer", "_obj", "_ref")

    def __init__(self, obj: T) -> None:
        """Register ``obj``; prefer :func:`forkref.share`, which reads better."""
        self._obj: T | None = obj
        self._ref = registry().register(obj)
        # The finalizer holds only the small reference, never the object, so
        # dropping the last handle lets the object die.
        self._finalizer = weakref.finalize(self, _release, self._ref)

    @property
    def ref(self) -> Reference:
        """The reference this handle pickles to."""
        return self._ref

    @property
    def released(self) -> bool:
        """Whether :meth:`release` was called."""
        return not self._finalizer.alive

    def get(self) -> T:
        """Return the shared object.

        Raises:
            ReleasedError: the handle was released.
        """
        obj = self._obj
        if obj is None and self.released:
            raise ReleasedError(
                f"cannot get the shared {self._ref.typename}: the handle was released; "
                "call forkref.share() again to share it anew"
            )
        return obj  # type: ignore[return-value]

    def release(self) -> None:
        """Drop this handle's registration now. Safe to call twice.

        Workers already forked keep their inherited copy. With the last
        registration, the object's shared-memory export goes too, and workers
        that fetched it drop their copy before their next task.
        """
        if self._finalizer.detach() is not None:
            registry().release(self._ref, explicit=True)
        self._obj = None

    def __enter__(self) -> Shared[T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.released:
            raise ReleasedError(
                f"cannot pickle the handle of a shared {self._ref.typename}: it was released; "
                "keep the handle alive (or unreleased) until the tasks using it are submitted"
            )
        note_reference(self._ref)
        # A reference leaves this process: answer workers that cannot inherit it.
        _export.ensure_serving(self._ref)
        return (_resolve, (self._ref,))

    def __copy__(self) -> Shared[T]:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Shared[T]:
        return self

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Shared):
            return self._ref == other._ref
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._ref)

    def __repr__(self) -> str:
        state = "released" if self.released else f"key={self._ref.key.hex()[:12]}"
        return f"<forkref.Shared {self._ref.typename} {state}>"


def share(obj: T) -> Shared[T]:
    """Share ``obj`` with worker processes forked from now on, by reference.

    Returns a :class:`Shared` handle whose pickled form is a reference of
    about 170 bytes, whatever the size of ``obj``. Unpickled in this process,
    or in a worker forked after this call (``multiprocessing.Pool`` with the
    fork context, ``ProcessPoolExecutor`` with ``mp_context=fork``), it is
    ``obj`` itself. Sharing the same object twice gives the same reference and
    one registry entry.

    Workers see ``obj`` as it was when they were forked (copy-on-write). A
    worker forked *before* this call resolves it too, without pickling, when
    ``obj`` was already alive at its fork and could be weakly referenced:
    forkref records, at every fork, weak references to the objects the
    forking thread's variables and module globals hold. A worker that holds
    no copy (spawn or forkserver, or forked before ``obj`` existed) gets it
    through shared memory: the sharing process pickles it once (protocol 5,
    zero-copy buffers) and each such worker maps it read-only. Where neither
    works (the object cannot be pickled, the sharing process is gone, the
    reference is forged or foreign) the worker gets a placeholder that raises
    :class:`forkref.NotInheritedError` (or
    :class:`forkref.SharedMemoryFullError` when the segment directory is full)
    on first use, so the task fails with a clear message and the pool lives.
    """
    if isinstance(obj, Shared):
        return obj
    return Shared(obj)


_UNAVAILABLE_ERROR = "_forkref_error"


class Unavailable:
    """Stands in for a shared object that this process cannot resolve.

    Any use (attribute, operator, call, iteration, pickling) raises the
    error saying why (:class:`~forkref.NotInheritedError`, or a
    :class:`~forkref.SharedMemoryError` when shared memory failed for want of
    room or descriptors); ``repr`` alone is safe so that error reports that
    print arguments still work.
    """

    __slots__ = (_UNAVAILABLE_ERROR,)

    def __init__(self, error: Error) -> None:
        object.__setattr__(self, _UNAVAILABLE_ERROR, error)

    def _forkref_raise(self) -> NoReturn:
        # A fresh exception per use: re-raising the stored one would pile up
        # tracebacks from every use on a single object.
        error = object.__getattribute__(self, _UNAVAILABLE_ERROR)
        raise type(error)(*error.args) from None

    def __getattribute__(self, name: str) -> Any:
        if name == "__class__":
            return Unavailable
        Unavailable._forkref_raise(self)

    def __setattr__(self, name: str, value: Any) -> None:
        Unavailable._forkref_raise(self)

    def __delattr__(self, name: str) -> None:
        Unavailable._forkref_raise(self)

    def __repr__(self) -> str:
        error = object.__getattribute__(self, _UNAVAILABLE_ERROR)
        return f"<forkref.Unavailable: {error}>"


def _raiser(self: Unavailable, *args: object, **kwargs: object) -> NoReturn:
    Unavailable._forkref_raise(self)


# Special methods are looked up on the type, not through __getattribute__, so
# each one that a worker function might hit must raise explicitly.
for _name in (
    "__len__ __iter__ __reversed__ __next__ __contains__ __getitem__ __setitem__ __delitem__ "
    "__call__ __bool__ __hash__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __str__ __bytes__ "
    "__format__ __int__ __float__ __complex__ __index__ __round__ __abs__ __neg__ __pos__ "
    "__invert__ __add__ __sub__ __mul__ __matmul__ __truediv__ __floordiv__ __mod__ "
    "__divmod__ __pow__ __lshift__ __rshift__ __and__ __xor__ __or__ __radd__ __rsub__ "
    "__rmul__ __rmatmul__ __rtruediv__ __rfloordiv__ __rmod__ __rpow__ __rand__ __ror__ "
    "__rxor__ __iadd__ __isub__ __imul__ __enter__ __exit__ __await__ __aiter__ "
    "__reduce__ __reduce_ex__ __getstate__ __copy__ __deepcopy__ __dir__ "
    "__sizeof__ __array__ __fspath__"
).split():
    setattr(Unavailable, _name, _raiser)
del _name


#: Objects handed to this process for the task it is running, by Reference. A
#: worker that holds no registry of the sharing process (a Ray actor: the objects
#: arrive through Ray's object store) sets it around the unpickling of a task.
_SUPPLIED: contextvars.ContextVar[Mapping[Reference, object] | None] = contextvars.ContextVar(
    "forkref_supplied", default=None
)


@contextlib.contextmanager
def supplied(objects: Mapping[Reference, object]) -> Iterator[None]:
    """Within the block, :func:`_resolve` gives ``objects[ref]`` for the references it holds.

    Consulted before the registry: the table is filled by the worker itself
    from what the driver sent with the task, keyed by the whole Reference
    (MAC included), so a task resolves only the references it carried.
    """
    token = _SUPPLIED.set(objects)
    try:
        yield
    finally:
        _SUPPLIED.reset(token)


def _resolve(ref: Reference) -> object:
    """Unpickling hook of a handle: the object, or a placeholder. Never raises."""
    objects = _SUPPLIED.get()
    if objects is not None:
        try:
            return objects[ref]
        except (KeyError, TypeError):  # not carried (or not a Reference): the usual way
            pass
    try:
        return registry().lookup(ref)
    except NotInheritedError as err:
        try:  # not inherited: the sharing process exports it through shared memory
            return _export.fetch(ref, err)
        except Exception as fetch_err:
            return Unavailable(fetch_err if isinstance(fetch_err, Error) else err)
    except Exception as err:  # a mangled token must not kill a stdlib worker
        return Unavailable(
            NotInheritedError(
                f"cannot resolve a forkref reference in this process: it is malformed ({err!r}). "
                "Pass the handle returned by forkref.share() unmodified."
            )
        )
