"""Big task results of a ``backend="ray"`` pool travel through Ray's object store, not the reply.

How data flows::

    actor (RayWorker.run)                          driver (RayChannel, then the engine)
    ---------------------                          ------------------------------------
    dumps(result, threshold, parts): each numpy
      array, pandas DataFrame/Series and arrow
      table or array of >= threshold bytes is
      left out of the pickled reply: it goes
      into ``parts`` as (token, object) and the
      pickle holds receive(token, type)
    run() returns (replies, parts): Ray puts  -->  the call's return value: Ray hands each
      the parts' buffers in the object store        part's buffers zero-copy, read-only, out
      with its own pickle-5 route (one copy)        of the store; the channel files them under
                                                    their tokens (arrive) as it hands the
                                                    replies to the engine
                                                   the engine's pickle.loads calls
                                                    receive(token): the part, made writable
                                                    (below); the store's view is dropped

The parts are *returned* by the call, not ``ray.put`` by the actor: the
driver owns what its calls return, so a part survives its actor (an actor
retired by ``maxtasksperchild`` or ended with the pool right after replying),
and Ray frees the store entry as soon as nothing in the driver uses it. A
reply that fails to pickle leaves nothing behind: its parts were never
returned.

**Writable, as the stdlib gives them.** Ray's store hands numpy buffers
read-only and cannot map them copy-on-write, while a result from
``multiprocessing`` (or from a local forkref pool) is an ordinary writable
object that code updates in place (``arr += 1``, ``df.loc[...] = ...``). So
:func:`receive` copies a read-only numpy array or pandas object once, in the
driver, at memory speed; this replaces the pickle, the pipe and the unpickle
of the old route (about four copies) with two, and frees the store entry at
once. Arrow tables and arrays are immutable by design: they are handed over
as Ray gives them, zero-copy, and hold their store entry until they die.

Non-goals: results never go through forkref's segments on this backend (an
actor may run on another machine); object-dtype arrays and other pure-Python
data are pickled into the reply as usual.
"""

from __future__ import annotations

import io
import pickle
import secrets
import threading
from collections.abc import Iterable
from typing import Any

from forkref._errors import Error
from forkref._shm.autoresult import big_nbytes

__all__ = ["arrive", "discard", "dumps", "receive"]

Parts = list[tuple[str, object]]

# token -> part, filed by a channel as its replies leave for the engine's decode.
_arrived: dict[str, object] = {}
_lock = threading.Lock()


def dumps(obj: object, threshold: int | None, parts: Parts) -> bytes:
    """Pickle a reply for the driver; big parts go to ``parts`` instead (``threshold`` None: none).

    Plain pickle first (fastest); then Ray's cloudpickle, which also sends
    classes defined in the driver's ``__main__`` (they reached the actor by
    value) back by value. ``parts`` grows only if the reply pickled.
    """
    found: Parts = []
    try:
        data = _dump(pickle.Pickler, obj, threshold, found)
    except Exception:
        from ray import cloudpickle

        found.clear()
        data = _dump(cloudpickle.Pickler, obj, threshold, found)
    parts.extend(found)
    return data


def _dump(base: type, obj: object, threshold: int | None, found: Parts) -> bytes:
    buf = io.BytesIO()
    if threshold is None:
        base(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    else:
        _parts_pickler(base)(buf, threshold, found).dump(obj)
    return buf.getvalue()


_picklers: dict[type, type] = {}


def _parts_pickler(base: type) -> Any:
    """``base`` (pickle's or cloudpickle's Pickler) that leaves big parts out."""
    made = _picklers.get(base)
    if made is not None:
        return made

    class PartsPickler(base):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO, threshold: int, found: Parts) -> None:
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            self.threshold, self.found = threshold, found

        def reducer_override(self, obj: Any) -> Any:
            nbytes = big_nbytes(obj)
            if nbytes is not None and nbytes >= self.threshold:
                token = secrets.token_hex(16)
                self.found.append((token, obj))
                return receive, (token, f"{type(obj).__module__}.{type(obj).__qualname__}")
            # cloudpickle's Pickler has its own; pickle's has none.
            parent = getattr(super(), "reducer_override", None)
            return NotImplemented if parent is None else parent(obj)

    _picklers[base] = PartsPickler
    return PartsPickler


def arrive(parts: Parts, earlier: Iterable[str] = ()) -> set[str]:
    """In the driver: file a call's parts for :func:`receive` (the replies naming them
    follow); the tokens of those and of ``earlier`` not received yet."""
    with _lock:
        _arrived.update(parts)
        return {t for t in earlier if t in _arrived} | {token for token, _ in parts}


def discard(tokens: Iterable[str]) -> None:
    """Drop parts whose replies were never decoded (a channel closing). Idempotent."""
    with _lock:
        for token in tokens:
            _arrived.pop(token, None)


def receive(token: str, typename: str) -> object:
    """In the driver (called by the reply's unpickling): the part, writable as the stdlib's.

    Raises:
        Error: no part under ``token`` (the reply was unpickled twice, or
            outside the pool that received it).
    """
    with _lock:
        part = _arrived.pop(token, None)
    if part is None:
        raise Error(
            f"the {typename} of a Ray task's result is not in this process: a reply of a "
            "backend='ray' pool can be unpickled once, by the pool that received it"
        )
    return _writable(part)


def _writable(part: Any) -> object:
    """A numpy array or pandas object the driver may write to: copied once if Ray's is read-only."""
    module = type(part).__module__.split(".", 1)[0]
    if module == "numpy":
        return part if part.flags.writeable else part.copy(order="K")
    if module == "pandas":
        return part.copy(deep=True)  # its blocks are views of the read-only store buffers
    return part  # arrow: immutable, zero-copy
