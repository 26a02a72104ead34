"""Shared memory where fork cannot serve: exports of shared objects, and big results.

**Exports.** A worker that holds no copy of a shared object (a spawn or
forkserver worker, or one forked before the object existed) asks the
sharing process for it. The sharing process pickles the object once into an
unnamed segment and hands the worker its descriptor; the worker maps it
read-only and rebuilds the object zero-copy::

    sharing process P                               worker W
    -----------------                               --------
    Shared.__reduce__ -> ensure_serving(ref)        handle._resolve(ref): registry and fork
      bind + listen "forkref-<tree>-<P>";             record miss -> fetch(ref)
      start the export thread (not inside             before_task() / each fetch: drop what
      deferred(): then at serve_pending())            P released (the board, a shared page)
    export thread (forkref._shm.server)    <------    one kept connection per sharer:
      one selector, every client served              request (the reference's fields,
      MAC + registration checked, same uid            forkref._shm.protocol)
      one export per object, reused     ------->    segment fd (+ board fd): map, rebuild,
      (forkref._shm.store)                          cache by export serial (forkref._shm.client)
    last handle dropped / release() / object died:
      board[slot] = 0 -------------------------->   dropped at the next before_task()

The segment never has a name, so nothing can leak into the segment
directory: the memory goes when the sharing process has closed its
descriptor and every worker has dropped its mapping. An export lives while
its object is registered (a handle is alive); after that it stays *dormant*,
for the next ``share()`` of the same object, while the object lives and a
worker that fetched it is still running, unless ``release()`` was called or
room is needed for another export. Workers drop their copy as soon as the
registration goes. Forged and foreign references stay errors: the sharing
process checks the MAC before it serializes anything, and answers only
processes of its own user; the worker believes only the sharing process
itself (``SO_PEERCRED``), never another process that took its address.

**Results.** ``export_result(obj)`` in a worker writes a big numpy/pandas/arrow
result into a named 0600 segment and returns a small :class:`ResultToken`;
``import_result(token)`` in the parent maps it zero-copy and unlinks the name
at once. A token that dies unimported in the process that received it
unlinks its segment then; a janitor process (see :mod:`forkref._shm.segments`) unlinks names
whose writer and the writer's parent died before any import.

Package API (``export_result``, ``import_result`` and ``ResultToken`` are
also public as ``forkref.*``):

Sharing side, for everyone:
    ensure_serving(ref, start=True) a handle leaves this process: listen, and
                                    start the export thread unless deferred()
    paused() -> context manager     fork inside it: no export thread across the fork
    stats() -> ExportStats          counters, for tests and reports

Sharing side, for forkref's pools (issue 8: no export thread while every
worker inherits what it uses):
    deferred() -> context manager   handles pickled inside it only bind and listen:
                                    wrap the pickling of tasks in it
    listener_fd() -> int | None     the socket to poll for POLLIN while no export
                                    thread runs (None: nothing to poll); re-read
                                    it on every loop, it changes
    serve_pending() -> None         call when that socket is readable: starts the
                                    export thread, which serves from then on

Worker side:
    fetch(ref, err) -> object       resolve through shared memory; raises
                                    NotInheritedError, SharedMemoryError or
                                    SharedMemoryFullError, saying why
    before_task() -> None           call before each task: drops cached objects
                                    the sharer released (cheap: one word read)

Results:
    export_result(obj, threshold=DEFAULT_RESULT_THRESHOLD) -> obj | ResultToken
    import_result(value) -> object  identity for anything but a ResultToken
    ResultToken, DEFAULT_RESULT_THRESHOLD

Fork safety: the export thread holds no lock across a fork, and is not alive
at any fork. A fork hook stops it (and joins it, waiting for an export in
progress) before every ``os.fork()``, the stdlib's included, and the parent
restarts it once ``os.fork()`` has returned (:mod:`forkref._fork.atfork`:
Python 3.13 counts threads after the at-fork hooks), so a child never
inherits a half-finished export and the "multi-threaded ... fork()"
DeprecationWarning of 3.12+ never counts it. forkref's pools fork their
generations inside :func:`paused`, which keeps it stopped throughout. The child
starts with no server, not paused, and closes the inherited descriptors. A
fork from the export thread itself (an exported object whose ``__reduce__``
forks) leaves the thread running: it is the thread that forks. If the thread
ever dies, the next handle pickled in the sharing process starts a new one.

Non-goals and limits: a worker sees the object as it was when first exported
(a snapshot, like fork); the transport is per machine (unix sockets, a
tmpfs), tested on Linux only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from forkref._errors import NotInheritedError
from forkref._fork.atfork import after_fork_returns
from forkref._os import unlink_quietly
from forkref._refs.registry import Reference, registry
from forkref._shm import client, segments, serialize
from forkref._shm.server import Server

__all__ = [
    "DEFAULT_RESULT_THRESHOLD",
    "ExportStats",
    "ResultToken",
    "before_task",
    "deferred",
    "ensure_serving",
    "export_result",
    "fetch",
    "import_result",
    "listener_fd",
    "paused",
    "serve_pending",
    "stats",
]

DEFAULT_RESULT_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class ExportStats:
    """Counters of this process's shared-memory traffic.

    Attributes:
        exports: objects serialized into a segment by this (sharing) process.
        live_exports: of those, segments still held (serving or dormant).
        dormant_exports: of those, segments kept for a later share of their
            object, whose registration is gone.
        served: requests answered with a segment.
        connections: worker connections open to this process's export server.
        fetches: segments this (worker) process mapped and rebuilt.
        cached: objects this (worker) process holds from fetches.
        dropped: fetched objects this (worker) process let go because their
            sharer released them.
    """

    exports: int
    live_exports: int
    dormant_exports: int
    served: int
    connections: int
    fetches: int
    cached: int
    dropped: int


# -- sharing side ------------------------------------------------------------------

_server: Server | None = None
_server_failed_pid = 0
# Held from the before-fork hook to the after-fork hooks: a fork never lands
# in the middle of ensure_serving() or paused() (the child would inherit a
# half-made server, the parent a mixed-up state).
_server_lock = threading.RLock()
_fork_lock_owner = 0  # ident of the thread whose fork holds _server_lock
_hooks_registered = False
_deferring = threading.local()


def ensure_serving(ref: Reference, start: bool = True) -> None:
    """Make sure this process answers export requests for ``ref``.

    Called when a handle is pickled in the process that shared it (a cheap
    check after the first time). Binds the server's socket; starts the
    export thread unless ``start`` is false or the call comes inside
    :func:`deferred` (then :func:`serve_pending` starts it). Elsewhere it
    does nothing: only the sharing process can export. Restarts an export
    thread that died.
    """
    if ref.origin_pid != os.getpid() or _server_failed_pid == ref.origin_pid:
        return
    start = start and not getattr(_deferring, "depth", 0)
    server = _server
    if server is not None and (not start or _paused or server.running()):
        return
    with _server_lock:
        if _server is None:
            _start_server(ref)
        if _server is not None and start:
            _server.wanted = True
            if not _paused and not _server.running():
                _server.start()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Handles pickled in this thread inside the block bind the export socket, no thread.

    For forkref's pools: their fork workers inherit what they use, and an
    export thread would only need pausing at every generation fork. The
    pool's dispatcher polls :func:`listener_fd` and calls
    :func:`serve_pending` when a worker that did not inherit an object knocks.
    """
    _deferring.depth = getattr(_deferring, "depth", 0) + 1
    try:
        yield
    finally:
        _deferring.depth -= 1


def listener_fd() -> int | None:
    """The export socket to poll for readability while no export thread serves it.

    ``None`` when there is nothing to poll: no socket yet, or the export
    thread is (or is meant to be) running and accepts connections itself.
    """
    server = _server
    if server is None or server.wanted or server.wake_r < 0:
        return None
    return server.sock.fileno()


def serve_pending() -> None:
    """A worker knocked on :func:`listener_fd`: start the export thread, which serves
    it and every later request. Inside :func:`paused` it starts when the pause ends."""
    with _server_lock:
        server = _server
        if server is None:
            return
        server.wanted = True
        if not _paused and not server.running():
            server.start()


def _start_server(ref: Reference) -> None:
    global _server, _server_failed_pid
    _register_hooks()
    try:
        server = Server(ref.tree)
    except OSError as err:
        # Pickling the handle must still work: forked workers need no
        # server. Workers that do need one get a NotInheritedError.
        warnings.warn(
            f"forkref cannot serve shared objects to spawn/forkserver workers from "
            f"process {os.getpid()}: opening its unix socket failed ({err}). Only "
            "fork-inherited workers can resolve its handles.",
            RuntimeWarning,
            stacklevel=5,
        )
        _server_failed_pid = ref.origin_pid  # warn once, not per pickled handle
        return
    registry().set_drop_listener(server.on_drop)
    _server = server


def _register_hooks() -> None:
    global _hooks_registered
    if not _hooks_registered:
        _hooks_registered = True
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_parent,
            after_in_child=_after_fork_child,
        )
        atexit.register(_shutdown)


_paused = 0


def _before_fork() -> None:
    global _fork_lock_owner
    server = _server
    # The export thread forking itself must not wait for the lock: another
    # thread may hold it while joining the export thread (a fork of its own).
    if server is None or server.thread is not threading.current_thread():
        _server_lock.acquire()
        _fork_lock_owner = threading.get_ident()
        server = _server
    if server is not None:
        server.stop()


def _after_fork_parent() -> None:
    global _fork_lock_owner
    try:
        # Restarted as soon as os.fork() has returned: a worker may be waiting
        # in the socket's backlog. Not here: Python 3.13 counts the threads
        # after this hook, and would warn about this one (see forkref._fork.atfork).
        server = _server
        if server is not None and server.wanted and not _paused and server.thread is None:
            after_fork_returns(_restart_after_fork)
    finally:
        if _fork_lock_owner == threading.get_ident():
            _fork_lock_owner = 0
            _server_lock.release()


def _restart_after_fork() -> None:
    with _server_lock:
        server = _server
        if server is not None and server.wanted and not _paused and not server.running():
            server.start()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Keep the export thread stopped for a block that forks, restart it after.

    For forkref's pools, which fork a generation and then set it up: the
    thread stays stopped from before the fork until the block ends, instead
    of restarting as soon as ``os.fork()`` returns. Workers asking for an
    export meanwhile wait, and are served on exit.
    A child forked inside the block starts unpaused.
    """
    global _paused
    with _server_lock:
        _paused += 1
        server = _server
        if server is not None:
            server.stop()
    try:
        yield
    finally:
        with _server_lock:
            _paused -= 1
            server = _server
            if not _paused and server is not None and server.wanted and not server.running():
                server.start()


def _after_fork_child() -> None:
    global _server, _server_lock, _paused, _fork_lock_owner, _server_failed_pid
    server, _server = _server, None
    _server_lock = threading.RLock()
    _fork_lock_owner = 0
    _server_failed_pid = 0
    # Inherited from a parent that forked inside paused(): this child has no
    # pause of its own, and its first share must start a thread.
    _paused = 0
    if server is not None:
        registry().set_drop_listener(None)
        server.abandon()


def _shutdown() -> None:
    global _server
    server, _server = _server, None
    if server is not None:
        registry().set_drop_listener(None)
        server.close()


def stats() -> ExportStats:
    """Counters of this process's exports and fetches."""
    server = _server
    sharing = server.counts() if server is not None else {}
    fetching = client.counts()
    return ExportStats(
        exports=sharing.get("exports", 0),
        live_exports=sharing.get("live_exports", 0),
        dormant_exports=sharing.get("dormant_exports", 0),
        served=sharing.get("served", 0),
        connections=sharing.get("connections", 0),
        fetches=fetching["fetches"],
        cached=fetching["cached"],
        dropped=fetching["dropped"],
    )


# -- worker side --------------------------------------------------------------------

before_task = client.before_task


def fetch(ref: Reference, err: NotInheritedError) -> object:
    """Resolve ``ref`` through the sharing process's export; cached per process.

    ``err`` is why this process could not resolve it itself. Raised: ``err``
    itself when shared memory cannot help (a reference this process can
    already tell is forged, or one shared by this very process); otherwise
    :class:`~forkref.NotInheritedError`, :class:`~forkref.SharedMemoryError` or
    :class:`~forkref.SharedMemoryFullError`, whose message gives why this
    process holds no copy, why shared memory could not stand in, and the fix.
    """
    if not isinstance(ref, Reference) or ref.origin_pid == os.getpid():
        raise err
    reg = registry()
    if reg.forged_here(ref):
        raise err  # same tree as the sharer: it would refuse too
    try:
        return client.fetch(ref)
    except client.FetchError as why:
        reason, fix = reg.diagnose(ref)
        raise why.kind(
            reg.describe(
                ref,
                reason,
                f"Shared memory could not stand in: {why.cause}",
                fix if why.fix is None else why.fix,
            )
        ) from None


# -- results -------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ResultToken:
    """A big result left in a named segment; pickles to about 150 bytes.

    The process that unpickles a token owns the segment: if the token dies
    there without :func:`import_result`, its segment is unlinked at once
    (and at that process's exit). Pickling or copying a token hands the
    ownership on to the copy; a token nobody unpickles is left to the janitor,
    which unlinks it when its writer and the writer's parent have died.

    Attributes:
        path: the segment's path (``forkref-r-`` + 32 random hex digits).
        size: segment size in bytes.
        typename: type of the result, for messages.
    """

    __module__ = "forkref"  # pickled by this path: stable across forkref's internals

    path: str
    size: int
    typename: str

    def __repr__(self) -> str:
        return (
            f"<forkref.ResultToken {self.typename}, {self.size / 2**20:,.1f} MiB "
            f"in {self.path}; forkref.import_result() it>"
        )

    def __reduce__(self) -> tuple[object, ...]:
        _disown(self)
        return (_adopt, (self.path, self.size, self.typename))


def _adopt(path: str, size: int, typename: str) -> ResultToken:
    """Unpickle a token; this process now unlinks its segment if it is never imported."""
    token = ResultToken(path, size, typename)
    owner = weakref.finalize(token, _unlink_unimported, path, os.getpid())
    object.__setattr__(token, "_owner", owner)  # frozen: set once, here
    return token


def _disown(token: ResultToken) -> None:
    owner = token.__dict__.get("_owner")
    if isinstance(owner, weakref.finalize):
        owner.detach()


def _unlink_unimported(path: str, owner_pid: int) -> None:
    # A forked child holds copies of its parent's tokens: only the owner unlinks.
    if os.getpid() == owner_pid and os.path.basename(path).startswith(segments.RESULT_PREFIX):
        unlink_quietly(path)


def export_result(obj: object, threshold: int | None = DEFAULT_RESULT_THRESHOLD) -> object:
    """Put a big numpy/pandas/arrow result into shared memory; return a token for it.

    Returns ``obj`` unchanged when it is not one of those types, or smaller
    than ``threshold`` bytes (``None``: never export). The token must reach
    :func:`import_result` in the parent; until then the janitor unlinks it
    if both this process and its parent die.

    Raises:
        SharedMemoryFullError: the segment directory has no room.
    """
    if threshold is None:
        return obj
    nbytes = _result_nbytes(obj)
    if nbytes is None or nbytes < threshold:
        return obj
    what = f"a {type(obj).__module__}.{type(obj).__qualname__} result"
    p = serialize.plan(obj)
    path, fd = segments.create_named(p.size, what)
    try:
        serialize.write(p, fd, what)
    except BaseException:
        unlink_quietly(path)
        raise
    finally:
        os.close(fd)
    return ResultToken(path, p.size, type(obj).__qualname__)


def import_result(value: object) -> object:
    """Map a result exported by :func:`export_result`, zero-copy, and unlink its name.

    Anything that is not a :class:`ResultToken` is returned unchanged. The
    memory is freed when the returned object (and every view of it) dies.

    Raises:
        SharedMemoryError: the segment is gone (imported twice, or its
            writer and the writer's parent died) or is not forkref's.
    """
    if not isinstance(value, ResultToken):
        return value
    what = f"a {value.typename} result"
    fd, size = segments.open_and_unlink(value.path, what)
    _disown(value)  # imported: the name is gone, nothing for the finalizer to do
    try:
        mapping = segments.map_readonly(fd, size)
    finally:
        os.close(fd)
    return serialize.rebuild(mapping)


def _result_nbytes(obj: object) -> int | None:
    """Size of a numpy/pandas/arrow object without pickling it; None for other types."""
    module = type(obj).__module__.split(".", 1)[0]
    if module == "numpy" and hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if module == "pandas" and hasattr(obj, "memory_usage"):
        usage = obj.memory_usage(index=True, deep=False)
        return int(usage.sum()) if hasattr(usage, "sum") else int(usage)
    if module == "pyarrow" and hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    return None
