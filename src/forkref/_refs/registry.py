"""The registry of shared objects, and the reference tokens that name them.

A process that calls ``share()`` registers the object here under a random
16-byte key and hands out a :class:`Reference`: the tree id, the key, the
sharing pid, the type name, the registration's serial, the object's fork
record if it has one, and a MAC (keyed BLAKE2b) over all of them made with a
secret that only this process and its forked descendants know. A worker
forked after the share inherits the registry (copy-on-write, like the rest of
the heap), so it looks the key up and gets the very object the parent
registered. A worker forked *before* the share finds it through the fork
record instead (:mod:`forkref._refs.forkrecord`): proof that the object was alive
at the worker's fork, so the worker holds it too::

    resolve(ref) in a process        registry entry?  -> the object
                                     fork record?     -> this process's copy
                                     neither          -> NotInheritedError saying
                                                         which case it is (the
                                                         caller then tries shared
                                                         memory, see _export)

Why random keys and a MAC rather than ``id(obj)`` or sequential numbers: a
stale address crashes or silently returns another object, and a corrupted
sequential key lands on a neighbouring live entry. Here a reference resolves
only when its MAC verifies under this tree's secret and its key is present;
anything else is a :class:`~forkref.NotInheritedError` saying why.

Non-goals: a reference is not durable storage and not a capability that
outlives its registration; it is valid in the sharing process and in
processes forked from it after the registration, until released.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from forkref._errors import NotInheritedError
from forkref._refs import forkrecord

__all__ = [
    "Reference",
    "Registry",
    "collect_references",
    "pool_worker",
    "registry",
    "set_pool_worker",
]

_KEY_BYTES = 16
_MAC_BYTES = 16
_TREE_BYTES = 8
_RECORD = struct.Struct("<QQ")  # a fork record on the wire: object id, fork token


@dataclass(frozen=True)
class Reference:
    """The wire form of a shared object: what a pickled handle carries.

    Attributes:
        tree: public id of the sharing process tree (a hash of its secret).
        key: random key of the shared object in the registry.
        origin_pid: pid of the process that called ``share()``.
        typename: qualified type name of the object, for error messages.
        mac: keyed BLAKE2b MAC over every other field with the tree's secret.
        serial: the registration's serial in the sharing process (0: unknown).
        record: the object's fork record (its id and the recording fork's
            token, 16 bytes), or empty when no fork recorded it before the share.
        weakrefable: whether the object can be weakly referenced (if not, no
            fork record can cover it).
    """

    tree: bytes
    key: bytes
    origin_pid: int
    typename: str
    mac: bytes
    serial: int = 0
    record: bytes = b""
    weakrefable: bool = True

    def __reduce__(self) -> tuple[Any, ...]:
        # A positional tuple pickles to about half the size of the default
        # dataclass state dict.
        return (
            Reference,
            (
                self.tree,
                self.key,
                self.origin_pid,
                self.typename,
                self.mac,
                self.serial,
                self.record,
                self.weakrefable,
            ),
        )


class _Entry:
    __slots__ = ("count", "obj", "record_seq", "ref", "serial")

    def __init__(self, obj: object, ref: Reference, serial: int, record_seq: int) -> None:
        self.obj = obj
        self.ref = ref
        self.serial = serial
        self.record_seq = record_seq  # 0: no fork record
        self.count = 1


def _typename(obj: object) -> str:
    cls = type(obj)
    # Bounded: the name travels in every pickled reference.
    return f"{cls.__module__}.{cls.__qualname__}"[-120:]


class Registry:
    """Shared objects of this process, keyed by random keys.

    Registrations are counted: ``register`` the same live object twice and it
    takes two ``release`` calls to drop it. Thread-safe, and fork-safe: the
    lock is taken around every ``os.fork()`` so a child never inherits it held.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._secret: bytes | None = None
        self._tree = b""
        self._entries: dict[bytes, _Entry] = {}
        self._by_id: dict[int, bytes] = {}
        self._serial = 0
        self._serial_at_fork = 0  # in a forked child: the last serial it inherited
        self._on_drop: Callable[[Reference, bool], None] | None = None

    # -- sharing side -------------------------------------------------------

    def register(self, obj: object) -> Reference:
        """Register ``obj`` (or count one more registration) and return its reference.

        The reference carries the object's fork record when a fork of this
        process recorded it alive (:func:`forkref._refs.forkrecord.find`): workers
        forked since then resolve it without the registry.
        """
        with self.lock:
            key = self._by_id.get(id(obj))
            if key is not None:
                entry = self._entries[key]
                entry.count += 1
                return entry.ref
            self._ensure_secret()
            self._serial += 1
            found = forkrecord.find(obj)
            ref = self._make_ref(
                secrets.token_bytes(_KEY_BYTES),
                _typename(obj),
                self._serial,
                _RECORD.pack(found.key, found.token) if found else b"",
                forkrecord.weakrefable(obj),
            )
            self._entries[ref.key] = _Entry(obj, ref, self._serial, found.seq if found else 0)
            self._by_id[id(obj)] = ref.key
            return ref

    def release(self, ref: Reference, explicit: bool = False) -> None:
        """Drop one registration of ``ref``; the entry goes with the last one.

        ``explicit``: the caller asked (``Shared.release()``), rather than a
        handle being garbage-collected; the drop listener is told which.
        Releasing an unknown or already dropped reference does nothing.
        """
        with self.lock:
            entry = self._entries.get(ref.key)
            if entry is None or entry.ref != ref:
                return
            entry.count -= 1
            if entry.count > 0:
                return
            del self._entries[ref.key]
            del self._by_id[id(entry.obj)]
            listener = self._on_drop
        # Outside the lock: the listener takes locks of its own, whose holders
        # may be waiting for this one (the export thread looks objects up here).
        if listener is not None:
            listener(ref, explicit)

    def set_drop_listener(self, listener: Callable[[Reference, bool], None] | None) -> None:
        """Call ``listener(ref, explicit)`` whenever a registration is dropped.

        It may run in any thread, including inside a garbage collection, so it
        must not block. The shared-memory exporter uses it to let workers drop
        what the parent released.
        """
        self._on_drop = listener

    def inherited(self, ref: Reference, serial: int, fork_seq: int) -> bool:
        """Whether a child forked after :meth:`last_serial` returned ``serial``, at
        the fork :func:`forkref._refs.forkrecord.last_fork` numbers ``fork_seq``, holds ``ref``.

        True if the object was registered before that fork, or its fork record
        is from that fork or an earlier one (it has lived since, so the child
        has it).

        Raises:
            NotInheritedError: ``ref`` is not registered here.
        """
        entry = self._registered(ref)
        return entry.serial <= serial or 0 < entry.record_seq <= fork_seq

    def _registered(self, ref: Reference) -> _Entry:
        with self.lock:
            entry = self._entries.get(ref.key)
        if entry is None or entry.ref != ref:
            raise NotInheritedError(self.describe(ref, _WHY_RELEASED, _FIX_RELEASED))
        return entry

    def serial(self, ref: Reference) -> int:
        """Registration number of ``ref``: increasing, unique in this process tree branch.

        Raises:
            NotInheritedError: ``ref`` is not registered here.
        """
        entry = self._registered(ref)
        return entry.serial

    def last_serial(self) -> int:
        """Highest serial handed out so far.

        A child forked right after this call inherits every reference whose
        serial is at most the returned value.
        """
        return self._serial

    def __len__(self) -> int:
        return len(self._entries)

    # -- resolving side -----------------------------------------------------

    def has_secret(self) -> bool:
        """Whether this process belongs to a sharing tree (shared, or forked from a sharer)."""
        return self._secret is not None

    def ensure_secret(self) -> None:
        """Make this process the root of a sharing tree, unless it already belongs to one.

        Called before every fork: a child verifies references with the secret
        it inherits, even when the parent shares only after the fork.
        """
        with self.lock:
            self._ensure_secret()

    def verify(self, ref: Reference) -> bool:
        """Whether ``ref`` carries a valid MAC for this process tree."""
        try:
            if self._secret is None or ref.tree != self._tree:
                return False
            return hmac.compare_digest(self._mac_of(ref), ref.mac)
        except (AttributeError, TypeError, ValueError, struct.error, OverflowError):
            return False

    def lookup(self, ref: Reference) -> object:
        """Return the object ``ref`` names: registered here, or inherited through a fork record.

        Raises:
            NotInheritedError: the reference is foreign, corrupted or forged,
                or names an object this process does not hold; the message
                says which (see :meth:`diagnose`).
        """
        if not isinstance(ref, Reference):
            raise NotInheritedError(
                f"cannot resolve {type(ref).__name__!r} as a forkref reference: it is not one. "
                "Pass the handle returned by forkref.share()."
            )
        if self.verify(ref):
            entry = self._entries.get(ref.key)
            if entry is not None and entry.ref == ref:
                return entry.obj
            if ref.origin_pid != os.getpid() and len(ref.record) == _RECORD.size:
                obj = forkrecord.lookup(*_RECORD.unpack(ref.record))
                if obj is not None:
                    return obj
        raise NotInheritedError(self.describe(ref, *self.diagnose(ref)))

    def diagnose(self, ref: Reference) -> tuple[str, str]:
        """Why :meth:`lookup` cannot resolve ``ref`` here, and the fix: two sentences."""
        if self._secret is None:
            return _WHY_NO_TREE, _fix_no_tree()
        if ref.tree != self._tree:
            return _WHY_FOREIGN, _fix_no_tree()
        if not self.verify(ref):
            return _WHY_FORGED, _FIX_FORGED
        if ref.origin_pid == os.getpid():  # the sharer itself: only its registry counts
            return _WHY_RELEASED, _FIX_RELEASED
        if 0 < ref.serial <= self._serial_at_fork:
            return _WHY_RELEASED_BEFORE_FORK, _FIX_RELEASED
        if not ref.weakrefable:
            return _WHY_LATE_NO_WEAKREF.format(typename=ref.typename), _fix_late(False)
        return _WHY_LATE, _fix_late(True)

    def forged_here(self, ref: Reference) -> bool:
        """Whether ``ref`` claims this process's tree but fails its MAC (forged, corrupted)."""
        return self._secret is not None and ref.tree == self._tree and not self.verify(ref)

    @staticmethod
    def describe(ref: Reference, *sentences: str) -> str:
        """A message about resolving ``ref`` here: the subject, then one sentence per idea."""
        typename = getattr(ref, "typename", "?")
        origin = getattr(ref, "origin_pid", "?")
        parts = [
            f"cannot resolve the shared {typename!s:.200} (shared by pid {origin!s:.20}) "
            f"in process {os.getpid()}"
        ]
        parts += [s for s in sentences if s]
        return " ".join(p.rstrip(". ") + "." for p in parts)

    # -- internals ----------------------------------------------------------

    def _make_ref(
        self, key: bytes, name: str, serial: int, record: bytes, weakrefable: bool
    ) -> Reference:
        pid = os.getpid()
        unsigned = Reference(self._tree, key, pid, name, b"", serial, record, weakrefable)
        return Reference(
            self._tree, key, pid, name, self._mac_of(unsigned), serial, record, weakrefable
        )

    def _ensure_secret(self) -> None:
        if self._secret is None:
            self._secret = secrets.token_bytes(32)
            self._tree = hashlib.sha256(b"forkref-tree:" + self._secret).digest()[:_TREE_BYTES]

    def _mac_of(self, ref: Reference) -> bytes:
        assert self._secret is not None
        name = ref.typename.encode("utf-8", "replace")
        # Length-prefixed fields: no two different references encode alike.
        msg = b"".join(
            (
                struct.pack("<B", len(ref.tree)) + ref.tree,
                struct.pack("<B", len(ref.key)) + ref.key,
                struct.pack("<qQ?", ref.origin_pid, ref.serial, bool(ref.weakrefable)),
                struct.pack("<B", len(ref.record)) + ref.record,
                struct.pack("<I", len(name)) + name,
            )
        )
        # Keyed BLAKE2b is a MAC by design and runs in CPython itself: the
        # first HMAC-SHA256 through OpenSSL in a fresh fork costs ~160 us,
        # this ~30 us, and every task's first resolution pays it.
        return hashlib.blake2b(msg, key=self._secret, digest_size=_MAC_BYTES).digest()

    def _before_fork(self) -> None:
        self.lock.acquire()

    def _after_fork_parent(self) -> None:
        self.lock.release()

    def _after_fork_child(self) -> None:
        # The lock was held by the forking thread; in the child that thread is
        # the only one left, so a fresh lock is the consistent state.
        self.lock = threading.RLock()
        self._serial_at_fork = self._serial
        set_pool_worker(None)  # a child is no pool's worker until its worker loop says so


# Messages: one sentence per idea; describe() puts them after the subject.
_WHY_NO_TREE = (
    "This process was not forked from the sharing process (it was started by spawn or "
    "forkserver, or is unrelated), so it holds no copy of the object"
)
_FIX_NO_TREE = (
    "Make the object picklable (shared memory carries it to such processes), or start the "
    "workers with the 'fork' method (multiprocessing.get_context('fork')) or use "
    "forkref.Pool: forked workers get it without pickling."
)
_FIX_NO_TREE_IN_POOL = (
    "Make the object picklable (shared memory carries it to this pool's {method} workers), "
    "or create the pool with the 'fork' start method (forkref's default: leave out its "
    "context/mp_context argument), whose workers get it without pickling."
)
_FIX_NO_TREE_IN_RAY = (
    "Make the object picklable: Ray workers receive shared objects through its object store."
)
_WHY_FOREIGN = (
    "The reference belongs to another process tree: this process was not forked from the "
    "sharing process, so it holds no copy of the object"
)
_WHY_FORGED = "The reference is corrupted or forged (its authentication code does not match)"
_FIX_FORGED = "Pass the handle returned by forkref.share() unmodified."
_WHY_RELEASED = (
    "The sharing process no longer holds it: every handle to it was released or garbage-collected"
)
_WHY_RELEASED_BEFORE_FORK = (
    "It was released in the sharing process before this process was forked, so this "
    "process never inherited it"
)
_FIX_RELEASED = "Keep a handle alive until the tasks that use it have finished."
_WHY_LATE = (
    "It was shared after this process was forked, and no fork record shows this process "
    "holding it: the object did not exist yet at that fork, or was not in a variable of "
    "the forking thread, or this process has dropped it since"
)
_WHY_LATE_NO_WEAKREF = (
    "It was shared after this process was forked, and a {typename} cannot be weakly "
    "referenced, so forkref cannot prove that this process holds the same object"
)
_FIX_LATE = (
    "Create the object before the pool starts its workers (multiprocessing.Pool forks them "
    "in its constructor, ProcessPoolExecutor at the first submit()) and keep it in a "
    "variable of the function that starts the pool, or use forkref.Pool, which forks fresh "
    "workers for late objects."
)
_FIX_LATE_NO_WEAKREF = (
    "Share it before the pool starts its workers, put it in an object of your own class "
    "and share that, or use forkref.Pool, which forks fresh workers for late objects."
)
# Inside a forkref pool's fork worker, a handle that arrived with the task makes the
# pool fork fresh workers that hold it: a late object reached this worker another way.
_FIX_LATE_IN_POOL = (
    "Pass the handle in the task's arguments (or in the function the pool calls): the pool "
    "then forks fresh workers that hold the object. A handle that reaches the worker another "
    "way (a global, a queue, an earlier task's result) gets no such fork."
)
_FIX_LATE_NO_WEAKREF_IN_POOL = (
    "Put it in an object of your own class and share that, then pass the handle in the "
    "task's arguments: the pool forks fresh workers that hold it."
)

#: The forkref pool this process works for: its start method ("fork", "spawn",
#: "forkserver", "ray"), set by forkref's worker loop; None in any other process
#: (the parent, a stdlib pool's worker). Messages fit their advice to it.
_pool_worker: str | None = None


def set_pool_worker(start_method: str | None) -> None:
    """Mark this process as a worker of a forkref pool with ``start_method`` (None: not one)."""
    global _pool_worker
    _pool_worker = start_method or None


def pool_worker() -> str | None:
    """The start method of the forkref pool this process works for, or None."""
    return _pool_worker


def _fix_no_tree() -> str:
    if _pool_worker == "ray":
        return _FIX_NO_TREE_IN_RAY
    if _pool_worker is not None:
        return _FIX_NO_TREE_IN_POOL.format(method=repr(_pool_worker))
    return _FIX_NO_TREE


def _fix_late(weakrefable: bool) -> str:
    if _pool_worker == "fork":
        return _FIX_LATE_IN_POOL if weakrefable else _FIX_LATE_NO_WEAKREF_IN_POOL
    return _FIX_LATE if weakrefable else _FIX_LATE_NO_WEAKREF

_registry: Registry | None = None
_registry_lock = threading.Lock()


def registry() -> Registry:
    """This process's registry, created on first use and inherited through fork."""
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                reg = Registry()
                os.register_at_fork(
                    before=reg._before_fork,
                    after_in_parent=reg._after_fork_parent,
                    after_in_child=reg._after_fork_child,
                )
                _registry = reg
    return _registry


def _prepare_fork() -> None:
    registry().ensure_secret()


# The one fork hook registered at import: the first fork worth recording is
# often made before any forkref call (a multiprocessing.Pool constructor that
# precedes share() in the same function). The registry is made now too, so
# that its own fork hooks run around that first fork.
registry()
forkrecord.install(_prepare_fork)


_collectors = threading.local()


@contextlib.contextmanager
def collect_references() -> Iterator[list[Reference]]:
    """Collect the references of every handle pickled in this thread inside the block.

    A pool wraps the pickling of a task in this to learn which shared objects
    the task refers to. Blocks nest; each sees the references pickled while
    it is the innermost.
    """
    stack: list[list[Reference]] | None = getattr(_collectors, "stack", None)
    if stack is None:
        stack = _collectors.stack = []
    found: list[Reference] = []
    stack.append(found)
    try:
        yield found
    finally:
        stack.pop()


def note_reference(ref: Reference) -> None:
    """Record ``ref`` in the innermost active :func:`collect_references` block, if any."""
    stack: list[list[Reference]] | None = getattr(_collectors, "stack", None)
    if stack:
        stack[-1].append(ref)
