"""Handing compact buffers to other processes: one read-only segment, written once.

When multiprocessing pickles a compact container for another process (a
``Process`` under spawn/forkserver, a queue, a pool task, a PyTorch
``DataLoader`` worker), its reducer calls :func:`export`::

    parent                                     worker (any number of them)
    buffers ── copied once ──> anonymous segment (O_TMPFILE: no name, kernel-freed)
      │                             │
      └─ re-pointed at a MAP_POPULATE mapping of it (the heap copy is freed)
                                    │
    pickle = Segment.ref: (pid, fd, dev, ino, size, spans)  ──>  attach(ref):
                                    open /proc/<pid>/fd/<fd>, check dev+ino,
                                    map read-only once per process, views

Why this way: an anonymous segment never has a name, so nothing is left in
the segment directory whoever is killed and however (SIGKILL of the parent,
of a worker, a crash mid-epoch): the kernel frees it with the last open
descriptor and mapping (see ``forkref._shm.segments``). A worker that starts
later than the pickling finds it through ``/proc/<pid>/fd``, as long as the
owner keeps the descriptor, that is as long as the container lives there.
The inode check refuses a descriptor number reused for another file.

Why the parent maps it too, populated: every page of the segment is then
mapped by at least two processes, so it never counts in a worker's USS
(private memory), and the parent's own copy of the buffers is freed.

Non-goals: not for storage (``pickle.dumps`` carries the bytes instead);
not across machines or PID namespaces.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections.abc import Sequence
from typing import Any

from forkref._errors import CompactError
from forkref._shm import segments

__all__ = ["INLINE_BELOW", "Segment", "attach", "export"]

#: Containers with fewer bytes of buffers travel inline: a segment is not worth it.
INLINE_BELOW = 64 * 1024
_ALIGN = 64  # each buffer on a cache line, as forkref._shm.serialize does
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

# Segments mapped in this process, by (owner pid, device, inode): a container
# unpickled many times (one per pool task) is mapped once.
_mapped: weakref.WeakValueDictionary[tuple[int, int, int], Segment] = (
    weakref.WeakValueDictionary()
)


class Segment:
    """A segment of buffers as this process sees it: the reference and the views.

    In the owner it also holds the descriptor other processes open; that is
    closed when the last container using the segment is gone.
    """

    __slots__ = ("__weakref__", "built", "ref", "views")

    def __init__(self, ref: tuple[Any, ...], views: list[memoryview]) -> None:
        self.ref = ref  # (pid, fd, dev, ino, size, spans): what a pickle carries
        self.views = views
        self.built: Any = None  # a weak reference to what was rebuilt over the views


def export(buffers: Sequence[memoryview], what: str) -> Segment:
    """Copy ``buffers`` into a new anonymous segment that this process keeps open.

    Raises:
        SharedMemoryFullError: the segment directory has no room for them.
        SharedMemoryError: the segment cannot be made.
    """
    spans, size = [], 0
    for buffer in buffers:
        spans.append((size, buffer.nbytes))
        size += -(-buffer.nbytes // _ALIGN) * _ALIGN
    size = max(size, 1)  # mmap refuses an empty file
    fd = segments.create_anonymous(size, what, _no_room_fixes())
    try:
        for (offset, _), buffer in zip(spans, buffers, strict=True):
            segments.write_at(fd, offset, buffer, what)
        mapping = mmap.mmap(
            fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ
        )
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    ref = (os.getpid(), fd, st.st_dev, st.st_ino, size, tuple(spans))
    segment = Segment(ref, _views(mapping, spans))
    # The descriptor is what late workers open: it lives as long as the segment object.
    weakref.finalize(segment, _close_in_owner, fd, os.getpid())
    _mapped[_key(ref)] = segment
    return segment


def _no_room_fixes() -> str:
    # The container's own fix, whatever the start method: its buffers go to other
    # processes through this segment alone.
    room = segments.room_fix(segments.segment_dir())
    return (
        f"Fixes: {room}. To store the container rather than hand it to another process, "
        "use pickle.dumps, which carries the bytes and needs no segment"
    )


def _close_in_owner(fd: int, owner: int) -> None:
    # A forked child inherits the finalizer: the descriptor number is only ours in the owner.
    if os.getpid() == owner:
        os.close(fd)


def _key(ref: tuple[Any, ...]) -> tuple[int, int, int]:
    return (ref[0], ref[2], ref[3])


def _views(mapping: mmap.mmap, spans: Sequence[tuple[int, int]]) -> list[memoryview]:
    whole = memoryview(mapping).toreadonly()
    return [whole[offset : offset + length] for offset, length in spans]


def attach(ref: tuple[Any, ...], what: str) -> Segment:
    """The segment ``ref`` names, mapped read-only in this process (once).

    Raises:
        CompactError: the segment cannot be opened: its owner exited or
            released the container, or this system forbids the access.
    """
    try:
        key = _key(ref)
        pid, fd_number, dev, ino, size, spans = ref
    except (TypeError, ValueError, IndexError) as exc:
        raise CompactError(f"receiving {what}: its segment reference {ref!r} is malformed") from exc
    segment = _mapped.get(key)
    if segment is not None:
        return segment
    fd = _open(pid, fd_number, what)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != (dev, ino, size):
            raise CompactError(
                f"receiving {what}: process {pid} no longer holds its shared segment (the "
                "container was released there and the descriptor reused); keep the container "
                "alive in the process that sends it until the receivers have started"
            )
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    segment = Segment(ref, _views(mapping, spans))
    _mapped[key] = segment
    return segment


def _open(pid: int, fd_number: int, what: str) -> int:
    path = f"/proc/{pid}/fd/{fd_number}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise CompactError(
            f"receiving {what}: its shared segment is gone, because process {pid} that sent "
            "it has exited or released the container. Keep the container alive in that "
            "process while others receive it; to store it, use pickle.dumps, which carries "
            "the data itself"
        ) from exc
    except PermissionError as exc:
        raise CompactError(
            f"receiving {what}: this system does not let process {os.getpid()} open {path} "
            f"({exc}), how compact containers reach spawn and forkserver workers. /proc may "
            "be mounted with hidepid or the sender made non-dumpable; use the 'fork' start "
            "method (workers inherit the container, no segment needed)"
        ) from exc
