"""forkref's exceptions and warnings.

Hierarchy::

    Exception
     └── Error                       base of everything forkref raises
          ├── NotInheritedError      a reference cannot be resolved in this process
          └── ReleasedError          a handle was used after release()

    UserWarning
     └── PerformanceWarning          a big argument is being pickled per task

Every exception here is picklable with its message intact: it may be raised in
a worker and re-raised in the parent.
"""

from __future__ import annotations

__all__ = ["Error", "NotInheritedError", "PerformanceWarning", "ReleasedError"]


class Error(Exception):
    """Base class of every exception raised by forkref."""


class NotInheritedError(Error):
    """A shared object's reference cannot be resolved in this process.

    Raised (on first use of the object, never while unpickling) when the
    process did not inherit the object: it was shared after this worker was
    forked, it was released, the worker was started by spawn/forkserver, the
    reference comes from another process tree, or it was corrupted or forged.
    The message says which, and what to do.
    """


class ReleasedError(Error):
    """A :class:`forkref.Shared` handle was used after ``release()``."""


class PerformanceWarning(UserWarning):
    """A big argument is about to be pickled for every task.

    The message names the argument, its estimated size and the fix
    (``forkref.share(...)`` or ``auto_share=True``).
    """
