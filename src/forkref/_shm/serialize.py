"""Serialize an object into one segment; rebuild it from a mapping with zero copy.

Pickle protocol 5 splits an object into a small in-band stream and its large
contiguous buffers (numpy arrays, pandas blocks, arrow buffers), handed over
as ``PickleBuffer`` objects instead of copied into the stream. Here both go
into one segment::

    0        header: magic, generation, buffer count, in-band offset and
             length, then (offset, length) of every buffer
    64*k     in-band pickle stream
    64*k'    buffer 0      each buffer starts on a 64-byte boundary
    64*k''   buffer 1      (cache lines; SIMD kernels and arrow like them)
    ...

The segment is self-describing: a reader needs only the mapping. The
*generation* names one use of a segment the warm store reuses
(:mod:`forkref._shm.warm`): a reader that expects another generation refuses
the segment, so a reused segment never passes one object's bytes off as
another's. Rebuilding
hands ``pickle.loads`` read-only slices of the mapping as the buffers, so
numpy arrays, pandas blocks and arrow buffers point straight into the shared
pages (zero copy) and are read-only: numpy refuses writes, pandas
copy-on-write copies first, and the mapping itself is ``PROT_READ``, so no
write can reach memory other processes see. Only the in-band part (the
object graph around the buffers, or all of an object with no buffers, such
as a dict) is deserialized, once per process by the callers' caches.

Package API:
    Plan, plan(obj) -> Plan            pickle without copying buffers; plan the layout
    write(plan, fd, what, gen=0)       copy the plan into a fresh segment (pwrite)
    write_into(plan, view, gen)        copy it into a mapped segment being reused,
                                       zeroing every byte between the parts
    rebuild(mapping, gen=None)         zero-copy rebuild from a read-only mapping;
                                       SegmentReused if the generation differs

Limits: only contiguous buffers are zero-copy. Python objects inside a
container are pickled in band and rebuilt in every process that reads the
segment: object-dtype columns (pandas 2's default for strings; pandas 3
stores strings in arrow buffers), lists and dicts, non-contiguous arrays.
Use ``dtype="string[pyarrow]"`` (or pandas 3) for big string columns.

Non-goals: this is not a storage format (no versioning across forkref
releases, no endianness marker); writer and reader are the same program.
"""

from __future__ import annotations

import mmap
import pickle
import struct
from dataclasses import dataclass

from forkref._errors import SharedMemoryError
from forkref._shm import segments

__all__ = ["ALIGN", "Plan", "SegmentReused", "plan", "rebuild", "write", "write_into"]

ALIGN = 64
_MAGIC = b"FORKREF\x02"
# magic, generation, buffer count, in-band offset, in-band length
_HEAD = struct.Struct("<8sQQQQ")
_SPAN = struct.Struct("<QQ")  # offset, length of one buffer


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Plan:
    """An object pickled out-of-band, with the place of every part in the segment.

    Attributes:
        inband: the in-band pickle stream.
        buffers: the out-of-band buffers, as flat byte views of the object's memory.
        offsets: segment offset of each buffer (64-byte aligned).
        inband_offset: segment offset of the in-band stream.
        size: total segment size in bytes.
    """

    inband: bytes
    buffers: tuple[memoryview, ...]
    offsets: tuple[int, ...]
    inband_offset: int
    size: int

    def header(self, generation: int = 0) -> bytes:
        """The segment header describing this layout, for use ``generation``."""
        head = _HEAD.pack(
            _MAGIC, generation, len(self.buffers), self.inband_offset, len(self.inband)
        )
        spans = b"".join(
            _SPAN.pack(off, buf.nbytes) for off, buf in zip(self.offsets, self.buffers, strict=True)
        )
        return head + spans

    @property
    def buffer_bytes(self) -> int:
        """Bytes held in out-of-band buffers."""
        return sum(buf.nbytes for buf in self.buffers)


def plan(obj: object) -> Plan:
    """Pickle ``obj`` with protocol 5, keeping its contiguous buffers out of band.

    The buffers are views of the object's own memory: nothing big is copied
    here. Raises whatever ``pickle`` raises for an unpicklable object.
    """
    buffers: list[memoryview] = []

    def take(pb: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(pb.raw())
        except BufferError:
            return True  # not contiguous: let pickle copy it in band
        return False

    inband = pickle.dumps(obj, protocol=5, buffer_callback=take)
    inband_offset = _align(_HEAD.size + _SPAN.size * len(buffers))
    cursor = _align(inband_offset + len(inband))
    offsets = []
    for buf in buffers:
        offsets.append(cursor)
        cursor = _align(cursor + buf.nbytes)
    return Plan(inband, tuple(buffers), tuple(offsets), inband_offset, max(cursor, ALIGN))


class SegmentReused(SharedMemoryError):
    """The segment holds another generation than the reader was promised."""


def write(p: Plan, fd: int, what: str, generation: int = 0) -> None:
    """Copy the header, the in-band stream and every buffer into the fresh segment ``fd``."""
    segments.write_at(fd, 0, p.header(generation), what)
    segments.write_at(fd, p.inband_offset, p.inband, what)
    for off, buf in zip(p.offsets, p.buffers, strict=True):
        segments.write_at(fd, off, buf, what)


def write_into(p: Plan, view: memoryview, generation: int, end: int) -> None:
    """Copy the plan into ``view`` (a writable mapping of a segment being reused).

    Every byte up to ``end`` that the plan does not cover (alignment gaps,
    the rest of the last page) is zeroed: a reader of this use must not find
    bytes of an earlier one, even between the parts.
    """
    parts: list[tuple[int, bytes | memoryview]] = [
        (0, p.header(generation)),
        (p.inband_offset, p.inband),
        *zip(p.offsets, p.buffers, strict=True),
    ]
    cursor = 0
    for off, data in parts:
        _zero(view, cursor, off)
        n = memoryview(data).nbytes
        view[off : off + n] = memoryview(data).cast("B")
        cursor = off + n
    _zero(view, cursor, end)


_ZEROS = bytes(1 << 16)


def _zero(view: memoryview, start: int, stop: int) -> None:
    while start < stop:
        n = min(stop - start, len(_ZEROS))
        view[start : start + n] = _ZEROS[:n]
        start += n


def rebuild(mapping: mmap.mmap, generation: int | None = None) -> object:
    """Rebuild the object in a segment; its buffers stay views of ``mapping``.

    With ``generation``, refuse (:class:`SegmentReused`) a segment written
    for another use. The mapping stays alive as long as any rebuilt buffer
    does, and is unmapped when the last one dies.
    """
    view = memoryview(mapping)
    try:
        if generation is not None and _generation(view) != generation:
            raise SegmentReused(
                f"the segment holds generation {_generation(view)}, not {generation}: "
                "its object was released and the segment reused"
            )
        inband, buffers = _parts(view)
        return pickle.loads(inband, buffers=buffers)
    finally:
        view.release()


def _generation(view: memoryview) -> int:
    if view.nbytes < _HEAD.size:
        return -1
    return int(_HEAD.unpack_from(view, 0)[1])


def _parts(view: memoryview) -> tuple[memoryview, list[memoryview]]:
    size = view.nbytes
    if size < _HEAD.size:
        raise SharedMemoryError(f"corrupt forkref segment: {size} bytes is smaller than a header")
    magic, _generation, count, inband_off, inband_len = _HEAD.unpack_from(view, 0)
    if magic != _MAGIC or _HEAD.size + count * _SPAN.size > size:
        raise SharedMemoryError("corrupt forkref segment: bad header")
    spans = [_SPAN.unpack_from(view, _HEAD.size + i * _SPAN.size) for i in range(count)]
    for off, length in [(inband_off, inband_len), *spans]:
        if off + length > size:
            raise SharedMemoryError("corrupt forkref segment: a part lies past its end")
    # Slices of a slice keep the mmap exported, not the outer view, so
    # releasing ``view`` afterwards is fine.
    return view[inband_off : inband_off + inband_len], [
        view[off : off + length] for off, length in spans
    ]
