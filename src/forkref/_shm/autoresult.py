"""Big task results back through shared memory, with no change to the task.

How data flows::

    worker (forkref._engine.worker)                 parent (forkref._engine.outcomes)
    -------------------------------                 ---------------------------------
    dumps(result, threshold): a pickler whose       pickle.loads(reply) calls, for each
      reducer_override finds every numpy array,       segment, receive(path, size, type):
      pandas DataFrame/Series and arrow table or      open it, unlink the name at once,
      array of >= threshold bytes anywhere in the     map it MAP_PRIVATE (copy-on-write):
      result; each is written into an unnamed        an ordinary writable object, private
      segment, which gets a result name (janitor-     to the parent; its memory goes when
      watched) only once it is complete  ---------->  the object dies

A worker that dies while writing leaves nothing (the segment has no name
yet); one that dies after naming segments but before sending the reply
naming them leaves nothing either (the janitor watches the worker alone
until :func:`hand_over`, just before the send). After that the janitor watches the *pool's parent*
(:func:`serve` names it), not the worker nor whatever forked it (a fork
server, a forkserver): those may all exit before the parent reads the
reply, and the result must still be there; if the parent dies first, the
janitor unlinks it. A reply the parent never reads (a terminated pool) is
swept when the pool ends: names carry the pool's key (:func:`sweep`).
Anything that cannot go through a segment (no room, no ``O_TMPFILE``) is
pickled into the reply, like any other result: it always arrives, and the
first time in a process one :class:`forkref.PerformanceWarning` says why
and what frees the way.

Package API:
    DEFAULT_THRESHOLD                  1 MiB, as the pools' share_threshold
    serve(owner, key)                  in a worker: results go to pid owner, names carry key
    dumps(obj, threshold) -> bytes     a reply, big buffers in segments
    hand_over()                        call just before that reply is sent
    sweep(key)                         in the parent, once no reply will be read: the rest go
    receive(path, size, typename)      the parent's side (pickled by reference)

Non-goals: results are not reused segments (the warm store is for exports);
object-dtype arrays and other pure-Python data are pickled as usual.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import pickle
import warnings
from typing import Any

from forkref._errors import PerformanceWarning, SharedMemoryError, SharedMemoryFullError
from forkref._shm import segments, serialize

__all__ = ["DEFAULT_THRESHOLD", "dumps", "hand_over", "receive", "serve", "sweep"]

DEFAULT_THRESHOLD = 1 << 20  # as share_threshold: below it, a pipe is as fast


_unsent: list[str] = []  # named, but the reply naming them is not sent yet
_owner: int | None = None  # the process results go to (None: this one's parent)
_key = ""  # the pool's, in every result name
_warned_in: int | None = None  # the pid that said a result went through the pipe


def serve(owner: int, key: str) -> None:
    """In a pool worker: its results go to process ``owner``; their names carry ``key``."""
    global _owner, _key
    _owner, _key = owner, key


def hand_over() -> None:
    """The reply is about to be sent: its segments must now outlive this worker (and
    whatever forked it) until the owner opens them; until now a worker's death unlinked
    them. Called before the send, not after: the parent may have the reply, and kill
    this worker, before a call after the send would run (a result lost). A worker that
    dies between the two leaves its segments to the pool's end (:func:`sweep`)."""
    if _unsent:
        paths = _unsent[:]
        del _unsent[:]
        segments.hand_over(paths, _owner)


def sweep(key: str) -> int:
    """In a pool's parent that will read no more replies: unlink the results of the pool
    whose names carry ``key`` (replies never read); how many."""
    return segments.sweep(key)


def dumps(obj: object, threshold: int | None) -> bytes:
    """Pickle a task's reply; big numpy/pandas/arrow parts travel in segments.

    ``threshold`` None: plain pickling. If pickling fails after segments were
    written, they are unlinked before the error propagates.
    """
    if threshold is None:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    buf = io.BytesIO()
    pickler = _ResultPickler(buf, threshold)
    try:
        pickler.dump(obj)
    except BaseException:
        for path in pickler.written:
            with contextlib.suppress(OSError):
                os.unlink(path)
            _unsent.remove(path)
        raise
    return buf.getvalue()


class _ResultPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, threshold: int) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.threshold = threshold
        self.written: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        nbytes = big_nbytes(obj)
        if nbytes is None or nbytes < self.threshold:
            return NotImplemented
        typename = f"{type(obj).__module__}.{type(obj).__qualname__}"
        try:
            path, size = _write(obj, f"a {typename} result")
        except (SharedMemoryError, OSError) as err:
            _warn_once(typename, err)
            return NotImplemented  # pickled into the reply: the result still arrives
        self.written.append(path)
        _unsent.append(path)
        return receive, (path, size, typename)


_ARROW = {"Table", "RecordBatch", "ChunkedArray"}  # and every *Array, below


def big_nbytes(obj: object) -> int | None:
    """Bytes of a numpy/pandas/arrow object held in buffers; None for other types.

    Read from the type's module name: nothing is imported here.
    """
    module = type(obj).__module__.split(".", 1)[0]
    if module == "numpy" and type(obj).__name__ == "ndarray":
        return None if obj.dtype.hasobject else int(obj.nbytes)  # type: ignore[attr-defined]
    if module == "pandas" and type(obj).__name__ in ("DataFrame", "Series"):
        usage = obj.memory_usage(index=True, deep=False)  # type: ignore[attr-defined]
        return int(usage.sum()) if hasattr(usage, "sum") else int(usage)
    name = type(obj).__name__
    if module == "pyarrow" and (name in _ARROW or name.endswith("Array")):
        return int(obj.nbytes)  # type: ignore[attr-defined]
    return None


def _write(obj: object, what: str) -> tuple[str, int]:
    """Serialize ``obj`` into a new segment; name it once complete. (path, size)."""
    p = serialize.plan(obj)
    fd = segments.create_anonymous(p.size, what, _no_room_fixes())
    try:
        serialize.write(p, fd, what)
        return segments.publish(fd, what, _key), p.size
    finally:
        os.close(fd)


def _no_room_fixes() -> str:
    room = segments.room_fix(segments.segment_dir())
    return f"Fixes: {room}; or pass result_threshold=None to the pool, to send results by pipe"


def _warn_once(typename: str, err: Exception) -> None:
    """Say once per process that big results go through the pipe, and why."""
    global _warned_in
    if _warned_in == os.getpid():
        return
    _warned_in = os.getpid()
    # A full directory's error already carries the fixes (_no_room_fixes).
    fixes = (
        ""
        if isinstance(err, SharedMemoryFullError)
        else (
            " Fix the segment directory, or pass result_threshold=None to the pool to stop "
            "trying shared memory for results"
        )
    )
    warnings.warn(
        f"a {typename} result went back through the pipe (pickled), not shared memory, "
        f"and later big results from this process may too: {err}.{fixes}",
        PerformanceWarning,
        stacklevel=2,
    )


def receive(path: str, size: int, typename: str) -> object:
    """In the parent: the result in segment ``path``, as a writable private copy-on-write
    mapping; the name is gone at once, the memory when the object dies.

    Raises:
        SharedMemoryError: the segment is gone (its worker and the parent's
            predecessor died) or is not forkref's.
    """
    fd, found = segments.open_and_unlink(path, f"a {typename} result")
    try:
        if found < size:
            raise SharedMemoryError(
                f"the segment for a {typename} result holds {found} bytes, not {size}"
            )
        # Private: writes land in the parent's own pages, never in the segment.
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return serialize.rebuild(mapping)
