"""gc hygiene around fork: keep the parent's objects shared with its children.

CPython's garbage collector writes to the header of every container object
it examines. In a forked child a collection therefore dirties the pages of
every gc-tracked object inherited from the parent, and the child ends with a
private copy of them. CPython documents the remedy (``gc`` module docs):
collect, then ``gc.freeze()`` right before ``fork()``, which moves every
tracked object to a permanent generation that collections ignore; the child
then starts with empty young generations (a clean gc state) and only ever
scans what it allocates itself.

Non-goals: this does nothing for reference counts. Reading an object writes
its refcount, so a worker that touches many small inherited objects still
copies their pages; compact containers address that.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["fork_hygiene"]

_lock = threading.Lock()
_depth = 0
_froze = False
# Objects the interpreter itself leaves frozen (375 on CPython 3.12.1, none on
# 3.10, 3.11 or 3.13). A freeze count above this at entry means the caller froze
# objects of their own, which fork_hygiene must leave frozen.
_BASELINE_FROZEN = gc.get_freeze_count()


@contextlib.contextmanager
def fork_hygiene() -> Iterator[None]:
    """Freeze the gc state while forking workers, so they keep pages shared.

    On entry: ``gc.collect()`` (no garbage is frozen in) then ``gc.freeze()``.
    On exit: ``gc.unfreeze()``, restoring the parent's normal collections,
    unless the caller had frozen objects before the outermost entry (then
    they stay frozen, as the caller left them; a freeze made before forkref
    was imported cannot be told apart and is undone). Blocks nest.

    Wrap the point where a stdlib pool forks: the constructor of
    ``multiprocessing.Pool``, or the first ``submit()`` of a
    ``ProcessPoolExecutor``; wrapping the whole ``with`` block of the pool
    is simplest::

        with forkref.fork_hygiene(), get_context("fork").Pool(2) as pool:
            pool.map(work, [forkref.share(big)] * 8)
    """
    global _depth, _froze
    with _lock:
        if _depth == 0:
            _froze = gc.get_freeze_count() <= _BASELINE_FROZEN
            gc.collect()
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _froze:
                gc.unfreeze()
