"""Which running threads make a fork unsafe, and the :class:`~forkref.ForkWarning` about them.

``fork()`` copies only the forking thread. A lock that another thread holds at
that instant stays held forever in the child, which hangs the first time it
takes it. forkref pauses its own threads around its forks (the engine); this
module judges everyone else's, and is what the engine calls before each fork::

  engine, before os.fork()                  this module
  ------------------------                  -----------
  threads other than forkref's  --------->  threads_to_warn_about(): drop the
                                            kernel's service threads, tqdm's monitor
                                <---------  the foreign ones
  warn_foreign_threads(foreign) --------->  one ForkWarning per call site
  with fork_safe_stdio():                   holds tqdm's lock, flushes stdout/stderr,
      os.fork()                             holds the kernel's stream locks

**The service threads of an IPython kernel do not make forkref's forks unsafe**,
so a notebook user sees no warning for them. ipykernel 7.4 with IPython 9.18
runs ``Heartbeat``, ``Control``, ``Shell channel``, ``IOPub``, one
``_watch_pipe_fd`` thread per captured std stream, the parent poller and
IPython's ``IPythonHistorySavingThread``. Recognised by their classes, or as
the threads the kernel's ``sys.stdout`` owns, never by name. Why a fork is safe
with them running:

* The one Python lock among theirs that a forked worker takes is the
  ``_buffer_lock`` of ``sys.stdout``/``sys.stderr`` (ipykernel's ``OutStream``),
  on every ``print()``. It *can* be inherited held: a thread preempted inside
  a ``print()`` holds it. forkref therefore takes both locks around its own
  forks (:func:`kernel_stream_locks`), so no child inherits them held.
* The other threads wait in C (zmq, epoll, sqlite, ``os.read``) and hold only
  C-level mutexes of objects no child touches: a worker's output leaves through
  a zmq context that ipykernel creates afresh in the child, never through the
  parent's sockets. IPython stops its history thread itself before every fork
  (its own ``os.register_at_fork`` hook).
* Measured (``python benchmarks/fork_while_printing.py --pools 500 --raw-forks
  4000``, Python 3.11, ipykernel 7.4) while another cell's thread printed 21
  million lines through IOPub: 1 of 4,000 bare ``os.fork()`` children inherited
  the stdout lock held (it would have hung at its first ``print()``), 0 of
  4,000 with the locks taken; 500 ``forkref.Pool(2)`` pools (1,500 forks) whose
  workers all printed: none hung, none inherited a held lock.
  ``tests/test_notebook.py`` also holds the lock from a thread on purpose: the
  workers hang without forkref's locks and finish with them.

**tqdm's ``tqdm_monitor`` thread** (started by the first bar, alive until
exit) does not make the forks unsafe either: it sleeps outside tqdm's lock and
touches bars only under it, and forkref holds that lock across its forks
(:func:`tqdm_locks`), so no worker inherits it held.

Threads that run user code (the main thread's other threads, ipykernel's
subshell threads) are foreign and warn. On a free-threaded build (no GIL) the
kernel's threads warn too: the reasoning above has only been measured with
the GIL.

Non-goals: native threads (BLAS, arrow) are not judged here; they handle fork
with their own ``pthread_atfork`` hooks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from forkref._errors import ForkWarning

__all__ = [
    "fork_safe_stdio",
    "kernel_stream_locks",
    "kernel_threads",
    "threads_to_warn_about",
    "tqdm_locks",
    "tqdm_monitors",
    "warn_foreign_threads",
]

# (module, class) of the kernel's service threads; looked up in sys.modules only,
# never imported: without IPython loaded there is nothing to recognise.
_SERVICE_THREAD_CLASSES = (
    ("ipykernel.heartbeat", "Heartbeat"),
    ("ipykernel.control", "ControlThread"),
    ("ipykernel.shellchannel", "ShellChannelThread"),
    ("ipykernel.parentpoller", "ParentPollerUnix"),
    ("ipykernel.parentpoller", "ParentPollerWindows"),
    ("IPython.core.history", "HistorySavingThread"),
)
_STREAM_LOCK_TIMEOUT = 10.0  # seconds; the lock is held only across a StringIO write
_warned_sites: set[tuple[str, int]] = set()


def _kernel_stream(stream: object) -> bool:
    """Whether ``stream`` is ipykernel's ``OutStream`` (a kernel's ``sys.stdout``)."""
    return type(stream).__module__ == "ipykernel.iostream"


def _kernel_streams() -> list[Any]:
    streams: list[Any] = []
    for stream in (sys.stdout, sys.stderr):
        if _kernel_stream(stream) and all(stream is not s for s in streams):
            streams.append(stream)
    return streams


def kernel_threads() -> set[threading.Thread]:
    """The service threads of the IPython kernel (or IPython shell) running in this process.

    Empty outside IPython. Found by class, or as the IOPub and fd-watching
    threads of the kernel's ``sys.stdout``/``sys.stderr``.
    """
    found: set[threading.Thread] = set()
    for stream in _kernel_streams():
        for owned in (getattr(stream.pub_thread, "thread", None), stream.watch_fd_thread):
            if isinstance(owned, threading.Thread):
                found.add(owned)
    classes = tuple(
        cls
        for module, name in _SERVICE_THREAD_CLASSES
        if isinstance(cls := getattr(sys.modules.get(module), name, None), type)
    )
    if classes:
        found.update(t for t in threading.enumerate() if isinstance(t, classes))
    return found


def tqdm_monitors() -> set[threading.Thread]:
    """tqdm's ``tqdm_monitor`` threads (``tqdm._monitor.TMonitor``); empty without tqdm loaded."""
    cls = getattr(sys.modules.get("tqdm._monitor"), "TMonitor", None)
    if not isinstance(cls, type):
        return set()
    return {t for t in threading.enumerate() if isinstance(t, cls)}


def threads_to_warn_about(threads: Iterable[threading.Thread]) -> list[threading.Thread]:
    """Those of ``threads`` that make a fork unsafe: all but the kernel's and tqdm's monitors."""
    gil = getattr(sys, "_is_gil_enabled", lambda: True)()
    safe = (kernel_threads() | tqdm_monitors()) if gil else set()
    return [t for t in threads if t not in safe]


def warn_foreign_threads(threads: Sequence[threading.Thread]) -> None:
    """Issue one :class:`~forkref.ForkWarning` per call site naming ``threads`` (if any).

    The call site is the first frame outside forkref: the user's line whose
    submit forks the workers. In a notebook each run of a cell is a new site.
    """
    if not threads:
        return
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("forkref"):
        frame = frame.f_back
    site = (frame.f_code.co_filename, frame.f_lineno)
    if site in _warned_sites:
        return
    _warned_sites.add(site)
    names = ", ".join(sorted(t.name for t in threads)[:5])
    warnings.warn_explicit(
        f"forkref is forking pool workers while {len(threads)} other thread(s) run in this "
        f"process ({names}); a lock one of them holds at the fork stays locked forever in the "
        "workers, which hang when they take it. To keep zero-copy inheritance, fork before "
        "those threads start (the pool forks at its first task: submit it first) or stop them "
        "around that submit; if they hold no lock the workers use, silence this with "
        "warnings.filterwarnings('ignore', category=forkref.ForkWarning)",
        ForkWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__", "?"),
    )


@contextlib.contextmanager
def fork_safe_stdio() -> Iterator[None]:
    """Wrap exactly an ``os.fork()``: the child inherits no pending output and no held stream lock.

    ``sys.stdout`` and ``sys.stderr`` are flushed first, as multiprocessing
    does before its forks: text still buffered would otherwise be written
    again by every child that flushes (the fork server and each worker).
    Around it all, :func:`tqdm_locks`; inside, :func:`kernel_stream_locks`.
    """
    with tqdm_locks():  # first: tqdm's monitor writes to stderr under it
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed, None (pythonw), or a broken pipe
                stream.flush()
        with kernel_stream_locks():
            yield


@contextlib.contextmanager
def kernel_stream_locks() -> Iterator[None]:
    """Hold the ``_buffer_lock`` of an IPython kernel's ``sys.stdout``/``sys.stderr`` across a fork.

    The block exits in the parent and in the child, which releases the locks
    in both, so a worker's ``print()`` never waits for a thread that does not
    exist in it. The child also drops what other threads wrote since the
    last flush (the parent sends that itself). Outside a kernel this does
    nothing. A lock still held after 10 s belongs to a stuck thread: the fork
    goes on without it (a worker's print may then hang, as it would have
    without this).
    """
    parent = os.getpid()
    held: list[tuple[Any, Any]] = []
    try:
        for stream in _kernel_streams():
            lock = getattr(stream, "_buffer_lock", None)
            if lock is not None and lock.acquire(timeout=_STREAM_LOCK_TIMEOUT):
                held.append((stream, lock))
        yield
    finally:
        for stream, lock in reversed(held):
            if os.getpid() != parent:
                with contextlib.suppress(Exception):
                    stream._rotate_buffers()  # the parent's pending text: the parent sends it
            lock.release()


@contextlib.contextmanager
def tqdm_locks() -> Iterator[None]:
    """Hold tqdm's thread lock across a fork, so no worker inherits it held.

    Every tqdm bar, and the ``tqdm_monitor`` thread tqdm keeps running after
    the first bar, take it (``tqdm.tqdm.get_lock()``: its ``th_lock``, or a
    lock set with ``tqdm.set_lock``) to update a bar. A worker that inherited
    it held would hang at its first bar. Held here, the monitor is asleep
    (``Event.wait``, outside the lock) or waiting for it, never inside it, so
    forking beside it is safe and :func:`threads_to_warn_about` does not warn
    about it. The multiprocessing lock tqdm pairs with it is a semaphore
    shared with the children: one held in the parent is released there, so it
    is not taken here. Released in the parent and in the child; nothing
    happens when tqdm was never imported.
    """
    held: list[Any] = []
    try:
        for lock in _tqdm_thread_locks():
            if lock.acquire(timeout=_STREAM_LOCK_TIMEOUT):
                held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def _tqdm_thread_locks() -> list[Any]:
    """tqdm's per-process locks: the default ``th_lock`` and any lock set by ``set_lock``."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return []
    default = getattr(std, "TqdmDefaultWriteLock", None)
    classes = [getattr(std, "tqdm", None), *(getattr(t, "tqdm_cls", None) for t in tqdm_monitors())]
    found: list[Any] = []
    candidates = [getattr(default, "th_lock", None)]
    for cls in classes:
        lock = getattr(cls, "_lock", None)  # set once a bar exists; never created here
        if default is not None and isinstance(lock, default):
            candidates += lock.locks  # [mp_lock, th_lock]: the first is left out below
        else:
            candidates.append(lock)
    for lock in candidates:
        if lock is None or not hasattr(lock, "acquire") or any(lock is f for f in found):
            continue
        if type(lock).__module__ == "multiprocessing.synchronize":
            continue  # shared with the children (tqdm.set_lock(mp.RLock())): see above
        found.append(lock)
    return found
