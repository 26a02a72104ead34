"""Shared memory where fork cannot serve: exports of shared objects, and big results.

**Exports.** A worker that did not inherit a shared object (spawn or
forkserver worker, or forked before the share) asks the sharing process for
it. The sharing process serializes the object once, into an unnamed segment,
and hands the worker a descriptor of it::

    sharing process (pid P, tree T)                 worker
    ---------------------------------               -------------------------------
    Shared.__reduce__ -> ensure_serving(ref)         _handle._resolve(ref)
      starts the export thread, listening on           registry lookup fails
      unix socket  "forkref-<T>-<P>"                   fetch(ref): cached? done
                                                        connect "forkref-<T>-<P>"
                                                        listener is pid P, same uid?
    thread: accept, same uid?  <----- request -------   send the reference fields
      registry().lookup(ref)  (MAC + presence)
      first time: plan + write once into an
      O_TMPFILE segment, keep its fd
      reply {"size": n} + fd (SCM_RIGHTS) ------->      mmap(fd, PROT_READ), close fd
                                                        rebuild zero-copy, cache per ref

The segment never has a name, so nothing can leak into ``/dev/shm``: the
memory goes when the sharing process has closed its descriptor (on
release of the share, within a second, or at its exit, however it dies)
and every worker has dropped its mapping. Forged and foreign references
stay errors: the sharing process checks the MAC before it serializes
anything, and only answers processes of its own user. The worker checks the
other end too (``SO_PEERCRED``): it unpickles only what the sharing process
itself sends, never what another process that took the address after the
sharing process exited sends.

**Results.** ``export_result(obj)`` in a worker writes a big numpy/pandas/arrow
result into a named 0600 segment and returns a small :class:`ResultToken`;
``import_result(token)`` in the parent maps it zero-copy and unlinks the name
at once. A token that dies unimported in the process that received it
unlinks its segment then; a janitor process (see ``_shm``) unlinks names
whose writer and the writer's parent died before any import.

Package API (the pools use these; ``export_result``, ``import_result`` and
``ResultToken`` are also public as ``forkref.*``):
    ensure_serving(ref) -> None     sharing side; cheap when already serving
    fetch(ref, err) -> object       worker side; raises NotInheritedError only
    export_result(obj, threshold=DEFAULT_RESULT_THRESHOLD) -> obj | ResultToken
    import_result(value) -> object  identity for anything but a ResultToken
    ResultToken, DEFAULT_RESULT_THRESHOLD
    stats() -> ExportStats          counters, for tests and reports
    paused() -> context manager     fork inside it: no export thread across the fork

Fork safety: the export thread holds no lock across a fork. A fork hook stops
it (and joins it, waiting for an export in progress) before every
``os.fork()`` and restarts it in the parent afterwards, so a child never
inherits a half-finished export and 3.12's "multi-threaded ... fork()"
DeprecationWarning does not count it. Python 3.13 counts threads after the
at-fork hooks, so forkref's pools fork inside :func:`paused`. The child
starts with no server, not paused, and closes the inherited descriptors. A
fork from the export thread itself (an exported object whose ``__reduce__``
forks) leaves the thread running: it is the thread that forks. If the thread
ever dies, the next handle pickled in the sharing process starts a new one.

Non-goals and limits: a worker sees the object as it was when first exported
(a snapshot, like fork); a worker keeps what it fetched until it exits (its
cache is not told about releases); the transport is per machine (unix
sockets, a tmpfs), tested on Linux only.
"""

from __future__ import annotations

import array
import atexit
import contextlib
import json
import os
import select
import socket
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from forkref import _serialize, _shm
from forkref._errors import Error, NotInheritedError, SharedMemoryError
from forkref._registry import Reference, registry

__all__ = [
    "DEFAULT_RESULT_THRESHOLD",
    "ExportStats",
    "ResultToken",
    "ensure_serving",
    "export_result",
    "fetch",
    "import_result",
    "paused",
    "stats",
]

DEFAULT_RESULT_THRESHOLD = 1 << 20
_REQUEST_LIMIT = 4096
_REQUEST_TIMEOUT = 5.0  # a client that connects must send its request promptly
_REPLY_TIMEOUT = 600.0  # serializing a huge object takes a while; death gives EOF
_REPLY_LIMIT = 1 << 16  # a reply is one short JSON line
_PRUNE_INTERVAL = 1.0  # how soon an export of a released share is dropped


@dataclass(frozen=True)
class ExportStats:
    """Counters of this process's shared-memory traffic.

    Attributes:
        exports: objects serialized into a segment by this (sharing) process.
        live_exports: of those, segments still held (not yet pruned).
        served: requests answered with a segment.
        fetches: segments this (worker) process attached and rebuilt.
    """

    exports: int
    live_exports: int
    served: int
    fetches: int


def _address(tree: bytes, pid: int) -> str:
    name = f"forkref-{tree.hex()}-{pid}"
    if sys.platform.startswith("linux"):
        return "\0" + name  # abstract namespace: no file to clean up
    return os.path.join(_private_dir(), name)


def _private_dir() -> str:
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"forkref-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


# -- sharing side: the export server -------------------------------------------


class _Export:
    __slots__ = ("fd", "ref", "size")

    def __init__(self, ref: Reference, fd: int, size: int) -> None:
        self.ref, self.fd, self.size = ref, fd, size


class _Server:
    """Listening socket, export thread and the exports of one sharing process."""

    def __init__(self, tree: bytes) -> None:
        self.address = _address(tree, os.getpid())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.address)
        self.sock.listen(64)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.exports: dict[Reference, _Export] = {}
        self.thread: threading.Thread | None = None
        self.exported = self.served = 0

    def running(self) -> bool:
        """Whether the export thread is alive (not stopped, not dead)."""
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        """Start the export thread (again: it replaces one that was stopped or died)."""
        self.thread = threading.Thread(target=self._loop, name="forkref-export", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop and join the thread; the socket and exports stay. Idempotent."""
        thread = self.thread
        if thread is None or thread is threading.current_thread():
            # The export thread itself forks (an exported object's __reduce__
            # forks): it cannot join itself, and as the forking thread it is
            # the child's only thread anyway. It keeps serving.
            return
        if thread.is_alive():
            os.write(self.wake_w, b"x")
            thread.join()
            _wait_os_thread_gone(thread.native_id)
        # Cleared only now: until joined, _before_fork must still recognize
        # the export thread (a fork from it must not wait for _server_lock).
        self.thread = None
        _drain(self.wake_r)

    def close(self) -> None:
        """Stop, close the socket and drop every export. Idempotent."""
        self.stop()
        for fd in (self.wake_r, self.wake_w):
            _close_quietly(fd)
        self.wake_r = self.wake_w = -1
        self.sock.close()
        if not self.address.startswith("\0"):
            _unlink_quietly(self.address)
        for export in self.exports.values():
            _close_quietly(export.fd)
        self.exports.clear()

    def _loop(self) -> None:
        while self.wake_r >= 0:  # closed in a child forked from this very thread
            timeout = _PRUNE_INTERVAL if self.exports else None
            ready = select.select([self.sock.fileno(), self.wake_r], [], [], timeout)[0]
            if self.wake_r in ready:
                # Consumed here, so a stray byte cannot stop the next thread.
                _drain(self.wake_r)
                return
            self._prune()
            if self.sock.fileno() in ready:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    continue
                with conn:
                    self._answer(conn)

    def _prune(self) -> None:
        # Drop exports whose share was released: the registry no longer has
        # them. Workers keep their mappings; the memory goes with the last.
        reg = registry()
        for ref, export in list(self.exports.items()):
            try:
                reg.lookup(ref)
            except NotInheritedError:
                del self.exports[ref]
                _close_quietly(export.fd)

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_REQUEST_TIMEOUT)
            _check_peer(conn)
            ref = _parse_request(_recv_line(conn))
            export = self._export(ref)
        except Error as err:
            _send(conn, {"error": str(err)})
        except BaseException as err:  # the thread must survive any request, even SystemExit
            _send(conn, {"error": f"the sharing process {os.getpid()} failed to export: {err!r}"})
        else:
            if _send(conn, {"size": export.size}, export.fd):
                self.served += 1

    def _export(self, ref: Reference) -> _Export:
        obj = registry().lookup(ref)  # raises NotInheritedError: forged, foreign, released
        export = self.exports.get(ref)
        if export is None:
            export = self.exports[ref] = _write_export(ref, obj)
            self.exported += 1
        return export


def _write_export(ref: Reference, obj: object) -> _Export:
    what = f"the shared {ref.typename}"
    try:
        p = _serialize.plan(obj)
    except Exception as err:
        raise SharedMemoryError(
            f"cannot export {what} to a worker that did not inherit it: pickling failed "
            f"({err!r}). Make it picklable, or use fork-inherited workers "
            "(the 'fork' start method or forkref.Pool)"
        ) from err
    fd = _shm.create_anonymous(p.size, what)
    try:
        _serialize.write(p, fd, what)
    except BaseException:
        os.close(fd)
        raise
    return _Export(ref, fd, p.size)


def _wait_os_thread_gone(native_id: int | None, limit: float = 1.0) -> None:
    """Wait (briefly) until the kernel thread behind a joined Thread has exited.

    ``join()`` returns when the Python thread is done, a moment before its
    OS thread exits (always on 3.13, often on 3.12). A fork in that moment
    counts two threads and 3.12+ warns "multi-threaded ... fork() may lead to
    deadlocks" because of a thread that is already finished.
    """
    task = f"/proc/self/task/{native_id}"
    if native_id is None or not os.path.exists("/proc/self/task"):
        return
    deadline = time.monotonic() + limit
    while os.path.exists(task) and time.monotonic() < deadline:
        time.sleep(0.0001)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 64):
            pass


def _peer(conn: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end; None where the OS cannot tell."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # not Linux: the socket lives in a 0700 directory instead
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def _check_peer(conn: socket.socket) -> None:
    peer = _peer(conn)
    if peer is not None and peer[1] != os.getuid():
        raise NotInheritedError(
            f"refusing to export to pid {peer[0]} (uid {peer[1]}): not this process's user "
            f"(uid {os.getuid()}). Run the workers as the user that shares the object"
        )


def _recv_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(_REQUEST_LIMIT)
        if not chunk or len(data) + len(chunk) > _REQUEST_LIMIT:
            raise NotInheritedError("malformed export request: truncated or too long")
        data += chunk
    return data


def _parse_request(line: bytes) -> Reference:
    # Plain JSON, never pickle: the request comes from another process.
    try:
        msg = json.loads(line)
        return Reference(
            bytes.fromhex(msg["tree"]),
            bytes.fromhex(msg["key"]),
            int(msg["pid"]),
            str(msg["typename"]),
            bytes.fromhex(msg["mac"]),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise NotInheritedError(f"malformed export request ({err!r})") from err


def _send(conn: socket.socket, msg: dict[str, object], fd: int | None = None) -> bool:
    data = json.dumps(msg).encode() + b"\n"
    try:
        socket.send_fds(conn, [data], [fd] if fd is not None else [])
    except OSError:
        return False  # the worker went away; nothing to do
    return True


_server: _Server | None = None
_server_failed_pid = 0
# Held from the before-fork hook to the after-fork hooks: a fork never lands
# in the middle of ensure_serving() or paused() (the child would inherit a
# half-made server, the parent a mixed-up state).
_server_lock = threading.RLock()
_fork_lock_owner = 0  # ident of the thread whose fork holds _server_lock
_hooks_registered = False


def ensure_serving(ref: Reference) -> None:
    """Make sure this process answers export requests for ``ref``.

    Called when a handle is pickled in the process that shared it (a cheap
    check after the first time). Elsewhere it does nothing: only the sharing
    process can export. Restarts an export thread that died.
    """
    if ref.origin_pid != os.getpid() or _server_failed_pid == ref.origin_pid:
        return
    server = _server
    if server is not None and (_paused or server.running()):
        return
    with _server_lock:
        if _server is None:
            _start_server(ref)
        elif not _paused and not _server.running():
            _server.start()


def _start_server(ref: Reference) -> None:
    global _server, _server_failed_pid
    _register_hooks()
    try:
        server = _Server(ref.tree)
    except OSError as err:
        # Pickling the handle must still work: forked workers need no
        # server. Workers that do need one get a NotInheritedError.
        warnings.warn(
            f"forkref cannot serve shared objects to spawn/forkserver workers from "
            f"process {os.getpid()}: opening its unix socket failed ({err}); only "
            "fork-inherited workers can resolve its handles",
            RuntimeWarning,
            stacklevel=4,
        )
        _server_failed_pid = ref.origin_pid  # warn once, not per pickled handle
        return
    if not _paused:
        server.start()
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


_was_running = False
_paused = 0


def _before_fork() -> None:
    global _was_running, _fork_lock_owner
    server = _server
    # The export thread forking itself must not wait for the lock: another
    # thread may hold it while joining the export thread (a fork of its own).
    if server is None or server.thread is not threading.current_thread():
        _server_lock.acquire()
        _fork_lock_owner = threading.get_ident()
        server = _server
    _was_running = server is not None and server.thread is not None
    if server is not None:
        server.stop()


def _after_fork_parent() -> None:
    global _fork_lock_owner
    try:
        # Restarted at once: a worker may be waiting in the socket's backlog.
        # (3.13 counts threads after this hook, so it may warn about this one;
        # forkref's own pools fork inside paused() instead.)
        server = _server
        if _was_running and not _paused and server is not None and server.thread is None:
            server.start()
    finally:
        if _fork_lock_owner == threading.get_ident():
            _fork_lock_owner = 0
            _server_lock.release()


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Keep the export thread stopped for a block that forks, restart it after.

    For forkref's pools: the at-fork hooks restart the thread inside
    ``os.fork()``, where Python 3.13 counts it and warns "multi-threaded ...
    fork() may lead to deadlocks"; forking inside this block does not.
    Workers asking for an export meanwhile wait, and are served on exit.
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
            if not _paused and server is not None and not server.running():
                server.start()


def _after_fork_child() -> None:
    global _server, _server_lock, _client_lock, _paused, _was_running, _fork_lock_owner
    server, _server = _server, None
    _server_lock = threading.RLock()
    _fork_lock_owner = 0
    _client_lock = threading.RLock()
    # Inherited from a parent that forked inside paused(): this child has no
    # pause of its own, and its first share must start a thread.
    _paused = 0
    _was_running = False
    if server is not None:
        # The parent owns the address and the exports; the child drops its
        # copies of the descriptors (the parent's stay open).
        server.close()


def _shutdown() -> None:
    global _server
    server, _server = _server, None
    if server is not None:
        server.close()


# -- worker side: fetch and cache ----------------------------------------------

_cache: dict[Reference, object] = {}
# Reentrant: rebuilding an object may resolve handles nested inside it.
_client_lock = threading.RLock()
_fetches = 0


def fetch(ref: Reference, err: NotInheritedError) -> object:
    """Resolve ``ref`` through the sharing process's export; cached per process.

    ``err`` is why the registry could not resolve it. Only
    :class:`NotInheritedError` escapes (``err`` itself when shared memory
    cannot help: a reference that this process can already tell is forged or
    foreign, or one shared by this very process).
    """
    if not isinstance(ref, Reference) or ref.origin_pid == os.getpid():
        raise err
    reg = registry()
    if reg.has_secret() and not reg.verify(ref):
        raise err  # same tree knowledge as the sharer: it would refuse too
    _register_hooks()
    with _client_lock:
        if ref in _cache:
            return _cache[ref]
        try:
            obj = _fetch_uncached(ref)
        except NotInheritedError as fetch_err:
            # Keep why fork inheritance failed, then why shared memory did.
            raise NotInheritedError(
                f"{err} Shared memory could not stand in either: {fetch_err}"
            ) from fetch_err
        _cache[ref] = obj
        return obj


def _fetch_uncached(ref: Reference) -> object:
    global _fetches
    where = f"shared {ref.typename} (shared by pid {ref.origin_pid})"
    try:
        fd, size = _request(ref)
    except NotInheritedError:
        raise
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        raise NotInheritedError(
            f"cannot resolve {where} in process {os.getpid()}: no process of its tree "
            "serves it, so the sharing process has exited, or the reference belongs to "
            "another process tree. Keep the sharing process alive while its workers run, "
            "and pass handles only to workers of the process that shared them"
        ) from exc
    except Exception as exc:
        raise NotInheritedError(
            f"cannot resolve {where} in process {os.getpid()}: the sharing process did not "
            f"answer ({exc!r}); it has probably exited. Keep the sharing process alive while "
            "its workers run"
        ) from exc
    try:
        mapping = _shm.map_readonly(fd, size)
    except (OSError, ValueError) as exc:
        raise NotInheritedError(f"cannot map the segment of {where}: {exc}") from exc
    finally:
        os.close(fd)
    try:
        obj = _serialize.rebuild(mapping)
    except Exception as exc:
        raise NotInheritedError(f"cannot rebuild {where} from shared memory: {exc!r}") from exc
    _fetches += 1
    return obj


def _request(ref: Reference) -> tuple[int, int]:
    request = {
        "tree": ref.tree.hex(),
        "key": ref.key.hex(),
        "pid": ref.origin_pid,
        "typename": ref.typename,
        "mac": ref.mac.hex(),
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_REPLY_TIMEOUT)
        sock.connect(_address(ref.tree, ref.origin_pid))
        _check_server(sock, ref)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data, fds = _recv_reply(sock)
    return _parse_reply(data, fds)


def _check_server(sock: socket.socket, ref: Reference) -> None:
    # Anyone can bind an abstract address once its owner has exited, and what
    # comes back is unpickled: only the sharing process itself is believed.
    peer = _peer(sock)
    if peer is not None and (peer[0] != ref.origin_pid or peer[1] != os.getuid()):
        raise NotInheritedError(
            f"refusing the answer on the address of pid {ref.origin_pid}: the process "
            f"listening there is pid {peer[0]} (uid {peer[1]}), not the sharing process "
            f"(pid {ref.origin_pid}, uid {os.getuid()}), so the sharing process no longer "
            "serves it. Keep the sharing process alive while its workers run"
        )


def _recv_reply(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Read the reply line and any descriptors sent with it (close-on-exec)."""
    data, fds = b"", list[int]()
    # socket.recv_fds() takes no flags: recvmsg with MSG_CMSG_CLOEXEC makes
    # the received descriptor close-on-exec atomically.
    cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    try:
        while not data.endswith(b"\n") and len(data) <= _REPLY_LIMIT:
            chunk, ancdata, _, _ = sock.recvmsg(_REPLY_LIMIT, socket.CMSG_SPACE(16), cloexec)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:usable]))
            if not chunk:
                break
            data += chunk
        if not cloexec:
            for fd in fds:
                os.set_inheritable(fd, False)
    except BaseException:
        _close_all(fds)
        raise
    return data, fds


def _parse_reply(data: bytes, fds: list[int]) -> tuple[int, int]:
    """The segment descriptor and size of a reply; its descriptors closed on error."""
    try:
        if not data.endswith(b"\n"):
            raise NotInheritedError("the sharing process sent a truncated reply")
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise TypeError(f"expected a JSON object, got {type(msg).__name__}")
        if "error" in msg:
            raise NotInheritedError(str(msg["error"]))
        if len(fds) != 1:
            raise NotInheritedError(f"the reply carried {len(fds)} segments, not one")
        return fds[0], int(msg["size"])
    except NotInheritedError:
        _close_all(fds)
        raise
    except (ValueError, KeyError, TypeError) as err:
        _close_all(fds)
        raise NotInheritedError(f"the sharing process sent a malformed reply ({err!r})") from err


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close_quietly(fd)


def stats() -> ExportStats:
    """Counters of this process's exports and fetches."""
    server = _server
    return ExportStats(
        exports=server.exported if server else 0,
        live_exports=len(server.exports) if server else 0,
        served=server.served if server else 0,
        fetches=_fetches,
    )


# -- results -------------------------------------------------------------------


@dataclass(frozen=True)
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
    if os.getpid() == owner_pid and os.path.basename(path).startswith(_shm.RESULT_PREFIX):
        _unlink_quietly(path)


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
    p = _serialize.plan(obj)
    path, fd = _shm.create_named(p.size, what)
    try:
        _serialize.write(p, fd, what)
    except BaseException:
        _unlink_quietly(path)
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
    fd, size = _shm.open_and_unlink(value.path, what)
    _disown(value)  # imported: the name is gone, nothing for the finalizer to do
    try:
        mapping = _shm.map_readonly(fd, size)
    finally:
        os.close(fd)
    return _serialize.rebuild(mapping)


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


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
