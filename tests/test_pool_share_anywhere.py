"""forkref's own pools with share() anywhere: what the engine's wiring must give.

Needs the engine to call forkref._refs.forkrecord and forkref._shm.export (see the
wiring patch): a generation records the caller's objects at its fork, its
fork server records nothing, handles pickled for forked workers start no
export thread, and workers drop released copies before each task.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

import numpy as np
import pytest

import forkref
from forkref._shm import export as _export
from helpers import read_n, total

pytestmark = pytest.mark.timeout(120)


class BigObject:
    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> Any:
        raise AssertionError("a BigObject was pickled")


def cached_now() -> int:
    return _export.stats().cached  # the worker loop ran before_task() before this task


def _export_thread() -> bool:
    return "forkref-export" in {t.name for t in threading.enumerate()}


def test_an_object_alive_at_the_generation_fork_needs_no_new_generation() -> None:
    bo = BigObject(7)
    with forkref.Pool(2) as pool:
        assert pool.apply(abs, (-1,)) == 1  # generation 1 forks now; `bo` is alive
        generation = pool._engine.generations.number
        assert pool.map(read_n, [forkref.share(bo)] * 4) == [7] * 4  # shared after the fork
        assert pool._engine.generations.number == generation  # no fork, nothing pickled


_FORK_POOL = """
import threading
import numpy as np
import forkref

def total(arr):
    return float(arr.sum())

def export_thread():
    return "forkref-export" in {t.name for t in threading.enumerate()}

if __name__ == "__main__":
    arr = np.arange(1000.0)
    with forkref.Pool(2) as pool:
        assert pool.map(total, [forkref.share(arr)] * 4) == [float(arr.sum())] * 4
        before = export_thread()
        late = np.arange(10.0)  # after the fork: these workers fetch it
        assert pool.map(total, [forkref.share(late)] * 2) == [45.0] * 2
        print(before, export_thread())
"""


def test_fork_pools_start_the_export_thread_only_when_a_worker_asks(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    script = tmp_path / "fork_pool.py"
    script.write_text(_FORK_POOL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # Inherited objects: no thread. A late one through shared memory: started on demand.
    assert done.stdout.split() == ["False", "True"], done.stdout


def test_workers_drop_a_released_copy_before_their_next_task() -> None:
    arr = np.arange(1000.0)
    with forkref.Pool(1, context=mp.get_context("spawn")) as pool:
        handle = forkref.share(arr)
        assert pool.apply(total, (handle,)) == float(arr.sum())
        assert pool.apply(cached_now) == 1
        handle.release()
        assert pool.apply(cached_now) == 0
