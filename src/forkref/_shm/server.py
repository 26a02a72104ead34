"""The sharing side of the shared-memory route: one export server per sharing process.

How data flows (the worker side is :mod:`forkref._shm.client`)::

    sharing process P                                         worker W (one connection, kept)
    -----------------                                         -------------------------------
    ensure_serving(ref): bind + listen on the abstract
      unix address "forkref-<tree>-<P>"; the export thread
      starts now, or at serve_pending() (forkref's pools)
    export thread: one selector over the listening socket     connect: is the peer P, same uid?
      and every connection: an idle or slow client never
      holds up another                                  <---- request line (JSON reference)
      same uid? registry().lookup(ref): MAC, registered?
      an export of this very object? (weakref: the object,
        not the reference, so inline share(x) in every
        map() reuses it) else pickle once into an
        unnamed segment and take a slot on the board
      reply {"size","serial","slot"} + segment fd
        (+ the board's fd, once per connection) ---------->  map it, rebuild, cache by serial
    the registry drops the last registration of the
      object (listener), or the object dies (weakref):
      board[slot] = 0; board[0] += 1  ======== shared page ======> before_task(): board[0] changed?
      explicit release(), object gone, or no worker                 drop cached objects whose
      that fetched it is left: close the segment fd                 board[slot] != their serial
      otherwise dormant: kept for the next share of the object
    W exits: its connection closes: dormant exports that only it
      had fetched are freed (the pool closed)

**The board** is one unnamed page-backed segment per sharing process, mapped
read-write here and read-only by workers: word 0 counts withdrawals, word
``slot`` holds the serial of the export using that slot (0: withdrawn). A
worker compares one word per task, and looks at its entries only when it
changed. ``_BOARD_SLOTS`` exports can be live at once; beyond that an export
gets slot 0, and workers keep it until they exit.

**Locking.** The export thread owns the state and changes it under
``_Server.lock`` (a plain lock). The registry's drop listener and weakref
callbacks may run in any thread, even inside a garbage collection in the
thread that holds the lock, so they never wait: they queue their event and
process the queue only if the lock is free; whoever holds it processes the
queue before letting go.

Non-goals: no flow control beyond one reply per request; no eviction of
exports that are in use; exports are per machine (unix sockets, a tmpfs).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import mmap
import os
import selectors
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

from forkref._errors import Error, NotInheritedError, SharedMemoryError, SharedMemoryFullError
from forkref._refs.registry import Reference, registry
from forkref._shm import segments, serialize, warm

__all__ = ["BOARD_BYTES", "Server", "address", "check_peer", "parse_request", "peer"]

_BOARD_SLOTS = 32767
BOARD_BYTES = (1 + _BOARD_SLOTS) * 8  # a tmpfs file: only the pages written take room
REQUEST_LIMIT = 4096
_PARTIAL_REQUEST_SECONDS = 5.0  # a connection holding half a request this long is dropped
_MAX_CONNECTIONS = 4096


def address(tree: bytes, pid: int) -> str:
    """The socket address of the export server of process ``pid`` in tree ``tree``."""
    name = f"forkref-{tree.hex()}-{pid}"
    if sys.platform.startswith("linux"):
        return "\0" + name  # abstract namespace: no file to clean up
    return os.path.join(_private_dir(), name)


def _private_dir() -> str:
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"forkref-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def peer(conn: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end; None where the OS cannot tell."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # not Linux: the socket lives in a 0700 directory instead
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def check_peer(conn: socket.socket) -> None:
    """Refuse a client of another user (the object would cross a user boundary)."""
    found = peer(conn)
    if found is not None and found[1] != os.getuid():
        raise NotInheritedError(
            f"refusing to export to pid {found[0]} (uid {found[1]}): it runs as another user "
            f"than the sharing process (uid {os.getuid()}). Run the workers as the user "
            "that shares the object."
        )


def parse_request(line: bytes) -> Reference:
    """The reference in a request line. Plain JSON, never pickle: it comes from another process."""
    try:
        msg = json.loads(line)
        return Reference(
            bytes.fromhex(msg["tree"]),
            bytes.fromhex(msg["key"]),
            int(msg["pid"]),
            str(msg["typename"]),
            bytes.fromhex(msg["mac"]),
            int(msg.get("serial", 0)),
            bytes.fromhex(msg.get("record", "")),
            bool(msg.get("weakrefable", True)),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise NotInheritedError(f"malformed export request ({err!r}).") from err


def request_line(ref: Reference) -> bytes:
    """The request for ``ref``, as a worker sends it."""
    msg = {
        "tree": ref.tree.hex(),
        "key": ref.key.hex(),
        "pid": ref.origin_pid,
        "typename": ref.typename,
        "mac": ref.mac.hex(),
        "serial": ref.serial,
        "record": ref.record.hex(),
        "weakrefable": ref.weakrefable,
    }
    return json.dumps(msg).encode() + b"\n"


# -- the board ---------------------------------------------------------------------


class _Board:
    """The page workers read to learn which exports are still live (the sharing side)."""

    def __init__(self) -> None:
        self.fd = _board_fd()
        try:
            self.map = mmap.mmap(self.fd, BOARD_BYTES, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self.words = memoryview(self.map).cast("Q")
        self.free: list[int] = []
        self.next = 1

    def take(self) -> int:
        """A free slot, or 0 (untracked) when all are taken."""
        if self.free:
            return self.free.pop()
        if self.next > _BOARD_SLOTS:
            return 0
        self.next += 1
        return self.next - 1

    def publish(self, slot: int, serial: int) -> None:
        if slot:
            self.words[slot] = serial

    def withdraw(self, slot: int) -> None:
        """Mark the slot's export gone; workers see the counter move. Order matters:
        a worker reads the counter, then the slots."""
        if slot and self.words[slot]:
            self.words[slot] = 0
            self.words[0] = (self.words[0] + 1) & 0xFFFFFFFFFFFFFFFF

    def give_back(self, slot: int) -> None:
        if slot:
            self.free.append(slot)

    def close(self) -> None:
        self.words.release()
        self.map.close()
        _close_quietly(self.fd)


def _board_fd() -> int:
    """A descriptor for the board: a memfd where there is one, else a segment.

    Not a file of the segment directory: the board is control state that
    lives as long as the server, and must neither pin that directory (a tmpfs
    could not be unmounted) nor fail when it is full.
    """
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("forkref-board", os.MFD_CLOEXEC)
        except OSError:
            pass
        else:
            try:
                os.ftruncate(fd, BOARD_BYTES)
            except BaseException:
                os.close(fd)
                raise
            return fd
    return segments.create_anonymous(BOARD_BYTES, "forkref's export board")


# -- exports and connections ---------------------------------------------------------


class _Export:
    """One object serialized into one segment (of the warm store: ``fd`` is what workers get)."""

    __slots__ = ("fd", "holders", "key", "ref", "seg", "serial", "size", "slot", "weak")

    def __init__(self, seg: warm.Segment, key: int, weak: weakref.ref[Any] | None) -> None:
        self.seg, self.fd, self.size, self.key, self.weak = seg, seg.ro_fd, seg.size, key, weak
        self.ref: Reference | None = None  # the registration it serves; None: dormant
        self.serial = 0
        self.slot = 0
        self.holders: set[int] = set()  # connections (fds) that received it


class _Conn:
    """A worker's connection: its half-read request and what it was sent."""

    __slots__ = ("board_sent", "buf", "fd", "held", "pid", "since", "sock")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.fd, self.pid = sock, sock.fileno(), pid
        self.buf = b""
        self.since = 0.0  # when the pending partial request began
        self.held: set[_Export] = set()  # exports sent on this connection
        self.board_sent = False


class Server:
    """Listening socket, export thread, exports and board of one sharing process."""

    def __init__(self, tree: bytes) -> None:
        self.address = address(tree, os.getpid())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.address)
            self.sock.listen(128)
            self.sock.setblocking(False)
            self.wake_r, self.wake_w = os.pipe()
        except BaseException:
            self.sock.close()
            raise
        os.set_blocking(self.wake_r, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.lock = threading.Lock()
        self.pending: collections.deque[tuple[str, Any, bool]] = collections.deque()
        self.by_ref: dict[Reference, _Export] = {}
        self.by_object: dict[int, _Export] = {}
        self.by_serial: dict[int, _Export] = {}
        self.conns: dict[int, _Conn] = {}
        self.board: _Board | None = None
        self.store = warm.WarmStore()  # segments of freed exports, kept for the next ones
        self.serials = itertools.count(1)
        self.thread: threading.Thread | None = None
        self.wanted = False  # the thread should run (restarted after forks and pauses)
        self.exported = self.served = 0

    # -- thread control (the callers hold _export's server lock) ---------------------

    def running(self) -> bool:
        """Whether the export thread is alive (not stopped, not dead)."""
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        """Start the export thread (again: it replaces one that was stopped or died)."""
        self.wanted = True
        self.thread = threading.Thread(target=self._loop, name="forkref-export", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop and join the thread; socket, connections and exports stay. Idempotent."""
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
        # Cleared only now: until joined, the fork hook must still recognize
        # the export thread (a fork from it must not wait for the server lock).
        self.thread = None
        _drain(self.wake_r)

    def close(self) -> None:
        """Stop, close every socket and drop every export. Idempotent."""
        self.stop()
        with self.lock:
            for conn in list(self.conns.values()):
                self._forget_conn(conn)
            for export in list(self.by_serial.values()) + list(self.by_object.values()):
                self._free(export)
            if self.board is not None:
                self.board.close()
                self.board = None
        self.store.clear()
        self._close_fds()

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors, change nothing shared.

        The parent owns the address, the exports and the board. The selector's
        epoll instance is shared with the parent: closing the child's
        descriptor is all that may happen to it (no unregister).
        """
        for conn in self.conns.values():
            _close_quietly(conn.fd)
        for export in {*self.by_serial.values(), *self.by_object.values()}:
            export.seg.close()
        self.store.abandon()
        if self.board is not None:
            with contextlib.suppress(Exception):
                self.board.words.release()
                self.board.map.close()
            _close_quietly(self.board.fd)
        self.conns, self.by_ref, self.by_object, self.by_serial = {}, {}, {}, {}
        self.board = None
        self._close_fds()

    def _close_fds(self) -> None:
        with contextlib.suppress(Exception):
            self.sel.close()
        for fd in (self.wake_r, self.wake_w):
            _close_quietly(fd)
        self.wake_r = self.wake_w = -1
        self.sock.close()
        if not self.address.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    # -- the loop ----------------------------------------------------------------------

    def _loop(self) -> None:
        while self.wake_r >= 0:  # closed in a child forked from this very thread
            for key, _ in self.sel.select(self._timeout()):
                if key.fileobj == self.wake_r:
                    # Consumed here, so a stray byte cannot stop the next thread.
                    _drain(self.wake_r)
                    return
                if key.fileobj is self.sock:
                    self._accept()
                else:
                    self._readable(key.data)
            self._expire_partial_requests()
            self.process_pending()

    def _timeout(self) -> float | None:
        # The store trims itself when idle: wake when a parked segment is due, and,
        # while workers are connected (the only time anything is parked), at least
        # every IDLE_SECONDS, since segments are parked from other threads too.
        trim = self.store.trim_idle()
        if trim is None and self.conns:
            trim = warm.IDLE_SECONDS
        waiting = [c.since for c in self.conns.values() if c.buf]
        if not waiting:
            return trim
        partial = max(0.0, min(waiting) + _PARTIAL_REQUEST_SECONDS - time.monotonic())
        return partial if trim is None else min(partial, trim)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE and friends: the client sees its connection refused
            found = peer(sock)
            conn = _Conn(sock, found[0] if found else 0)
            try:
                check_peer(sock)
                if len(self.conns) >= _MAX_CONNECTIONS:
                    raise NotInheritedError(
                        f"the sharing process {os.getpid()} serves {_MAX_CONNECTIONS} "
                        "workers already. Use fewer worker processes."
                    )
            except NotInheritedError as err:
                sock.setblocking(False)
                self._send(conn, _error_reply(err))
                sock.close()
                continue
            sock.setblocking(False)
            self.conns[conn.fd] = conn
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(REQUEST_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the worker exited, or closed its end
            self._drop_conn(conn)
            return
        if not conn.buf:
            conn.since = time.monotonic()
        conn.buf += chunk
        while b"\n" in conn.buf and conn.fd in self.conns:
            line, conn.buf = conn.buf.split(b"\n", 1)
            conn.since = time.monotonic()
            self._answer(conn, line)
        if len(conn.buf) > REQUEST_LIMIT and conn.fd in self.conns:
            self._send(conn, _error_reply(NotInheritedError("malformed export request: too long.")))
            self._drop_conn(conn)

    def _expire_partial_requests(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns.values()):
            if conn.buf and now - conn.since > _PARTIAL_REQUEST_SECONDS:
                self._drop_conn(conn)

    def _answer(self, conn: _Conn, line: bytes) -> None:
        try:
            export, board_fd = self._serve(conn, parse_request(line))
        except Error as err:
            reply, fds = _error_reply(err), list[int]()
        except BaseException as err:  # the thread must survive any request, even SystemExit
            reply = {
                "error": f"the sharing process {os.getpid()} failed to export it ({err!r})",
                "type": "NotInheritedError",
            }
            fds = []
        else:
            reply = {
                "size": export.size,
                "serial": export.serial,
                "slot": export.slot,
                "gen": export.seg.generation,
            }
            fds = [export.fd]
            if board_fd is not None:
                reply["board"] = 1
                fds.append(board_fd)
        if self._send(conn, reply, fds):
            if fds:
                self.served += 1
                conn.board_sent = conn.board_sent or "board" in reply
        else:
            self._drop_conn(conn)

    def _send(self, conn: _Conn, msg: dict[str, Any], fds: list[int] | None = None) -> bool:
        data = json.dumps(msg).encode() + b"\n"
        try:
            sent = socket.send_fds(conn.sock, [data], fds or [])
        except OSError:
            return False  # gone, or not reading its replies: dropped
        return sent == len(data)

    # -- exports -------------------------------------------------------------------------

    def _serve(self, conn: _Conn, ref: Reference) -> tuple[_Export, int | None]:
        obj = _lookup(ref)
        with self.locked():
            export = self._find(ref, obj)
        if export is None:
            export = self._create(ref, obj)
        with self.locked():
            if export.fd < 0:  # released (or its object died) meanwhile
                _lookup(ref)
                raise NotInheritedError(f"the shared {ref.typename} was released meanwhile.")
            export.holders.add(conn.fd)
            conn.held.add(export)
            board = self.board
        board_fd = board.fd if board is not None and not conn.board_sent else None
        return export, board_fd

    def _find(self, ref: Reference, obj: object) -> _Export | None:
        """The export of ``obj`` if there is one, bound to ``ref``. Under the lock."""
        export = self.by_ref.get(ref)
        if export is not None:
            return export
        export = self.by_object.get(id(obj))
        if export is None:
            return None
        if export.weak is not None:
            same = export.weak() is obj  # a weak reference never names a newer object
        else:
            same = export.ref is not None and _registered(export.ref) is obj
        if not same:
            self._free(export)  # its object is gone: the id belongs to another now
            return None
        self._bind(export, ref)
        return export

    def _create(self, ref: Reference, obj: object) -> _Export:
        what = f"the shared {ref.typename}"
        if self.board is None:  # only this thread creates it
            self.board = _Board()
        try:
            seg = _write_export(self.store, obj, what)
        except SharedMemoryFullError:
            if not self._evict_dormant():
                raise
            seg = _write_export(self.store, obj, what)  # room made by exports nobody uses
        try:
            weak = weakref.ref(obj, self._object_died)
        except TypeError:
            weak = None  # not weakref-able: the export lives with the registration
        export = _Export(seg, id(obj), weak)
        with self.locked():
            assert self.board is not None
            export.slot = self.board.take()
            self.by_object[export.key] = export
            self._bind(export, ref)
            self.exported += 1
            if _registered(ref) is not obj:  # released while we wrote it
                self._free(export)
        return export

    def _bind(self, export: _Export, ref: Reference) -> None:
        """Make ``export`` serve ``ref``, under a new serial. Under the lock."""
        assert self.board is not None
        if export.ref is not None:
            self.by_ref.pop(export.ref, None)
        self.by_serial.pop(export.serial, None)
        export.ref = ref
        export.serial = next(self.serials)
        self.by_ref[ref] = export
        self.by_serial[export.serial] = export
        self.board.publish(export.slot, export.serial)

    def _withdraw(self, export: _Export, explicit: bool) -> None:
        """The registration went: workers drop it; free it, or keep it dormant. Under the lock."""
        if export.ref is not None:
            self.by_ref.pop(export.ref, None)
            export.ref = None
        if self.board is not None:
            self.board.withdraw(export.slot)
        if explicit or export.weak is None or not export.holders:
            self._free(export)

    def _free(self, export: _Export) -> None:
        """Hand the segment to the warm store, which keeps it for a later export or closes
        it (its memory goes with the workers' last mapping). Under the lock."""
        if export.fd < 0:
            return
        if export.ref is not None:
            self.by_ref.pop(export.ref, None)
            export.ref = None
        if self.by_serial.get(export.serial) is export:
            del self.by_serial[export.serial]
        if self.by_object.get(export.key) is export:
            del self.by_object[export.key]
        if self.board is not None:
            self.board.withdraw(export.slot)
            self.board.give_back(export.slot)
        self.store.park(export.seg)
        export.fd = -1

    def _evict_dormant(self) -> bool:
        with self.locked():
            dormant = [e for e in self.by_object.values() if e.ref is None]
            for export in dormant:
                self._free(export)
        self.store.clear()  # what they parked: the room is wanted now
        return bool(dormant)

    def _drop_conn(self, conn: _Conn) -> None:
        with self.locked():
            self._forget_conn(conn)

    def _forget_conn(self, conn: _Conn) -> None:
        """Under the lock: a worker left; free dormant exports that only it had."""
        if self.conns.pop(conn.fd, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        for export in conn.held:
            export.holders.discard(conn.fd)
            if export.ref is None and not export.holders:
                self._free(export)
        if not self.conns:
            self.store.clear()  # no worker left to serve: keep nothing warm for nobody

    # -- events from other threads ---------------------------------------------------------

    def on_drop(self, ref: Reference, explicit: bool) -> None:
        """Registry listener: the last registration of ``ref`` went. Never blocks."""
        self.pending.append(("drop", ref, explicit))
        self.process_pending(blocking=False)

    def _object_died(self, weak: weakref.ref[Any]) -> None:
        self.pending.append(("died", weak, True))
        self.process_pending(blocking=False)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock; process queued events before letting go."""
        with self.lock:
            yield
            self._process_locked()
        if self.pending:  # queued after we processed, while we still held the lock
            self.process_pending(blocking=False)

    def process_pending(self, blocking: bool = True) -> None:
        """Process queued drops and deaths now, unless another thread holds the lock."""
        while self.pending:
            if not self.lock.acquire(blocking=blocking):
                return  # the holder processes them before it lets go
            try:
                self._process_locked()
            finally:
                self.lock.release()

    def _process_locked(self) -> None:
        while self.pending:
            kind, what, explicit = self.pending.popleft()
            if kind == "drop":
                export = self.by_ref.get(what)
                if export is not None:
                    self._withdraw(export, explicit)
            else:  # died: find the export whose weak reference this is
                for export in list(self.by_object.values()):
                    if export.weak is what:
                        self._free(export)

    # -- figures ---------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self.locked():
            exports = {*self.by_serial.values(), *self.by_object.values()}
            return {
                "exports": self.exported,
                "live_exports": len(exports),
                "dormant_exports": sum(1 for e in exports if e.ref is None),
                "served": self.served,
                "connections": len(self.conns),
            }


def _lookup(ref: Reference) -> object:
    """The registered object, or NotInheritedError saying why not (forged, foreign, released).

    The message is the why and the fix only: the worker puts them after its
    own account of what it tried.
    """
    reg = registry()
    try:
        return reg.lookup(ref)
    except NotInheritedError:
        why, fix = reg.diagnose(ref)
        raise NotInheritedError(f"{why[:1].lower()}{why[1:]}. {fix}") from None


def _registered(ref: Reference) -> object:
    try:
        return registry().lookup(ref)
    except NotInheritedError:
        return None


def _write_export(store: warm.WarmStore, obj: object, what: str) -> warm.Segment:
    """Pickle ``obj`` once into a segment of the warm store (reused or new)."""
    try:
        p = serialize.plan(obj)
    except Exception as err:
        raise _PicklingFailed(f"the sharing process could not pickle it ({err!r})") from err
    return store.write(p, what)


class _PicklingFailed(NotInheritedError):
    """The object cannot be pickled: only fork inheritance can hand it over."""


def _error_reply(err: BaseException) -> dict[str, Any]:
    """A refusal as the worker receives it: the message, its type, and who gives the fix."""
    kind = type(err).__name__
    if isinstance(err, SharedMemoryFullError):
        kind = "SharedMemoryFullError"
    elif isinstance(err, SharedMemoryError):
        kind = "SharedMemoryError"
    else:
        kind = "NotInheritedError"
    # A pickling failure has no fix here: the worker knows why it did not
    # inherit the object, hence which fix applies.
    return {"error": str(err), "type": kind, "own_fix": not isinstance(err, _PicklingFailed)}


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


def _close_quietly(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
