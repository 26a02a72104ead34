"""What the export server and its clients say to each other: addresses, lines, sizes.

Imported by both sides (:mod:`forkref._shm.server` answers,
:mod:`forkref._shm.client` asks); neither imports the other::

    client (worker W)                                server (sharing process P)
    connect(address(tree, P)); peer(): is it P?  -->  accept; peer(): same uid?
    request_line(ref)  (one JSON line)           -->  parse_request(line) -> Reference
                                                 <--  reply_line({"size","serial","slot"})
                                                      + segment fd (+ board fd, once)
                                                      or {"error","type","own_fix"}

Every line is JSON ending in ``\\n``, never pickle: it comes from another
process. A request is at most ``REQUEST_LIMIT`` bytes, a reply at most
``REPLY_LIMIT``, with at most ``FDS_PER_REPLY`` descriptors. The board (the
page that tells workers which exports are withdrawn) is ``BOARD_BYTES`` long:
word 0 counts withdrawals, word ``slot`` holds the serial of the export in
that slot, for ``BOARD_SLOTS`` slots.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from typing import Any

from forkref._errors import NotInheritedError
from forkref._refs.registry import Reference

__all__ = [
    "BOARD_BYTES",
    "BOARD_SLOTS",
    "FDS_PER_REPLY",
    "REPLY_LIMIT",
    "REQUEST_LIMIT",
    "address",
    "parse_request",
    "peer",
    "reply_line",
    "request_line",
]

BOARD_SLOTS = 32767
BOARD_BYTES = (1 + BOARD_SLOTS) * 8  # a tmpfs file: only the pages written take room
REQUEST_LIMIT = 4096
REPLY_LIMIT = 1 << 16  # a reply is one short JSON line
FDS_PER_REPLY = 2  # the segment, and the board once per connection


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


def reply_line(msg: dict[str, Any]) -> bytes:
    """A reply (an export's figures, or a refusal) as the server sends it."""
    return json.dumps(msg).encode() + b"\n"
