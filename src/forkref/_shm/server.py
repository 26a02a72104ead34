"""The sharing side of the shared-memory route: one export server per sharing process.

How data flows (the worker side is :mod:`forkref._shm.client`, what they say
to each other :mod:`forkref._shm.protocol`, the exports :mod:`forkref._shm.store`)::

    sharing process P                                         worker W (one connection, kept)
    -----------------                                         -------------------------------
    ensure_serving(ref): bind + listen on the abstract
      unix address "forkref-<tree>-<P>"; the export thread
      starts now, or at serve_pending() (forkref's pools)
    export thread: one selector over the listening socket     connect: is the peer P, same uid?
      and every connection: an idle or slow client never
      holds up another                                  <---- request line (JSON reference)
      same uid? store.serve(conn, ref): the export of this
        object, made once (see forkref._shm.store)
      reply {"size","serial","slot","gen"} + segment fd
        (+ the board's fd, once per connection) ---------->  map it, rebuild, cache by serial
    the registry drops the last registration (store.on_drop),
      or the object dies: board[slot] = 0 ======= shared page ======> before_task(): drop it
    W exits: its connection closes: the store frees the dormant
      exports that only it had fetched (the pool closed)

The server owns the socket, the selector, the connections and the thread's
life (start, stop and join around forks, close); the store owns the exports
and the board, under its lock, which the server takes to forget a connection.

Non-goals: no flow control beyond one reply per request; exports are per
machine (unix sockets, a tmpfs).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from typing import Any

from forkref._errors import Error, NotInheritedError, SharedMemoryError, SharedMemoryFullError
from forkref._os import close_quietly, wait_os_thread_gone
from forkref._refs.registry import Reference
from forkref._shm import warm
from forkref._shm.protocol import REQUEST_LIMIT, address, parse_request, peer, reply_line
from forkref._shm.store import Export, ExportStore, PicklingFailed

__all__ = ["Server", "check_peer"]

_PARTIAL_REQUEST_SECONDS = 5.0  # a connection holding half a request this long is dropped
_MAX_CONNECTIONS = 4096


def check_peer(conn: socket.socket) -> None:
    """Refuse a client of another user (the object would cross a user boundary)."""
    found = peer(conn)
    if found is not None and found[1] != os.getuid():
        raise NotInheritedError(
            f"refusing to export to pid {found[0]} (uid {found[1]}): it runs as another user "
            f"than the sharing process (uid {os.getuid()}). Run the workers as the user "
            "that shares the object."
        )


class _Conn:
    """A worker's connection: its half-read request and what it was sent."""

    __slots__ = ("board_sent", "buf", "fd", "held", "pid", "since", "sock")

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.fd, self.pid = sock, sock.fileno(), pid
        self.buf = b""
        self.since = 0.0  # when the pending partial request began
        self.held: set[Export] = set()  # exports sent on this connection
        self.board_sent = False


class Server:
    """Listening socket, connections and export thread of one sharing process."""

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
        self.store = ExportStore()
        self.conns: dict[int, _Conn] = {}
        self.thread: threading.Thread | None = None
        self.wanted = False  # the thread should run (restarted after forks and pauses)
        self.served = 0

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
            wait_os_thread_gone(thread.native_id)
        # Cleared only now: until joined, the fork hook must still recognize
        # the export thread (a fork from it must not wait for the server lock).
        self.thread = None
        _drain(self.wake_r)

    def close(self) -> None:
        """Stop, close every socket and drop every export. Idempotent."""
        self.stop()
        with self.store.lock:
            for conn in list(self.conns.values()):
                self._forget_conn(conn)
            self.store.close_locked()
        self._close_fds()

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors, change nothing shared.

        The parent owns the address, the exports and the board. The selector's
        epoll instance is shared with the parent: closing the child's
        descriptor is all that may happen to it (no unregister).
        """
        for conn in self.conns.values():
            close_quietly(conn.fd)
        self.store.abandon()
        self.conns = {}
        self._close_fds()

    def _close_fds(self) -> None:
        with contextlib.suppress(Exception):
            self.sel.close()
        for fd in (self.wake_r, self.wake_w):
            close_quietly(fd)
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
            self.store.process_pending()

    def _timeout(self) -> float | None:
        # The warm store trims itself when idle: wake when a parked segment is due,
        # and, while workers are connected (the only time anything is parked), at
        # least every IDLE_SECONDS, since segments are parked from other threads too.
        trim = self.store.warm.trim_idle()
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
            export, board_fd = self.store.serve(
                conn.fd, conn.held, parse_request(line), conn.board_sent
            )
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
        data = reply_line(msg)
        try:
            sent = socket.send_fds(conn.sock, [data], fds or [])
        except OSError:
            return False  # gone, or not reading its replies: dropped
        return sent == len(data)

    def _drop_conn(self, conn: _Conn) -> None:
        with self.store.locked():
            self._forget_conn(conn)

    def _forget_conn(self, conn: _Conn) -> None:
        """Under the store's lock: a worker left; free dormant exports that only it had."""
        if self.conns.pop(conn.fd, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.store.release_locked(conn.fd, conn.held)
        if not self.conns:
            self.store.warm.clear()  # no worker left to serve: keep nothing warm for nobody

    # -- events from other threads, and figures -------------------------------------------

    def on_drop(self, ref: Reference, explicit: bool) -> None:
        """Registry listener: the last registration of ``ref`` went. Never blocks."""
        self.store.on_drop(ref, explicit)

    def counts(self) -> dict[str, int]:
        """Exports made, live and dormant, requests served, connections open."""
        with self.store.locked():
            return {
                **self.store.counts_locked(),
                "served": self.served,
                "connections": len(self.conns),
            }


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
    return {"error": str(err), "type": kind, "own_fix": not isinstance(err, PicklingFailed)}


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, OSError):
        while os.read(fd, 64):
            pass
