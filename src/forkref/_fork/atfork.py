"""No forkref thread alive at any fork of the process, the stdlib's forks included.

Python 3.12+ warns "This process ... is multi-threaded, use of fork() may lead
to deadlocks in the child" when ``os.fork()`` runs beside other threads. 3.12
counts the threads before the parent's at-fork hooks run, 3.13 after them
(checked on 3.12.1 and 3.13.0: a thread started in an ``after_in_parent``
hook warns on 3.13 only). So a
forkref thread must be stopped in the ``before`` hook, joined down to the
kernel's thread list, and on 3.13 must not be started again until
``os.fork()`` has returned::

    thread T calls os.fork()
      before hooks            forkref parts stop their threads and join them
                              (the export thread; MemorySamplers, via pause_at_every_fork)
      fork()
      after_in_parent hooks   each part asks after_fork_returns(restart)
      (3.13 counts threads)   only T and whatever is not forkref's
    os.fork() returns in T    the first event T's profile function sees in the
                              frame that called fork (or a later one) runs the restarts;
                              the profile function removes itself

Before 3.13 ``after_fork_returns`` runs the restart at once, in the hook: the
threads are counted before it. Where the frame that forked cannot be found,
or a profile function is already set in T (a Python-level profiler), the
restart also runs at once: the parts keep serving, and 3.13 may warn.

Non-goals: threads of other libraries; forks made by C code that runs no
at-fork hooks (``posix_spawn``, ``subprocess`` without ``preexec_fn``), which
copy no thread and need none of this.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

from forkref._fork.safe import Pausable

__all__ = ["after_fork_returns", "pause_at_every_fork"]

# True where the multi-threaded fork check runs after the parent's at-fork hooks.
_COUNTS_AFTER_HOOKS = sys.version_info >= (3, 13)

_local = threading.local()  # .pending: restarts waiting for this thread's fork to return


def after_fork_returns(restart: Callable[[], None]) -> None:
    """From an ``after_in_parent`` hook: run ``restart`` once ``os.fork()`` has returned.

    Call it from the hook function itself: the frame below the hook's is the
    one that forked.

    On Python 3.13+ it runs in the forking thread, at the first profile event
    after the fork returned (never before Python has counted the threads);
    before 3.13, and where that cannot be arranged, it runs now. An exception
    from ``restart`` is reported by ``sys.unraisablehook``, as one from an
    at-fork hook would be, never raised into the code that forked.
    """
    pending: list[Callable[[], None]] | None = getattr(_local, "pending", None)
    if pending is not None:  # another part already waits for this same fork
        pending.append(restart)
        return
    caller = _forking_frame() if _COUNTS_AFTER_HOOKS else None
    if caller is None or sys.getprofile() is not None:
        _run([restart])
        return
    _local.pending = [restart]
    sys.setprofile(_Watch(caller))


def _forking_frame() -> FrameType | None:
    """The Python frame that called ``os.fork()``, or None if there is none.

    Frames: this function, after_fork_returns, the at-fork hook (called from C
    inside os.fork()), then the frame that called os.fork().
    """
    try:
        return sys._getframe(3)
    except ValueError:
        return None


class _Watch:
    """A one-shot profile function: waits until ``os.fork()`` has returned in its frame."""

    def __init__(self, caller: FrameType) -> None:
        self.caller = caller
        self.fork_at = caller.f_lasti  # the CALL of os.fork, while it runs

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        returned = frame is self.caller and event in ("c_return", "c_exception", "return")
        if not returned and self.caller.f_lasti == self.fork_at:
            return  # still inside os.fork(): another at-fork hook, or the warning itself
        sys.setprofile(None)
        pending, _local.pending = _local.pending, None
        _run(pending)


def _run(restarts: list[Callable[[], None]]) -> None:
    for restart in restarts:
        try:
            restart()
        except Exception as err:
            sys.unraisablehook(cast(Any, _Unraisable(err, restart)))


class _Unraisable:
    """What ``sys.unraisablehook`` reads (the shape of ``sys.UnraisableHookArgs``)."""

    def __init__(self, err: Exception, restart: Callable[[], None]) -> None:
        self.exc_type, self.exc_value = type(err), err
        self.exc_traceback = err.__traceback__
        self.err_msg = "Exception ignored in forkref's restart after fork"
        self.object = restart


# -- parts paused at every fork --------------------------------------------------------

_parts: weakref.WeakSet[Any] = weakref.WeakSet()
# Held from the before hook to the after hooks, and by a deferred restart: a
# restart never lands between another thread's before hook and its fork.
_lock = threading.RLock()
_hooked = False


def pause_at_every_fork(part: Pausable) -> None:
    """Stop ``part``'s thread before every fork of this process; restart it after.

    For forkref threads a user starts (a MemorySampler): a fork made anywhere,
    a stdlib pool's included, never copies them, and never warns because of them.
    """
    global _hooked
    _parts.add(part)
    if not _hooked:
        _hooked = True
        os.register_at_fork(
            before=_before_fork,
            after_in_parent=_after_fork_parent,
            after_in_child=_after_fork_child,
        )


def _before_fork() -> None:
    _lock.acquire()
    paused = []
    for part in list(_parts):
        if part.owned_by_this_process() and part.pause_thread():
            paused.append(part)
    _local.paused = paused


def _after_fork_parent() -> None:
    try:
        paused, _local.paused = getattr(_local, "paused", []), []
        if paused:
            after_fork_returns(lambda: _resume(paused))
    finally:
        _lock.release()


def _resume(parts: list[Any]) -> None:
    with _lock:
        for part in parts:
            part.resume_thread()


def _after_fork_child() -> None:
    global _lock
    # The child has no thread of the parent's; what it inherited is not its own
    # (owned_by_this_process() says so), and the lock may be held by no one here.
    _lock = threading.RLock()
    _local.paused = []
    _local.pending = None
