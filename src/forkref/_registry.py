"""The registry of shared objects, and the reference tokens that name them.

A process that calls ``share()`` registers the object here under a random
16-byte key and hands out a :class:`Reference`: the tree id, the key, the
sharing pid, the type name, and a MAC (keyed BLAKE2b) over all of them made with a secret
that only this process and its forked descendants know. A forked worker
inherits the registry (copy-on-write, like the rest of the heap), so it can
look the key up and get the very object the parent registered.

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
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from forkref._errors import NotInheritedError

__all__ = ["Reference", "Registry", "collect_references", "registry"]

_KEY_BYTES = 16
_MAC_BYTES = 16
_TREE_BYTES = 8


@dataclass(frozen=True)
class Reference:
    """The wire form of a shared object: what a pickled handle carries.

    Attributes:
        tree: public id of the sharing process tree (a hash of its secret).
        key: random key of the shared object in the registry.
        origin_pid: pid of the process that called ``share()``.
        typename: qualified type name of the object, for error messages.
        mac: keyed BLAKE2b MAC over the fields above with the tree's secret.
    """

    tree: bytes
    key: bytes
    origin_pid: int
    typename: str
    mac: bytes

    def __reduce__(self) -> tuple[Any, ...]:
        # A positional tuple pickles to about half the size of the default
        # dataclass state dict.
        return (Reference, (self.tree, self.key, self.origin_pid, self.typename, self.mac))


class _Entry:
    __slots__ = ("count", "obj", "ref", "serial")

    def __init__(self, obj: object, ref: Reference, serial: int) -> None:
        self.obj = obj
        self.ref = ref
        self.serial = serial
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

    # -- sharing side -------------------------------------------------------

    def register(self, obj: object) -> Reference:
        """Register ``obj`` (or count one more registration) and return its reference."""
        with self.lock:
            key = self._by_id.get(id(obj))
            if key is not None:
                entry = self._entries[key]
                entry.count += 1
                return entry.ref
            self._ensure_secret()
            key = secrets.token_bytes(_KEY_BYTES)
            pid = os.getpid()
            name = _typename(obj)
            ref = Reference(self._tree, key, pid, name, self._mac(self._tree, key, pid, name))
            self._serial += 1
            self._entries[key] = _Entry(obj, ref, self._serial)
            self._by_id[id(obj)] = key
            return ref

    def release(self, ref: Reference) -> None:
        """Drop one registration of ``ref``; the entry goes with the last one.

        Releasing an unknown or already dropped reference does nothing.
        """
        with self.lock:
            entry = self._entries.get(ref.key)
            if entry is None or entry.ref != ref:
                return
            entry.count -= 1
            if entry.count <= 0:
                del self._entries[ref.key]
                del self._by_id[id(entry.obj)]

    def serial(self, ref: Reference) -> int:
        """Registration number of ``ref``: increasing, unique in this process tree branch.

        Raises:
            NotInheritedError: ``ref`` is not registered here.
        """
        with self.lock:
            entry = self._entries.get(ref.key)
        if entry is None or entry.ref != ref:
            raise self._error(ref, "it is not registered in this process", _FIX_LATE)
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

    def verify(self, ref: Reference) -> bool:
        """Whether ``ref`` carries a valid MAC for this process tree."""
        try:
            if self._secret is None or ref.tree != self._tree:
                return False
            expected = self._mac(ref.tree, ref.key, ref.origin_pid, ref.typename)
            return hmac.compare_digest(expected, ref.mac)
        except (AttributeError, TypeError, ValueError):
            return False

    def lookup(self, ref: Reference) -> object:
        """Return the object ``ref`` names.

        Raises:
            NotInheritedError: the reference is foreign, corrupted or forged,
                or names an object this process did not inherit.
        """
        if not isinstance(ref, Reference):
            raise NotInheritedError(
                f"cannot resolve {type(ref).__name__!r} as a forkref reference: "
                "it is not one; pass the handle returned by forkref.share()"
            )
        if self._secret is None:
            raise self._error(ref, _WHY_NO_TREE, _FIX_NO_TREE)
        if not self.verify(ref):
            if ref.tree != self._tree:
                raise self._error(ref, _WHY_FOREIGN, _FIX_FOREIGN)
            raise self._error(ref, _WHY_FORGED, _FIX_FORGED)
        entry = self._entries.get(ref.key)
        if entry is None or entry.ref != ref:
            raise self._error(ref, _WHY_LATE, _FIX_LATE)
        return entry.obj

    # -- internals ----------------------------------------------------------

    def _ensure_secret(self) -> None:
        if self._secret is None:
            self._secret = secrets.token_bytes(32)
            self._tree = hashlib.sha256(b"forkref-tree:" + self._secret).digest()[:_TREE_BYTES]

    def _mac(self, tree: bytes, key: bytes, pid: int, typename: str) -> bytes:
        assert self._secret is not None
        msg = b"|".join((tree, key, str(pid).encode(), typename.encode("utf-8", "replace")))
        # Keyed BLAKE2b is a MAC by design and runs in CPython itself: the
        # first HMAC-SHA256 through OpenSSL in a fresh fork costs ~160 us,
        # this ~30 us, and every task's first resolution pays it.
        return hashlib.blake2b(msg, key=self._secret, digest_size=_MAC_BYTES).digest()

    @staticmethod
    def _error(ref: Reference, why: str, fix: str) -> NotInheritedError:
        typename = getattr(ref, "typename", "?")
        origin = getattr(ref, "origin_pid", "?")
        return NotInheritedError(
            f"cannot resolve shared {typename!s:.200} (shared by pid {origin!s:.20}) "
            f"in process {os.getpid()}: {why}. {fix}"
        )

    def _before_fork(self) -> None:
        self.lock.acquire()

    def _after_fork_parent(self) -> None:
        self.lock.release()

    def _after_fork_child(self) -> None:
        # The lock was held by the forking thread; in the child that thread is
        # the only one left, so a fresh lock is the consistent state.
        self.lock = threading.RLock()


_WHY_NO_TREE = (
    "this process was not forked from the sharing process (it was started by "
    "spawn or forkserver, or is unrelated), so it does not hold the object"
)
_FIX_NO_TREE = (
    "Use the 'fork' start method (multiprocessing.get_context('fork')) or forkref.Pool, "
    "which forks its workers"
)
_WHY_FOREIGN = "the reference belongs to another process tree"
_FIX_FOREIGN = "Share the object in this process tree and pass that handle instead"
_WHY_FORGED = "the reference is corrupted or forged (its authentication code does not match)"
_FIX_FORGED = "Pass the handle returned by forkref.share() unmodified"
_WHY_LATE = (
    "it was shared after this process was forked, or released before the fork, "
    "so this process never inherited it"
)
_FIX_LATE = (
    "Call forkref.share() before the pool starts its workers (multiprocessing.Pool forks "
    "them in its constructor, ProcessPoolExecutor at the first submit()), keep the handle "
    "alive while tasks use it, or use forkref.Pool, which forks fresh workers for late objects"
)

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
