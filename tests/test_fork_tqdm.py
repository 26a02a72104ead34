"""tqdm beside forkref's forks: its monitor does not warn, its lock is never inherited held.

Each case runs in a fresh interpreter: tqdm's ``tqdm_monitor`` thread, once
started, lives as long as the process, and must not reach the other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        check=False,
    )


def test_a_tqdm_bar_then_a_pool_gives_no_fork_warning() -> None:
    done = _run(
        """
        import io, threading, warnings
        import tqdm
        import forkref

        def square(x):
            return x * x

        if __name__ == "__main__":
            warnings.simplefilter("error")  # a ForkWarning fails the script
            for _ in tqdm.tqdm(range(3), file=io.StringIO()):
                pass
            names = [t.name for t in threading.enumerate()]
            assert "tqdm_monitor" in names, names  # the thread that used to warn is there
            with forkref.Pool(2) as pool:
                assert pool.map(square, range(4)) == [0, 1, 4, 9]
            with forkref.ProcessPoolExecutor(2) as ex:
                assert ex.submit(square, 3).result() == 9
            print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "ForkWarning" not in done.stderr


def test_a_worker_using_tqdm_does_not_hang_when_another_thread_held_its_lock_at_the_fork() -> None:
    """A thread holds tqdm's lock as the pool forks: the fork waits, the worker's bar runs."""
    done = _run(
        """
        import io, multiprocessing, threading, time
        import tqdm
        import forkref

        def bar(n):
            return sum(1 for _ in tqdm.tqdm(range(n), file=io.StringIO()))

        def hold(lock, holding):
            with lock:
                holding.set()
                time.sleep(1.0)  # long enough for the pool below to fork meanwhile

        if __name__ == "__main__":
            for _ in tqdm.tqdm(range(2), file=io.StringIO()):
                pass
            holding = threading.Event()
            holder = threading.Thread(target=hold, args=(tqdm.tqdm.get_lock(), holding))
            holder.start()
            holding.wait()
            with forkref.Pool(1) as pool:  # forks at its first task, with the lock held
                try:
                    result = pool.apply_async(bar, (5,)).get(timeout=60)
                except multiprocessing.TimeoutError:
                    result = "hung"
                    pool.terminate()
            holder.join()
            print(result)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"
