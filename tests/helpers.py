"""Small functions several test modules share: task functions and process probes.

A plain module, not conftest.py: the task functions are pickled by reference,
so spawn and forkserver workers import this module, and it imports nothing
heavy at the top (pandas and numpy only inside :func:`frame`).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import psutil


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie counts as exited)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- task functions -------------------------------------------------------------------


def pid_of(_: object = None) -> int:
    return os.getpid()


def sigkill_self(_: object = None) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def total(obj: Any) -> float:
    """The sum of an array (or anything numpy can make one of)."""
    import numpy as np

    return float(np.asarray(obj).sum())


def read_n(obj: Any) -> int:
    """The ``n`` of a test object (it resolved, and is the one that was shared)."""
    return int(obj.n)


# -- data ------------------------------------------------------------------------------


def frame(nbytes: int, columns: str = "a", *, strings: bool = False) -> Any:
    """A DataFrame of ``nbytes`` of float64: one column 0, 1, 2, ... per letter of
    ``columns``; with ``strings`` also a column "s" of Python str (pickled in band)."""
    import numpy as np
    import pandas as pd

    rows = nbytes // (8 * len(columns))
    data: dict[str, Any] = {c: np.arange(rows, dtype=np.float64) for c in columns}
    if strings:
        data["s"] = [str(i) for i in range(rows)]
    return pd.DataFrame(data)
