"""The worker side of the shared-memory route: fetch, cache, and drop what the sharer released.

How data flows (the sharing side is :mod:`forkref._shm.server`, the lines and
sizes both sides use :mod:`forkref._shm.protocol`)::

    fetch(ref)        (a reference this process neither registered nor inherited)
      sweep: has the sharer's board counter moved? drop entries whose slot no longer
             shows their serial (the sharer released them)
      cached under ref?  -> the object
      link to the sharing process (one connection per sharing process, kept open):
        connect, check that the peer is the sharing process and of this user
        send the reference; receive {"size","serial","slot","gen"} + the segment's fd
        (and, first time, the board's fd: mapped read-only, kept)
      the same export cached under another reference (a later share() of the
        same object)? -> that object; else map read-only, locked against reuse
        while mapped (forkref._shm.warm), check the generation, rebuild
        zero-copy, cache
    before_task()     (forkref's worker loop, before each task; cheap)
      one word per sharing process compared; a sweep only when it moved

What a dropped entry frees: our references to the rebuilt object; when no
task holds it any more, its buffers, the mapping and (before Python 3.13,
whose ``mmap`` keeps a duplicate of the descriptor it maps) one descriptor.
Nothing is unmapped by force, so a task that still holds the object keeps
it intact.

Errors are :class:`FetchError`: a cause, who gives the fix, and the type the
task should see; :func:`forkref._shm.export.fetch` turns them into one message
with why this process did not inherit the object.
"""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import json
import mmap
import os
import resource
import socket
import threading
import weakref
from typing import Any

from forkref._errors import Error, NotInheritedError, SharedMemoryError, SharedMemoryFullError
from forkref._refs.registry import Reference
from forkref._shm import segments, serialize, warm
from forkref._shm.protocol import (
    BOARD_BYTES,
    FDS_PER_REPLY,
    REPLY_LIMIT,
    address,
    peer,
    request_line,
)

__all__ = ["FetchError", "before_task", "counts", "fetch"]

_REPLY_TIMEOUT = 600.0  # serializing a huge object takes a while; death gives EOF
_KINDS: dict[str, type[Error]] = {
    "SharedMemoryFullError": SharedMemoryFullError,
    "SharedMemoryError": SharedMemoryError,
    "NotInheritedError": NotInheritedError,
}


class FetchError(Exception):
    """Why shared memory could not deliver an object.

    Attributes:
        cause: what failed, as a sentence.
        fix: what to do; ``None`` when the fix depends on why this process did
            not inherit the object (the caller knows), ``""`` when ``cause``
            already says it.
        kind: the forkref exception the task should see.
    """

    def __init__(self, cause: str, fix: str | None, kind: type[Error]) -> None:
        super().__init__(cause)
        self.cause, self.fix, self.kind = cause, fix, kind


class _Disconnected(Exception):
    """The sharing process closed our connection (or never answered on it)."""


class _Cached:
    """A fetched object, the export it came from, and the references that named it."""

    __slots__ = ("mapping", "obj", "refs", "serial", "slot")

    def __init__(self, obj: object, serial: int, slot: int, mapping: mmap.mmap | None) -> None:
        self.obj: object = obj
        self.serial, self.slot = serial, slot
        self.mapping = weakref.ref(mapping) if mapping is not None else None
        self.refs: list[Reference] = []


class _Link:
    """This process's connection to one sharing process, and what it fetched from it."""

    __slots__ = ("board", "board_map", "entries", "seen", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.board_map: mmap.mmap | None = None
        self.board: memoryview | None = None
        self.seen = 0
        self.entries: dict[int, _Cached] = {}

    def attach_board(self, fd: int) -> None:
        if self.board is not None:
            return  # a new connection sends it again: the one we hold is the same page
        self.board_map = segments.map_readonly(fd, BOARD_BYTES)
        self.board = memoryview(self.board_map).cast("Q")
        self.seen = self.board[0]
        _boarded.append(self)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


_links: dict[tuple[bytes, int], _Link] = {}
_boarded: list[_Link] = []  # links with a board, for before_task() (appended to only)
_cache: dict[Reference, _Cached] = {}
# Reentrant: rebuilding an object may resolve handles nested inside it.
_lock = threading.RLock()
_fetches = _dropped = 0
_hooked = False


def before_task() -> None:
    """Drop cached objects that their sharing process has released.

    Cheap: one comparison per sharing process this process fetched from (none
    at all in a process that never fetched). Call it between tasks, when no
    task is using a fetched object; a task still holding one keeps it alive.
    """
    for link in _boarded:
        if link.board[0] != link.seen:  # type: ignore[index]
            with _lock:
                _sweep(link)


def fetch(ref: Reference) -> object:
    """The object ``ref`` names, fetched from its sharing process once and cached.

    Raises:
        FetchError: shared memory cannot deliver it; says why.
    """
    with _lock:
        link = _links.get((ref.tree, ref.origin_pid))
        if link is not None:
            _sweep(link)  # stdlib pools call no before_task(): sweep on each resolution
        cached = _cache.get(ref)
        if cached is not None:
            return cached.obj
        return _fetch_uncached(ref)


def counts() -> dict[str, int]:
    """Fetches made, entries cached, and entries dropped by this process."""
    return {"fetches": _fetches, "cached": len(_cache), "dropped": _dropped}


def _sweep(link: _Link) -> None:
    board = link.board
    if board is None:
        return
    counter = board[0]  # read before the slots: a later release moves it again
    if counter == link.seen:
        return
    link.seen = counter
    gone = [c for c in link.entries.values() if c.slot and board[c.slot] != c.serial]
    for cached in gone:
        del link.entries[cached.serial]
        for ref in cached.refs:
            _cache.pop(ref, None)
    if gone:
        _let_go(gone)


def _let_go(gone: list[_Cached]) -> None:
    global _dropped
    _dropped += len(gone)
    mappings = [c.mapping for c in gone if c.mapping is not None]
    for cached in gone:
        cached.obj = None
    # Rebuilt objects with reference cycles (some pandas internals) keep their
    # mapping until a collection; one now keeps memory and descriptors flat.
    # A mapping still alive after it is held by a task: that is fine.
    if any(m() is not None for m in mappings):
        gc.collect()


def _fetch_uncached(ref: Reference) -> object:
    global _fetches
    _ensure_hook()
    key = (ref.tree, ref.origin_pid)
    link = _links.get(key)
    if link is None:
        link = _links[key] = _Link()
    reply, fds = _ask(link, ref)
    try:
        if reply.get("board") and len(fds) > 1:
            link.attach_board(fds[1])
        serial, slot, size = reply["serial"], reply["slot"], reply["size"]
        cached = link.entries.get(serial)
        if cached is None:
            obj, mapping = _map_and_rebuild(fds[0], size, reply["gen"])
            cached = link.entries[serial] = _Cached(obj, serial, slot, mapping)
            del obj, mapping
            _fetches += 1
    except OSError as err:
        raise _os_error("map the board of its sharing process", err) from err
    finally:
        _close_all(fds)
    cached.refs.append(ref)
    _cache[ref] = cached
    return cached.obj


def _map_and_rebuild(fd: int, size: int, generation: int) -> tuple[object, mmap.mmap]:
    try:
        mapping = warm.map_for_reading(fd, size, generation)
    except (OSError, ValueError) as err:
        raise _os_error("map its segment", err) from err
    try:
        return serialize.rebuild(mapping, generation), mapping
    except serialize.SegmentReused as err:
        mapping.close()
        raise FetchError(
            f"it was released while this process fetched it ({err})", "", NotInheritedError
        ) from err
    except Exception as err:
        raise FetchError(
            f"this process could not rebuild it from shared memory ({err!r})",
            "Under spawn or forkserver, the classes of a shared object must be importable "
            "by the workers.",
            NotInheritedError,
        ) from err


# -- talking to the sharing process ------------------------------------------------


def _ask(link: _Link, ref: Reference) -> tuple[dict[str, Any], list[int]]:
    """Send the request on the link (reconnecting once); the parsed reply and its fds."""
    line = request_line(ref)
    for attempt in (1, 2):
        if link.sock is None:
            link.sock = _connect(ref)
        try:
            link.sock.sendall(line)
            data, fds = _recv_reply(link.sock)
        except (_Disconnected, BrokenPipeError, ConnectionResetError) as err:
            link.close()
            if attempt == 2:
                raise _gone(ref, err) from err
            continue
        except OSError as err:
            link.close()
            raise _os_error("talk to its sharing process", err) from err
        return _parse_reply(data, fds), fds
    raise AssertionError("unreachable")


def _connect(ref: Reference) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as err:
        raise _os_error("open a socket to its sharing process", err) from err
    try:
        sock.settimeout(_REPLY_TIMEOUT)
        sock.connect(address(ref.tree, ref.origin_pid))
        _check_server(sock, ref)
    except (ConnectionRefusedError, FileNotFoundError) as err:
        sock.close()
        raise _nobody_serves(ref) from err
    except BaseException:
        sock.close()
        raise
    return sock


def _check_server(sock: socket.socket, ref: Reference) -> None:
    # Anyone can bind an abstract address once its owner has exited, and what
    # comes back is unpickled: only the sharing process itself is believed.
    found = peer(sock)
    if found is None or found == (ref.origin_pid, os.getuid()):
        return
    pid, uid = found
    if pid == ref.origin_pid:
        raise FetchError(
            f"the sharing process (pid {pid}) runs as uid {uid} and this process as uid "
            f"{os.getuid()}, and forkref hands objects only to processes of the same user",
            "Run the workers as the user that shares the object.",
            NotInheritedError,
        )
    raise FetchError(
        f"the process listening at the address of the sharing process (pid {ref.origin_pid}) "
        f"is pid {pid} (uid {uid}), not the sharing process: the sharing process has exited "
        "and another process took its address",
        "Keep the sharing process alive while its workers run.",
        NotInheritedError,
    )


def _recv_reply(sock: socket.socket) -> tuple[bytes, list[int]]:
    """Read the reply line and any descriptors sent with it (close-on-exec)."""
    data, fds = b"", list[int]()
    # socket.recv_fds() takes no flags: recvmsg with MSG_CMSG_CLOEXEC makes
    # the received descriptor close-on-exec atomically.
    cloexec = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    space = socket.CMSG_SPACE(FDS_PER_REPLY * array.array("i").itemsize)
    try:
        while not data.endswith(b"\n") and len(data) <= REPLY_LIMIT:
            chunk, ancdata, flags, _ = sock.recvmsg(REPLY_LIMIT, space, cloexec)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:usable]))
            if flags & getattr(socket, "MSG_CTRUNC", 0):
                # The kernel dropped descriptors it could not install here: this
                # process is at its open-file limit.
                raise _os_error("receive the segment", OSError(errno.EMFILE, "MSG_CTRUNC"))
            if not chunk:
                if not data:
                    raise _Disconnected("end of file before any reply")
                break
            data += chunk
        if not cloexec:
            for fd in fds:
                os.set_inheritable(fd, False)
    except BaseException:
        _close_all(fds)
        raise
    return data, fds


def _parse_reply(data: bytes, fds: list[int]) -> dict[str, Any]:
    """The reply as a dict; on a refusal or a bad reply, FetchError and its fds closed."""
    try:
        if not data.endswith(b"\n"):
            raise FetchError("the sharing process sent a truncated reply", "", NotInheritedError)
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise TypeError(f"expected a JSON object, got {type(msg).__name__}")
        if "error" in msg:
            kind = _KINDS.get(str(msg.get("type")), NotInheritedError)
            raise FetchError(str(msg["error"]), "" if msg.get("own_fix", True) else None, kind)
        for field in ("size", "serial", "slot", "gen"):
            msg[field] = int(msg[field])
        if not fds:
            raise FetchError("the sharing process sent no segment", "", NotInheritedError)
        return msg
    except FetchError:
        _close_all(fds)
        raise
    except (ValueError, KeyError, TypeError) as err:
        _close_all(fds)
        raise FetchError(
            f"the sharing process sent a malformed reply ({err!r})", "", NotInheritedError
        ) from err


# -- errors ------------------------------------------------------------------------


def _os_error(step: str, err: OSError | ValueError) -> FetchError:
    if isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE):
        return FetchError(
            f"this process could not {step}: it has reached its limit of open files "
            f"({_open_files()})",
            "Raise the limit (ulimit -n, or resource.setrlimit(resource.RLIMIT_NOFILE, ...)), "
            "or close files that this process keeps open.",
            SharedMemoryError,
        )
    return FetchError(f"this process could not {step} ({err})", "", SharedMemoryError)


def _open_files() -> str:
    # `resource` is imported up front: at the limit, an import cannot open its file.
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        return f"{len(os.listdir('/proc/self/fd'))} open, soft limit {soft}"
    except OSError:  # listing needs a descriptor too
        return f"soft limit {soft}"


def _nobody_serves(ref: Reference) -> FetchError:
    try:
        os.kill(ref.origin_pid, 0)
    except ProcessLookupError:
        cause = f"the sharing process (pid {ref.origin_pid}) has exited"
    except OSError:
        cause = f"pid {ref.origin_pid} runs as another user: the sharing process has exited"
    else:
        cause = (
            f"pid {ref.origin_pid} is running but serves no shared objects of this tree: "
            "the reference belongs to another process tree, or the sharing process could "
            "not open its socket (it warned when the handle was pickled)"
        )
    return FetchError(
        cause,
        "Keep the sharing process alive while its workers run, and pass handles only to "
        "workers of the process that shared them.",
        NotInheritedError,
    )


def _gone(ref: Reference, err: BaseException) -> FetchError:
    return FetchError(
        f"the sharing process (pid {ref.origin_pid}) closed the connection without an "
        f"answer ({err}); it has probably exited",
        "Keep the sharing process alive while its workers run.",
        NotInheritedError,
    )


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- fork ---------------------------------------------------------------------------


def _ensure_hook() -> None:
    global _hooked
    if not _hooked:
        _hooked = True
        os.register_at_fork(after_in_child=_after_fork_child)


def _after_fork_child() -> None:
    global _lock
    # A child must not talk on its parent's connections (the replies would
    # interleave), and starts with nothing cached: what it uses it fetches anew.
    _lock = threading.RLock()
    for link in _links.values():
        link.close()
    _links.clear()
    _boarded.clear()
    _cache.clear()
