"""The warm segment store: released export segments keep their pages for the next export.

A fresh tmpfs page costs far more to write than a page already written
(the kernel allocates and zeroes it first: 0.4-2.4 GB/s here, with
pwrite, against 5-10 GB/s for a memcpy into written, mapped pages;
``benchmarks/bench_warm.py --write-methods``). So a segment whose
export is released is *parked* with its pages, and the next export of a
similar size is copied into it at memory speed. How data flows::

    sharing process (forkref._shm.server)            worker (forkref._shm.client)
    -------------------------------------            ----------------------------
    store.write(plan, what) -> Segment
      a parked segment of fitting capacity whose
      exclusive flock succeeds (no reader maps it)
        -> memcpy into the store's kept mapping,
           new generation in the header
      else a new unnamed segment, written with
        pwrite (faster than a first write through
        a mapping); its first reuse maps it
        writable, pages populated, kept after
    reply: size, generation + the segment's        map_for_reading(fd, size, gen):
      read-only descriptor  --------------------->   reopen it (a description of its own),
                                                     flock LOCK_SH, map PROT_READ; the lock
                                                     lives as long as the mapping does
                                                     header generation != gen: refused
    export freed -> store.park(segment): kept while
      the parked bytes fit the cap, else closed;
      parked ones idle for IDLE_SECONDS are closed

**Safety.** A segment is reused only when ``flock(LOCK_EX | LOCK_NB)`` on the
store's own open file description succeeds: every reader holds ``LOCK_SH`` on
a description of its own, and the kernel drops that lock only when the
reader's last descriptor *and mapping* of it are gone (a mapping holds the
file; flock locks go with the file). A task still holding an object from
the segment therefore keeps it from reuse, whatever the release protocol
says. A reader that locks only after the segment was reused sees a new
generation in the header and refuses it. Workers get an ``O_RDONLY``
descriptor: a writable shared mapping of it is refused by the kernel. Every
byte of a reused segment that the new object does not cover is zeroed.

**The cap.** Parked bytes stay under :func:`cap_bytes`: the environment
variable ``FORKREF_SHM_WARM_BYTES`` (bytes, or with a K/M/G suffix; ``0``
turns reuse off), read there and nowhere else; by default a quarter of the
segment directory's free space (parked bytes counted as free, since they
can be given back at once). Live exports are not limited by it: they are
what the user shares.

Non-goals: the store does not keep result segments (those are named and
written by workers); it never shrinks or grows a segment; it is per sharing
process and empties when the last worker connection closes.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import os
import re
import threading
import time

from forkref._errors import SharedMemoryError, SharedMemoryFullError
from forkref._shm import segments, serialize

__all__ = ["ENV_CAP", "IDLE_SECONDS", "Segment", "WarmStore", "cap_bytes", "map_for_reading"]

ENV_CAP = "FORKREF_SHM_WARM_BYTES"
IDLE_SECONDS = 30.0  # a parked segment unused this long is given back
_MAX_PARKED = 64  # segments, whatever their size: each holds descriptors
_PAGE = mmap.PAGESIZE
_generations = itertools.count(1)  # one per use, across all stores of this process


def cap_bytes(parked: int = 0) -> int:
    """The most bytes of idle segments to keep: ``$FORKREF_SHM_WARM_BYTES``, or a quarter
    of the segment directory's free space plus the ``parked`` bytes (which can be given
    back at once). The one place this setting is read."""
    text = os.environ.get(ENV_CAP, "").strip()
    if text:
        match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.lower())
        if match is None:
            raise SharedMemoryError(
                f"the environment variable {ENV_CAP}={text!r} is not a size: set it to "
                "bytes, or a number with K, M or G (e.g. 4G), or 0 to turn the warm "
                "segment store off; unset, the store keeps up to a quarter of the free "
                "space of the segment directory"
            )
        return int(match.group(1)) << (10 * " kmg".index(match.group(2) or " "))
    try:
        st = os.statvfs(segments.segment_dir())
    except OSError:
        return 0
    return (st.f_bavail * st.f_frsize + parked) // 4


def _capacity(nbytes: int) -> int:
    """Round a size up so that similar sizes share segments: to 1/16 of its power of
    two (at most 6.25% more), whole pages."""
    step = max(_PAGE, 1 << max(0, nbytes.bit_length() - 4))
    return -(-nbytes // step) * step


class Segment:
    """One unnamed segment: the store's read-write descriptor and mapping, the
    read-only descriptor workers get, and the generation of its current use."""

    __slots__ = (
        "capacity",
        "fd",
        "generation",
        "idle_since",
        "mapping",
        "reusable",
        "ro_fd",
        "size",
    )

    def __init__(self, fd: int, capacity: int) -> None:
        self.fd, self.capacity = fd, capacity
        self.ro_fd = -1
        self.reusable = False  # readers can lock it (there is a /proc)
        self.mapping: mmap.mmap | None = None  # made at the first reuse, then kept
        self.generation = 0
        self.size = 0
        self.idle_since = 0.0

    def close(self) -> None:
        """Give the memory back (once no reader maps it). Idempotent."""
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        for fd in (self.fd, self.ro_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.ro_fd = -1


class WarmStore:
    """The parked segments of one sharing process, and the rules for reusing them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.parked: list[Segment] = []
        self.reused = self.created = 0

    def write(self, p: serialize.Plan, what: str) -> Segment:
        """A segment holding ``p`` under a new generation: a parked one if one fits
        and no reader maps it, else a new one."""
        seg = self._take(p.size)
        if seg is not None:
            try:
                self._rewrite(seg, p)
            except BaseException as err:
                seg.close()
                if not isinstance(err, (OSError, ValueError)):
                    raise
                return self._create(p, what)  # it could not be mapped: a fresh one
            return seg
        return self._create(p, what)

    def _take(self, size: int) -> Segment | None:
        with self.lock:
            fits = sorted(
                (s for s in self.parked if size <= s.capacity <= 2 * _capacity(size)),
                key=lambda s: s.capacity,
            )
            for seg in fits:
                try:
                    # Held until the new contents are written: a late reader of
                    # the old use waits, then sees the new generation and refuses.
                    fcntl.flock(seg.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a reader still maps it
                self.parked.remove(seg)
                return seg
        return None

    def _rewrite(self, seg: Segment, p: serialize.Plan) -> None:
        if seg.mapping is None:
            seg.mapping = _populated_mapping(seg)
        seg.generation, seg.size = next(_generations), p.size
        view = memoryview(seg.mapping)
        try:
            serialize.write_into(p, view, seg.generation, min(seg.capacity, _pages(p.size)))
        finally:
            view.release()
        fcntl.flock(seg.fd, fcntl.LOCK_UN)
        self.reused += 1

    def _create(self, p: serialize.Plan, what: str) -> Segment:
        capacity = _capacity(p.size)
        cap_bytes(self.parked_bytes())  # a bad setting fails here, with its fix
        try:
            fd = segments.create_anonymous(capacity, what)
        except SharedMemoryFullError:
            if not self.clear():
                raise
            fd = segments.create_anonymous(capacity, what)  # room made by parked segments
        seg = Segment(fd, capacity)
        try:
            seg.generation, seg.size = next(_generations), p.size
            serialize.write(p, fd, what, seg.generation)
            seg.ro_fd = _reopen(fd)
            seg.reusable = seg.ro_fd >= 0
            if not seg.reusable:
                seg.ro_fd = os.dup(fd)  # no /proc: readers cannot lock, so never reused
        except BaseException:
            seg.close()
            raise
        self.created += 1
        return seg

    def park(self, seg: Segment) -> None:
        """The segment's export is gone: keep it warm if it fits the cap, else close it."""
        if seg.fd < 0:
            return
        seg.idle_since = time.monotonic()
        with self.lock:
            try:
                cap = cap_bytes(sum(s.capacity for s in self.parked))
            except SharedMemoryError:
                cap = 0  # a bad setting: reported by the next export, not by a release
            if not seg.reusable or seg.capacity > cap:
                gone = [seg]
            else:
                self.parked.append(seg)
                gone = self._over(cap)
        for old in gone:
            old.close()

    def _over(self, cap: int) -> list[Segment]:
        """Under the lock: take out the oldest segments beyond the cap and the count."""
        gone = []
        while self.parked and (
            sum(s.capacity for s in self.parked) > cap or len(self.parked) > _MAX_PARKED
        ):
            gone.append(self.parked.pop(0))
        return gone

    def trim_idle(self) -> float | None:
        """Close segments parked for IDLE_SECONDS; seconds until the next is due (None: none)."""
        now = time.monotonic()
        with self.lock:
            gone = [s for s in self.parked if now - s.idle_since >= IDLE_SECONDS]
            self.parked = [s for s in self.parked if s not in gone]
            due = min((s.idle_since + IDLE_SECONDS - now for s in self.parked), default=None)
        for seg in gone:
            seg.close()
        return due

    def clear(self) -> bool:
        """Close every parked segment; whether there was any. Idempotent."""
        with self.lock:
            gone, self.parked = self.parked, []
        for seg in gone:
            seg.close()
        return bool(gone)

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors and mappings."""
        gone, self.parked = self.parked, []
        self.lock = threading.Lock()
        for seg in gone:
            seg.close()

    def parked_bytes(self) -> int:
        """Bytes held by parked segments."""
        with self.lock:
            return sum(s.capacity for s in self.parked)


def _pages(n: int) -> int:
    return -(-n // _PAGE) * _PAGE


def _populated_mapping(seg: Segment) -> mmap.mmap:
    """Map a segment writable with its pages populated, kept for every later use.

    Made at the first reuse, not at creation: populating costs about as much
    as a warm pwrite, which a segment never reused should not pay, and it
    turns every later reuse into a plain memcpy into mapped pages (a memcpy
    through a fresh mapping faults every page in, slower than pwrite).
    """
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(seg.fd, seg.capacity, flags=flags)


def _reopen(fd: int) -> int:
    """A new read-only open file description of ``fd``'s file, or -1 without /proc."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1


def map_for_reading(fd: int, size: int, generation: int) -> mmap.mmap:
    """Map a segment read-only for this reader, locked against reuse while mapped.

    ``fd`` is the descriptor the sharing process sent (shared with it and
    every other reader). Raises :class:`~forkref._shm.serialize.SegmentReused`
    if it already holds another use, ``OSError`` if it cannot be opened.
    """
    # A description of our own: a lock on the shared one would be everyone's.
    own = _reopen(fd)
    if own < 0:  # no /proc here, nor in the sharing process: it never reuses segments
        return segments.map_readonly(fd, size)
    try:
        fcntl.flock(own, fcntl.LOCK_SH)  # waits only while the store rewrites it
        mapping = segments.map_readonly(own, size)
    finally:
        os.close(own)  # the mapping keeps the file, and so the lock
    return mapping
