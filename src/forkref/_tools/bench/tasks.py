"""What the workers of ``forkref bench`` run: the benchmark tasks, reporting their pid.

Each task returns ``(pid, value)``: the pid tells the bench which processes
were the workers whose memory it reports (a pool also runs helpers: a fork
server, a resource tracker, Ray's daemons). The value is what
:mod:`forkref._tools.bench.data` computes, unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from forkref._tools.bench.data import result_block, work

__all__ = ["GLOBAL", "exported_result", "global_work", "result", "shared_work", "work_pid"]

#: The global-variable trick: set in the parent before the pool forks.
GLOBAL: Any = None


def work_pid(data: Any, i: int) -> tuple[int, float]:
    """:func:`~forkref._tools.bench.data.work` on ``data`` (an argument, a handle resolved, ...)."""
    return os.getpid(), work(data, i)


def global_work(_: None, i: int) -> tuple[int, float]:
    """:func:`~forkref._tools.bench.data.work` on the module global the worker inherited."""
    return os.getpid(), work(GLOBAL, i)


def shared_work(shared: Any, i: int) -> tuple[int, float]:
    """The same, for mpire, which passes its ``shared_objects`` first."""
    return os.getpid(), work(shared, i)


def result(part: int, nbytes: int) -> tuple[int, Any]:
    """A big result, returned as is (pickled back to the parent)."""
    return os.getpid(), result_block(part, nbytes)


def exported_result(part: int, nbytes: int) -> tuple[int, Any]:
    """A big result through shared memory: a token the parent imports zero-copy."""
    from forkref._shm.export import export_result

    return os.getpid(), export_result(result_block(part, nbytes), threshold=0)
