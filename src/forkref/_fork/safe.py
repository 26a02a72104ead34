"""Forking a generation of pool workers safely from a process that has threads.

A generation's fork server (zygote) is forked from the caller's thread. Around
that one ``fork()``:

* ``FORK_LOCK`` serializes generation forks of every engine in the process;
* every forkref dispatcher thread is paused (:func:`paused_threads`), and the
  shared-memory export thread too (:func:`forkref._shm.export.paused`), so no forkref thread
  exists in the child and none holds a forkref lock there;
* ``gc.freeze()`` is on (:func:`frozen_gc`), so the child's collections never
  scan, and so never dirty, the parent's objects;
* threads that are not forkref's (nor an IPython kernel's own) are reported
  by a :class:`~forkref.ForkWarning` in forkref's words, once per call site
  (:mod:`forkref._fork.threads`), instead of Python 3.12's generic
  multi-threaded-fork ``DeprecationWarning``;
* stdout and stderr are flushed, and a kernel's stream locks held, across
  the ``os.fork()`` itself (``_threads.fork_safe_stdio``).

:func:`fork_child` does the fork itself and runs the child's main function,
which never returns. Everything here runs in the parent; the child only gets
:func:`reset_in_child`.

Non-goals: forkref cannot make other libraries' threads fork-safe; it says
they exist.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from typing import Any, NoReturn, Protocol

from forkref._errors import ForkError
from forkref._fork import threads as _threads
from forkref._os import wait_os_thread_gone  # re-exported: the _engine threads join with it

__all__ = [
    "FORK_LOCK",
    "Pausable",
    "default_context",
    "fork_child",
    "frozen_gc",
    "is_dispatcher",
    "mark_dispatcher",
    "paused_threads",
    "register_pausable",
    "wait_os_thread_gone",
]

#: Serializes generation forks, and the pause of forkref threads around them.
#: Re-entrant: ``gc.collect()`` at a fork may finalize a pool, which closes it.
FORK_LOCK = threading.RLock()


class Pausable(Protocol):
    """A forkref part that runs a thread which must not exist across a fork."""

    def pause_thread(self) -> bool:
        """Stop the thread; True if one was running (and must be resumed)."""

    def resume_thread(self) -> None:
        """Start the thread again."""

    def owned_by_this_process(self) -> bool:
        """False in a plain ``fork()`` child that inherited the object."""


_PAUSABLE: weakref.WeakSet[Any] = weakref.WeakSet()
#: Threads that were detached rather than joined by a pause (see forkref._engine.dispatcher);
#: alive until they return from user callbacks, so they count as foreign at a fork.
DETACHED: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_local = threading.local()


def register_pausable(part: Pausable) -> None:
    """Have ``part``'s thread paused around every generation fork of this process."""
    _PAUSABLE.add(part)


def default_context() -> BaseContext:
    """The fork context where the platform has it (whatever the default), else the default."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def mark_dispatcher() -> None:
    """Mark the calling thread as a dispatcher: it must never wait for a dispatcher."""
    _local.dispatcher = True


def is_dispatcher() -> bool:
    """Whether the calling thread is a dispatcher (owning or detached)."""
    return bool(getattr(_local, "dispatcher", False))


@contextlib.contextmanager
def paused_threads(current: Pausable | None = None) -> Iterator[None]:
    """Pause every forkref thread (call under FORK_LOCK) around a fork.

    Resumes them whatever happens, even an interrupt in the middle of the
    pausing; ``current`` is left to resume its own (it may have to decide
    first whether it still has work).
    """
    paused: list[Pausable] = []
    try:
        for part in list(_PAUSABLE):
            if part.owned_by_this_process() and part.pause_thread():
                paused.append(part)
        yield
    finally:
        for part in paused:
            if part is not current:
                part.resume_thread()


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """``gc.freeze()`` around a generation fork, as CPython's gc docs recommend.

    Unlike :func:`forkref.fork_hygiene` this skips the full ``gc.collect()``
    first: on a big heap it costs ~10 ms per million tracked objects (18 ms
    with pandas merely imported), paid at every generation fork. Freezing
    alone gives the child a clean gc state; garbage frozen with the live
    objects is only a child's copy-on-write share, and the parent unfreezes
    right after. If the caller already froze (``fork_hygiene()``), leave it.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def fork_child(child_main: Callable[[], object], what: str) -> int:
    """Fork from the calling thread and run ``child_main`` in the child; return its pid.

    Call under :data:`FORK_LOCK`, with forkref's threads paused. The child
    never returns from here: it exits with status 0, or 1 if ``child_main``
    raised.

    Raises:
        ForkError: ``os.fork()`` failed (EAGAIN, ENOMEM).
    """
    spoken = _warn_foreign_threads()
    with frozen_gc(), warnings.catch_warnings():
        if spoken:
            # Other threads run and forkref spoke for them; without them the
            # warning stays on, so a forkref thread left running by mistake shows.
            warnings.filterwarnings(
                "ignore", message=".*multi-threaded.*fork", category=DeprecationWarning
            )
        try:
            with _threads.fork_safe_stdio():  # no pending output, no held stream lock
                pid = os.fork()
        except OSError as err:
            raise ForkError(
                f"cannot fork {what}: {err!r}; the task was not run. Free memory or processes "
                "(ulimit -u, overcommit) and submit it again"
            ) from err
        if pid == 0:
            _run_child(child_main)
    return pid


def _run_child(child_main: Callable[[], object]) -> NoReturn:
    code = 0
    try:
        reset_in_child()
        child_main()
    except BaseException:
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def reset_in_child() -> None:
    """In a new fork server: forget the parent's pools and its (held) fork lock.

    A worker may make a pool of its own; it must not wait for the parent's
    lock or pause the parent's (non-existent here) threads.
    """
    global FORK_LOCK
    FORK_LOCK = threading.RLock()
    _PAUSABLE.clear()
    DETACHED.clear()


def _native_threads() -> int:
    """Threads of this process as the kernel counts them (Python 3.12+ warns from this count).

    More than Python knows of means native threads: a BLAS thread pool that
    numpy started, say. Those libraries handle fork themselves (their own
    ``pthread_atfork`` hooks), so forkref silences the warning they would
    cause without a warning of its own.
    """
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _warn_foreign_threads() -> bool:
    """Warn about foreign threads; True if threads other than forkref's paused ones run."""
    # Threads named "forkref-*" belong to forkref's parts, which stop them
    # themselves (paused above, or in their own os.register_at_fork hooks).
    current = threading.current_thread()
    others = [
        t for t in threading.enumerate() if t is not current and not t.name.startswith("forkref-")
    ]
    detached = [t for t in list(DETACHED) if t.is_alive() and t is not current]
    _threads.warn_foreign_threads(_threads.threads_to_warn_about(others))
    return bool(others or detached) or _native_threads() > threading.active_count()
