"""The wire between a pool's dispatcher, its zygotes and its workers.

Worker sockets (``AF_UNIX``, ``SOCK_STREAM``, one per worker) carry framed
messages: an 8-byte length, then the body; bodies begin with :data:`HDR`
(id, op). Parent to worker: ``FN`` (id: a function id; body: the pickled
function, sent once per worker), ``TASK`` (id: the task id; body: the
function id as :data:`FNID`, then the pickled ``(kind, data)``), ``STOP``.
Worker to parent: ``READY`` (started, initializer done), ``OK`` / ``ERR``
(the task's pickled result / ``(exception, traceback text)``),
``INIT_FAILED`` (the initializer's traceback), ``RETIRE`` (``max_tasks``
reached), ``STARTED`` (id: the task id; the task's function is being called
now: sent only when the pool has a ``task_timeout``, whose clock it starts).
The parent's ends are non-blocking: the dispatcher reads whatever has
arrived (:func:`read_messages`) and never waits on one worker while others
have results for it. A zygote's control socket
(``SOCK_SEQPACKET``) carries one small datagram per message, file
descriptors attached with ``SCM_RIGHTS`` when a worker is to be forked.

Non-goals: no encryption or authentication (both ends are one user's
processes of one tree), no cross-host transport.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from typing import Any

__all__ = [
    "CTRL_ID",
    "ERR",
    "FN",
    "FNID",
    "HDR",
    "INIT_FAILED",
    "LEN",
    "OK",
    "OWN_FDS",
    "READY",
    "READ_SIZE",
    "RETIRE",
    "STARTED",
    "STOP",
    "TASK",
    "close_fd",
    "ctrl_recv",
    "ctrl_send",
    "read_into",
    "read_messages",
    "recv",
    "recv_exact",
    "send",
    "send_buffer",
    "wait_fd",
]

LEN = struct.Struct("!Q")
HDR = struct.Struct("!QB")
FNID = struct.Struct("!Q")
TASK, STOP, FN = 0, 1, 2  # parent -> worker
OK, ERR, INIT_FAILED, RETIRE, READY, STARTED = 0, 1, 2, 3, 4, 5  # worker -> parent
CTRL_ID = struct.Struct("!Qq")
READ_SIZE = 1 << 20
# Asked for on every worker socket; the kernel caps it at net.core.wmem_max.
_SNDBUF = 4 << 20

#: Parent-side file descriptors of every forkref channel. A zygote closes all
#: of them but its own right after the fork, so that a worker's socket is held
#: only by the worker and the parent (EOF then means what it says).
OWN_FDS: set[int] = set()


def send(fd: int, *parts: bytes | memoryview) -> None:
    buffers: list[Any] = [LEN.pack(sum(len(p) for p in parts)), *parts]
    while buffers:
        try:
            written = os.writev(fd, buffers)
        except BlockingIOError:  # the parent's ends are non-blocking: wait until writable
            wait_fd(fd, select.POLLOUT)
            continue
        while buffers and written >= len(buffers[0]):
            written -= len(buffers.pop(0))
        if buffers and written:
            buffers[0] = memoryview(buffers[0])[written:]


def send_buffer(fd: int) -> int:
    """Grow the send buffer of socket ``fd`` (best effort) and return its size."""
    sock = socket.socket(fileno=fd)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
    except OSError:
        return 64 * 1024
    finally:
        sock.detach()


def wait_fd(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def read_into(fd: int, view: memoryview) -> None:
    """Fill ``view`` from a non-blocking ``fd`` (waiting as needed); EOFError on EOF."""
    got = 0
    while got < len(view):
        try:
            k = os.readv(fd, [view[got:]])
        except BlockingIOError:
            wait_fd(fd, select.POLLIN)
            continue
        if k == 0:
            raise EOFError
        got += k


def read_messages(fd: int, buf: bytearray) -> list[bytearray]:
    """Every complete message readable now from non-blocking ``fd``; partial data stays in ``buf``.

    One read takes up to ``READ_SIZE`` bytes, so a burst of small results
    costs one system call, not one per result. A big message is read whole
    (blocking until the worker has sent it all) when it comes first; after
    complete ones it is left for the next call.

    Raises:
        EOFError: the worker's end is closed (it exited or died).
    """
    try:
        chunk = os.read(fd, READ_SIZE)
    except BlockingIOError:
        return []
    if not chunk:
        raise EOFError
    buf += chunk
    out: list[bytearray] = []
    while len(buf) >= LEN.size:
        (n,) = LEN.unpack_from(buf)
        have = len(buf) - LEN.size
        if have >= n:
            out.append(buf[LEN.size : LEN.size + n])
            del buf[: LEN.size + n]
            continue
        if n - have > READ_SIZE and not out:
            # Only when nothing is complete yet: if the worker dies mid-send, the
            # EOF must not take the complete messages read before it along.
            message = bytearray(n)
            message[:have] = buf[LEN.size :]
            buf.clear()
            read_into(fd, memoryview(message)[have:])
            out.append(message)
        break
    return out


def recv_exact(fd: int, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError
        got += k
    return buf


def recv(fd: int) -> bytearray:
    (n,) = LEN.unpack(recv_exact(fd, LEN.size))
    return recv_exact(fd, n)


def ctrl_send(fd: int, data: bytes, fds: list[int] | None = None) -> None:
    sock = socket.socket(fileno=fd)
    try:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)
    finally:
        sock.detach()  # the fd stays ours; the socket object must not close it


def ctrl_recv(fd: int) -> tuple[bytes, list[int]]:
    sock = socket.socket(fileno=fd)
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 256, 1)
    finally:
        sock.detach()
    return data, fds


def close_fd(fd: int | None) -> None:
    if fd is None:
        return
    OWN_FDS.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)
