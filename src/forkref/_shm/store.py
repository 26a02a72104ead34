"""The exports one sharing process serves: segments, the board, and when they go.

The export server (:mod:`forkref._shm.server`) asks the store for an export
and sends what it gets; the store decides what to serialize and when to
free it::

    server: a request for ref from connection c
      serve(c, ref): registry().lookup(ref): MAC, registered?
        an export of this very object? (weakref: the object, not the
          reference, so inline share(x) in every map() reuses it)
        else pickle once into an unnamed segment, take a slot on the board
      -> (export, board fd the first time c asks)          -> sent to the worker
    the registry drops the last registration of the object (on_drop), or the
      object dies (weakref): board[slot] = 0; board[0] += 1
      explicit release(), object gone, or no connection that fetched it is
      left: the segment goes to the warm store (forkref._shm.warm), which
      keeps its pages for a later export or closes it; otherwise dormant,
      kept for the next share
    the server forgets connection c (release_locked): dormant exports that
      only c had fetched are freed

**The board** is one unnamed page-backed segment per sharing process, mapped
read-write here and read-only by workers: word 0 counts withdrawals, word
``slot`` holds the serial of the export using that slot (0: withdrawn). A
worker compares one word per task, and looks at its entries only when it
changed. ``BOARD_SLOTS`` exports can be live at once; beyond that an export
gets slot 0, and workers keep it until they exit.

**Locking.** The export thread owns the state and changes it under
``ExportStore.lock`` (a plain lock). The registry's drop listener and weakref
callbacks may run in any thread, even inside a garbage collection in the
thread that holds the lock, so they never wait: they queue their event and
process the queue only if the lock is free; whoever holds it processes the
queue before letting go.

Non-goals: no eviction of exports that are in use; exports are per machine.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import mmap
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from forkref._errors import NotInheritedError, SharedMemoryFullError
from forkref._os import close_quietly
from forkref._refs.registry import Reference, registry
from forkref._shm import segments, serialize, warm
from forkref._shm.protocol import BOARD_BYTES, BOARD_SLOTS

__all__ = ["Export", "ExportStore", "PicklingFailed"]


class PicklingFailed(NotInheritedError):
    """The object cannot be pickled: only fork inheritance can hand it over."""


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
        if self.next > BOARD_SLOTS:
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
        close_quietly(self.fd)


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


# -- exports ---------------------------------------------------------------------------


class Export:
    """One object serialized into one segment (of the warm store: ``fd`` is what workers get)."""

    __slots__ = ("fd", "holders", "key", "ref", "seg", "serial", "size", "slot", "weak")

    def __init__(self, seg: warm.Segment, key: int, weak: weakref.ref[Any] | None) -> None:
        self.seg, self.fd, self.size, self.key, self.weak = seg, seg.ro_fd, seg.size, key, weak
        self.ref: Reference | None = None  # the registration it serves; None: dormant
        self.serial = 0
        self.slot = 0
        self.holders: set[int] = set()  # connections (fds) that received it


class ExportStore:
    """The exports and the board of one sharing process, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: collections.deque[tuple[str, Any, bool]] = collections.deque()
        self.by_ref: dict[Reference, Export] = {}
        self.by_object: dict[int, Export] = {}
        self.by_serial: dict[int, Export] = {}
        self.board: _Board | None = None
        self.serials = itertools.count(1)
        self.exported = 0
        self.warm = warm.WarmStore()  # segments of freed exports, kept for the next ones

    def serve(
        self, holder: int, held: set[Export], ref: Reference, board_sent: bool
    ) -> tuple[Export, int | None]:
        """The export for ``ref``, now held by connection ``holder`` (its ``held`` set);
        and the board's fd unless that connection was sent it already."""
        obj = _lookup(ref)
        with self.locked():
            export = self._find(ref, obj)
        if export is None:
            export = self._create(ref, obj)
        with self.locked():
            if export.fd < 0:  # released (or its object died) meanwhile
                _lookup(ref)
                raise NotInheritedError(f"the shared {ref.typename} was released meanwhile.")
            export.holders.add(holder)
            held.add(export)
            board = self.board
        board_fd = board.fd if board is not None and not board_sent else None
        return export, board_fd

    def _find(self, ref: Reference, obj: object) -> Export | None:
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

    def _create(self, ref: Reference, obj: object) -> Export:
        what = f"the shared {ref.typename}"
        if self.board is None:  # only the export thread creates it
            self.board = _Board()
        try:
            seg = _write_export(self.warm, obj, what)
        except SharedMemoryFullError:
            if not self._evict_dormant():
                raise
            seg = _write_export(self.warm, obj, what)  # room made by exports nobody uses
        try:
            weak = weakref.ref(obj, self._object_died)
        except TypeError:
            weak = None  # not weakref-able: the export lives with the registration
        export = Export(seg, id(obj), weak)
        with self.locked():
            assert self.board is not None
            export.slot = self.board.take()
            self.by_object[export.key] = export
            self._bind(export, ref)
            self.exported += 1
            if _registered(ref) is not obj:  # released while we wrote it
                self._free(export)
        return export

    def _bind(self, export: Export, ref: Reference) -> None:
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

    def _withdraw(self, export: Export, explicit: bool) -> None:
        """The registration went: workers drop it; free it, or keep it dormant. Under the lock."""
        if export.ref is not None:
            self.by_ref.pop(export.ref, None)
            export.ref = None
        if self.board is not None:
            self.board.withdraw(export.slot)
        if explicit or export.weak is None or not export.holders:
            self._free(export)

    def _free(self, export: Export) -> None:
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
        self.warm.park(export.seg)
        export.fd = -1

    def _evict_dormant(self) -> bool:
        with self.locked():
            dormant = [e for e in self.by_object.values() if e.ref is None]
            for export in dormant:
                self._free(export)
        self.warm.clear()  # what they parked: the room is wanted now
        return bool(dormant)

    def release_locked(self, holder: int, held: set[Export]) -> None:
        """Connection ``holder`` is gone: free dormant exports only it had. Under the lock."""
        for export in held:
            export.holders.discard(holder)
            if export.ref is None and not export.holders:
                self._free(export)

    def close_locked(self) -> None:
        """Free every export and the board. Under the lock."""
        for export in list(self.by_serial.values()) + list(self.by_object.values()):
            self._free(export)
        if self.board is not None:
            self.board.close()
            self.board = None
        self.warm.clear()

    def abandon(self) -> None:
        """In a forked child: close the inherited descriptors, change nothing shared."""
        for export in {*self.by_serial.values(), *self.by_object.values()}:
            export.seg.close()
        self.warm.abandon()
        if self.board is not None:
            with contextlib.suppress(Exception):
                self.board.words.release()
                self.board.map.close()
            close_quietly(self.board.fd)
        self.by_ref, self.by_object, self.by_serial = {}, {}, {}
        self.board = None

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

    def counts_locked(self) -> dict[str, int]:
        """Exports made, live and dormant. Under the lock."""
        exports = {*self.by_serial.values(), *self.by_object.values()}
        return {
            "exports": self.exported,
            "live_exports": len(exports),
            "dormant_exports": sum(1 for e in exports if e.ref is None),
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
        raise PicklingFailed(f"the sharing process could not pickle it ({err!r})") from err
    return store.write(p, what)
