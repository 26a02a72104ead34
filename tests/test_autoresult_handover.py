"""After a worker sends a reply naming result segments, the segments belong to the pool's parent.

Module forkref._shm.autoresult with forkref._shm.segments' janitor, under
real forks and SIGKILLs: a result survives its worker *and* the process that
forked the worker (a fork server) dying before the parent opens it; a parent
SIGKILLed while results are in flight leaves no segment; a pool terminated
with replies unread leaves none either.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

import forkref
from conftest import wait_until
from forkref._os import process_running
from forkref._shm import autoresult, segments

pytestmark = pytest.mark.timeout(300)
N = 300_000  # 2.4 MB of float64: above the 1 MiB default threshold
JANITOR_ROUNDS = 1.0  # s: five of the janitor's 0.2 s rounds, for it to act if it would


def _names() -> list[str]:
    return [n for n in os.listdir(segments.segment_dir()) if n.startswith(segments.RESULT_PREFIX)]


def _gone(*pids: int) -> None:
    assert wait_until(lambda: not any(process_running(p) for p in pids))


def test_a_result_outlives_its_worker_and_the_process_that_forked_it() -> None:
    """The worker (grandchild) and its forker (child) exit before the owner reads the reply."""
    owner = os.getpid()
    read_end, write_end = os.pipe()
    forker = os.fork()
    if forker == 0:  # a fork server's place
        code = 1
        try:
            os.close(read_end)
            worker = os.fork()
            if worker == 0:
                autoresult.serve(owner, "t")
                reply = autoresult.dumps(np.full(N, 7.0), autoresult.DEFAULT_THRESHOLD)
                autoresult.hand_over()
                os.write(write_end, len(reply).to_bytes(8, "little") + reply)
                os._exit(0)
            os.waitpid(worker, 0)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        size = int.from_bytes(pipe.read(8), "little")
        reply = pipe.read(size)
    os.waitpid(forker, 0)
    _gone(forker)
    time.sleep(JANITOR_ROUNDS)  # the old rule (writer and its parent) would unlink it here
    result = pickle.loads(reply)
    assert float(result[0]) == 7.0
    assert len(result) == N
    assert not _names()


class _KillWorkerAndForker:
    """Unpickled in the parent before the big part: kills the worker and its fork server."""

    def __init__(self) -> None:
        self.pids = (os.getpid(), os.getppid())

    def __reduce__(self) -> Any:
        return _kill_then_wait, self.pids


def _kill_then_wait(worker: int, forker: int) -> str:
    for pid in (worker, forker):
        os.kill(pid, signal.SIGKILL)
    _gone(worker, forker)
    time.sleep(JANITOR_ROUNDS)
    return "killed"


def big_after_a_kill(i: int) -> tuple[_KillWorkerAndForker, np.ndarray]:
    return _KillWorkerAndForker(), np.full(N, float(i))


def big(i: int) -> np.ndarray:
    return np.full(N, float(i))


def exit_now(_: int) -> None:
    os._exit(1)


def test_under_fork_a_result_survives_its_worker_and_fork_server_sigkilled() -> None:
    with forkref.Pool(1) as pool:  # fork: the worker's parent is the generation's fork server
        killed, result = pool.apply(big_after_a_kill, (3,))
    assert killed == "killed"
    assert float(result[0]) == 3.0
    assert float(result[-1]) == 3.0
    result[0] = -1.0
    assert not _names()


def test_under_fork_a_result_is_intact_after_the_worker_dies_on_the_next_task() -> None:
    with forkref.Pool(1) as pool:
        first = pool.apply_async(big, (5,))
        with pytest.raises(forkref.WorkerDiedError):
            pool.apply(exit_now, (0,))
        result = first.get()
        assert float(result[0]) == 5.0
        assert float(result[-1]) == 5.0
        assert float(pool.apply(big, (6,))[0]) == 6.0  # the pool goes on
    assert wait_until(lambda: not _names())


class _FailsInParent:
    """Pickles in the worker, fails to unpickle in the parent (before the big part)."""

    def __reduce__(self) -> Any:
        return _refuse, ()


def _refuse() -> None:
    if not multiprocessing.parent_process():
        raise RuntimeError("not in this process")


def unreadable_then_big(i: int) -> tuple[_FailsInParent, np.ndarray]:
    return _FailsInParent(), np.full(N, float(i))


def test_a_result_the_parent_never_opens_goes_with_the_pool() -> None:
    with forkref.Pool(1) as pool:
        with pytest.raises(forkref.TaskPicklingError, match="not in this process"):
            pool.apply(unreadable_then_big, (1,))
        assert _names(), "named, handed to the parent, never opened"
        pool.close()
        pool.join()
    assert not _names()  # swept at the pool's end: the parent lives on


def test_a_pool_terminated_with_results_in_flight_leaves_no_segment() -> None:
    pool = forkref.Pool(2)
    results = pool.imap_unordered(big, range(40))
    assert float(next(results)[0]) >= 0.0
    pool.terminate()
    pool.join()
    assert wait_until(_no_names), _names()


_PARENT = textwrap.dedent(
    """
    import multiprocessing as mp, sys, time
    import numpy as np
    import forkref

    def big(i):
        return np.full(300_000, float(i))

    if __name__ == "__main__":
        with forkref.Pool(2, context=mp.get_context(sys.argv[1])) as pool:
            for i, arr in enumerate(pool.imap(big, range(1000))):
                if i == 2:
                    print(*pool._engine.pids(), *pool._engine.zygote_pids(), flush=True)
                time.sleep(0.05)  # slower than the workers: replies pile up unread
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_parent_sigkilled_while_results_are_in_flight_leaves_nothing(
    method: str, tmp_path: Any
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    proc = subprocess.Popen(
        [sys.executable, str(script), method], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    helpers = [int(p) for p in proc.stdout.readline().split()]
    assert helpers, "the parent printed its workers"
    assert wait_until(lambda: len(_names()) >= 2), "results were in flight"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    _gone(*helpers)  # the workers and the fork server die with their parent
    assert wait_until(_no_names), _names()  # bounded: the janitor's rounds


def _no_names() -> bool:
    return not _names()
