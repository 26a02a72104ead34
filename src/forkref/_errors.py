"""forkref's exceptions and warnings.

Hierarchy::

    Exception
     └── Error                          base of everything forkref raises
          ├── NotInheritedError         a reference cannot be resolved in this process
          ├── ReleasedError             a handle was used after release()
          ├── BrokenPoolError           the pool cannot run tasks (also a BrokenProcessPool)
          │    └── WorkerDiedError      a worker died while running a task
          ├── TaskTimeoutError          a task ran past the pool's task_timeout (also a
          │                             TimeoutError)
          ├── ForkError                 os.fork() failed for a new generation of workers
          ├── TaskPicklingError         a task's function, argument or result cannot be
          │    │                        pickled (also a pickle.PicklingError)
          │    └── ResultPicklingError  a result cannot be pickled in the worker (also a
          │                             multiprocessing.pool.MaybeEncodingError)
          ├── SharedMemoryError         a segment could not be made, written or mapped
          │    └── SharedMemoryFullError  the segment directory has no room
          ├── CompactError              an item cannot go into or come out of a compact container
          └── MemoryReportError         process memory could not be read or sampled
               └── MemoryAccessError    the OS denied reading a process's memory

    UserWarning
     └── PerformanceWarning             a big argument is being pickled per task
    RuntimeWarning
     └── ForkWarning                    a pool forks while other threads run

Every exception here is picklable with its message intact: it may be raised in
a worker and re-raised in the parent. Each says ``__module__ = "forkref"`` in
its class body (as every public class of forkref does): it is pickled, and
documented, by that stable path rather than by this private module's.
"""

from __future__ import annotations

__all__ = ["Error", "NotInheritedError", "PerformanceWarning", "ReleasedError"]


class Error(Exception):
    """Base class of every exception raised by forkref."""

    __module__ = "forkref"


class NotInheritedError(Error):
    """A shared object's reference cannot be resolved in this process.

    Raised (on first use of the object, never while unpickling) when the
    process holds no copy of the object and shared memory could not bring one:
    it was shared after this worker was forked and no fork record proves the
    worker holds it (it did not exist yet, or cannot be weakly referenced), it
    was released, the worker was started by spawn/forkserver, the reference
    comes from another process tree, or it was corrupted or forged. The message
    says which case it is, why shared memory could not stand in, and what to do.
    """

    __module__ = "forkref"


class ReleasedError(Error):
    """A :class:`forkref.Shared` handle was used after ``release()``."""

    __module__ = "forkref"


class PerformanceWarning(UserWarning):
    """A big argument is about to be pickled for every task, or big results are.

    The message names the argument, its estimated size and the fix
    (``forkref.share(...)`` or ``auto_share=True``); for a result that could
    not go through shared memory, the cause and what frees the way.
    """

    __module__ = "forkref"


# -- shared-memory transport (issue 4) ---------------------------------------
#
#    Error
#     └── SharedMemoryError          a shared-memory segment could not be made or read
#          └── SharedMemoryFullError the segment directory has no room for the segment

__all__ += ["SharedMemoryError", "SharedMemoryFullError"]


class SharedMemoryError(Error):
    """A shared-memory segment could not be created, written, found, received or mapped.

    The message names the step, the object and the cause: the segment
    directory, or a worker at its open-file limit (with how to raise it).
    """

    __module__ = "forkref"


class SharedMemoryFullError(SharedMemoryError):
    """The segment directory (``/dev/shm`` by default) has no room for a segment.

    The message gives the bytes needed and available and the fixes: a larger
    tmpfs (Docker: ``--shm-size``), fork inheritance instead of shared memory,
    or another directory through the ``FORKREF_SHM_DIR`` environment variable.
    """

    __module__ = "forkref"


# Compact containers and memory reports (issue 5):
#
#     Error
#      ├── CompactError               an item cannot go into (or come out of) a compact container
#      └── MemoryReportError          process memory could not be read or sampled
#           └── MemoryAccessError     the OS denied reading a process's memory

__all__ += ["CompactError", "MemoryAccessError", "MemoryReportError"]


class CompactError(Error):
    """An item cannot be stored in a compact container, or a pickled one is corrupt.

    The message names the step, the item's position and type, and the fix.
    """

    __module__ = "forkref"


class MemoryReportError(Error):
    """A memory report could not be made: bad pids, bad arguments or a failed sampler."""

    __module__ = "forkref"


class MemoryAccessError(MemoryReportError):
    """The OS denied reading a process's memory maps (``/proc/<pid>/smaps``).

    Reading another user's process needs the same user or root
    (``CAP_SYS_PTRACE``); report only on processes you own, such as your pool's workers.
    """

    __module__ = "forkref"


# -- pools (issue 3) ---------------------------------------------------------
#
#     Error
#      ├── BrokenPoolError            the pool cannot run tasks any more (also a
#      │    │                         concurrent.futures BrokenProcessPool)
#      │    └── WorkerDiedError       a worker died (signal, os._exit) while running a task
#      ├── TaskTimeoutError           a task ran past task_timeout; its worker was replaced
#      │                              (also a TimeoutError)
#      └── TaskPicklingError          a task's function, argument or result cannot be pickled
#                                     (also a pickle.PicklingError)
#
#     RuntimeWarning
#      └── ForkWarning                the pool forks while other threads run

__all__ += [
    "BrokenPoolError",
    "ForkWarning",
    "ResultPicklingError",
    "TaskPicklingError",
    "TaskTimeoutError",
    "WorkerDiedError",
]

import pickle as _pickle  # noqa: E402  (kept next to the classes that need it)
from concurrent.futures.process import BrokenProcessPool as _BrokenProcessPool  # noqa: E402


class BrokenPoolError(Error, _BrokenProcessPool):
    """A forkref pool cannot run tasks any more.

    Also a ``concurrent.futures.process.BrokenProcessPool``, so code written
    for the stdlib executor catches it unchanged. The message says what broke
    the pool (a worker that died, a failed initializer) and what to do.
    """

    __module__ = "forkref"


class WorkerDiedError(BrokenPoolError):
    """A worker process died while it was running (or holding) the task.

    Attributes ``pid`` and ``exitcode`` (negative: the signal number) say
    which worker and how; the message names the signal.
    """

    __module__ = "forkref"

    def __init__(self, message: str, pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode


class TaskTimeoutError(Error, TimeoutError):
    """A task ran longer than the pool's ``task_timeout``.

    Its worker was killed and replaced; the pool (or executor) goes on, and
    only this task fails. Also a built-in ``TimeoutError``. The message names
    the task (its function, and its items for a map), the timeout and the
    fix. With ``chunksize > 1`` the timeout is per chunk, as one task.
    """

    __module__ = "forkref"


class TaskPicklingError(Error, _pickle.PicklingError):
    """A task's function, an argument or a result cannot be pickled.

    The message says which one (``argument 2``, ``keyword argument 'df'``,
    ``item 7 of the iterable``, ``the result``), its type, why, and the fix.
    """

    __module__ = "forkref"


from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # typeshed has no MaybeEncodingError
    _MaybeEncodingError = Exception
else:
    from multiprocessing.pool import MaybeEncodingError as _MaybeEncodingError


class ResultPicklingError(TaskPicklingError, _MaybeEncodingError):
    """A task's result cannot be pickled in the worker to send it back.

    Also a ``multiprocessing.pool.MaybeEncodingError``, what
    ``multiprocessing.Pool`` raises there, with its ``exc`` and ``value``
    attributes (``repr`` of the pickling error and of the result). The task
    alone fails; the worker and the pool go on.
    """

    __module__ = "forkref"

    def __init__(self, message: str, exc: object = None, value: object = None) -> None:
        Exception.__init__(self, message)  # not the result itself: it may be big, or unpicklable
        self.exc = repr(exc)
        self.value = repr(value)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_result_error, (self.args[0], self.exc, self.value))

    def __repr__(self) -> str:
        return f"ResultPicklingError({self.args[0]!r})"

    def __str__(self) -> str:
        return str(self.args[0])


def _rebuild_result_error(message: str, exc: str, value: str) -> ResultPicklingError:
    # The reprs travel, never the unpicklable result itself.
    err = ResultPicklingError(message)
    err.exc, err.value = exc, value
    return err


class ForkWarning(RuntimeWarning):
    """A forkref pool forked its workers while other Python threads were running.

    A thread that holds a lock at the moment of ``fork()`` leaves it locked
    forever in the child. Issued once per call site, in place of Python 3.12's
    generic ``DeprecationWarning``; an IPython kernel's own threads do not
    count (see the README's "In notebooks").
    """

    __module__ = "forkref"


__all__ += ["ForkError"]


class ForkError(Error):
    """A pool could not fork its workers (``os.fork()`` failed: EAGAIN, ENOMEM).

    The tasks that needed the new workers fail with it; the pool stays
    usable: its current workers go on running the other tasks.
    """

    __module__ = "forkref"


# -- the open-file limit -------------------------------------------------------
#
# A pool needs a few descriptors per worker (its socket, the process sentinel).
# At the limit, the OSError surfaces wherever the next descriptor is asked for:
# these say so, with the limits and the fix, wherever that is.

import errno as _errno  # noqa: E402
import os as _os  # noqa: E402
import resource as _resource  # noqa: E402  (up front: at the limit an import cannot open its file)


def is_file_limit(err: BaseException) -> bool:
    """Whether ``err`` is EMFILE (this process's limit) or ENFILE (the system's)."""
    return isinstance(err, OSError) and err.errno in (_errno.EMFILE, _errno.ENFILE)


def near_file_limit(margin: int = 16) -> bool:
    """Whether this process has fewer than ``margin`` descriptors left under its soft limit."""
    soft = _resource.getrlimit(_resource.RLIMIT_NOFILE)[0]
    try:
        count = len(_os.listdir("/proc/self/fd")) - 1
    except OSError:
        return True  # not even one for the listing
    return soft != _resource.RLIM_INFINITY and soft - count < margin


def file_limit_text(step: str, err: OSError) -> str:
    """Why ``step`` failed with EMFILE/ENFILE, this process's limits, and how to raise them."""
    soft, hard = _resource.getrlimit(_resource.RLIMIT_NOFILE)
    try:
        count = f"{len(_os.listdir('/proc/self/fd')) - 1} open now, "  # less the listing's own
    except OSError:  # listing needs a descriptor too
        count = ""
    if err.errno == _errno.ENFILE:
        cause = "the system's table of open files is full (ENFILE; sysctl fs.file-max)"
    else:
        cause = "this process has reached its limit of open files (EMFILE)"
    limits = f"RLIMIT_NOFILE soft limit {_limit(soft)}, hard limit {_limit(hard)}"
    if err.errno == _errno.ENFILE:
        raise_it = "Raise the system's limit (sysctl -w fs.file-max=...) as root"
    elif soft == hard:
        raise_it = (
            "The soft limit is the hard one: only root can raise it (ulimit -Hn, "
            "/etc/security/limits.conf, or the container's --ulimit nofile=...)"
        )
    else:
        raise_it = (
            f"Raise it: ulimit -n {_suggested(soft, hard)} in the shell that starts Python, "
            "or resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard)) at the start of the program"
        )
    return (
        f"cannot {step}: {cause}; {count}{limits}. {raise_it}; and close the pools you no "
        "longer use (a with-block, close() and join(), or shutdown())"
    )


def _limit(value: int) -> str:
    return "unlimited" if value == _resource.RLIM_INFINITY else str(value)


def _suggested(soft: int, hard: int) -> str:
    wanted = max(4096, 4 * soft)
    if hard != _resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    return str(wanted)
