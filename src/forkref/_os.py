"""Small OS helpers that several layers need; no forkref imports.

Kept free of forkref imports on purpose: the segment janitor (a bare
``python -I -S`` process, see :mod:`forkref._shm.segments`) runs this file
by its path to judge whether a writer is still alive, without importing
forkref.

    close_quietly(fd)                     close, ignoring a descriptor already gone
    unlink_quietly(path)                  unlink, ignoring a name already gone
    process_running(pid) -> bool          alive and not a zombie
    wait_os_thread_gone(tid, limit=1.0)   after join(): until the kernel thread has left
"""

from __future__ import annotations

import contextlib
import os
import time

__all__ = ["close_quietly", "process_running", "unlink_quietly", "wait_os_thread_gone"]


def close_quietly(fd: int) -> None:
    """Close ``fd`` unless it is negative; a descriptor already closed is no error."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def unlink_quietly(path: str) -> None:
    """Unlink ``path``; a name already gone is no error."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs: False once it has exited, zombies included.

    ``os.kill(pid, 0)`` succeeds on a zombie (an exited child nobody reaped
    yet), so the state letter of ``/proc/<pid>/stat`` decides where there is
    one; the kill probe answers only where /proc cannot be read.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The command name (in parentheses) may hold spaces and ")": the
            # state is the first field after the last ")".
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    return True


def wait_os_thread_gone(tid: int | None, limit: float = 1.0) -> None:
    """Wait (briefly) until a joined thread has left the kernel's thread list too.

    ``join()`` returns when the thread's Python part has finished, an instant
    before its OS thread exits (always on 3.13, often on 3.12); a fork in that
    instant counts it, and Python 3.12+ (which reads the count from /proc)
    warns that the process is multi-threaded because of a thread that is
    already finished.
    """
    if tid is None:
        return
    path = f"/proc/self/task/{tid}"
    deadline = time.monotonic() + limit
    while os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.0001)
