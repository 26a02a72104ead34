"""What code written for the stdlib pools relies on, checked on forkref's (issue 8).

Each test here failed on forkref 0.1.0 and mirrors a CPython test or a
private attribute that code in the wild uses. Real workers, under every
start method where it applies.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import gc
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import time
import warnings
import weakref
from typing import Any

import pytest

import forkref

pytestmark = pytest.mark.timeout(90)

METHODS = ["fork", "forkserver", "spawn"]


class Dummy:
    """A result with a weak reference (CPython's test_free_reference)."""

    def __init__(self, value: int) -> None:
        self.value = value


def make_dummy(i: int) -> Dummy:
    return Dummy(i)


def raise_runtime(_: object = None) -> None:
    raise RuntimeError(123)  # the line the remote traceback must show


def failing_init() -> None:
    raise ValueError("error in initializer")


def sleep_for(seconds: float) -> None:
    time.sleep(seconds)


def _collected(ref: weakref.ref[Any], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return ref() is None


@pytest.mark.parametrize("method", METHODS)
def test_executor_map_drops_each_result_once_yielded(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with forkref.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        for chunksize in (1, 3):
            for obj in ex.map(make_dummy, range(10), chunksize=chunksize):
                ref = weakref.ref(obj)
                del obj
                assert _collected(ref), "the map iterator still holds a result it yielded"


@pytest.mark.parametrize("ordered", [True, False])
def test_pool_imap_drops_each_result_once_yielded(ordered: bool) -> None:
    with forkref.Pool(2) as p:
        for chunksize in (1, 4):
            imap = p.imap if ordered else p.imap_unordered
            for obj in imap(make_dummy, range(12), chunksize=chunksize):
                ref = weakref.ref(obj)
                del obj
                assert _collected(ref), "the imap iterator still holds a result it yielded"


def test_remote_traceback_is_the_stdlibs_type() -> None:
    with forkref.ProcessPoolExecutor(1) as ex, pytest.raises(RuntimeError) as caught:
        ex.submit(raise_runtime).result(timeout=30)
    cause = caught.value.__cause__
    assert type(cause) is concurrent.futures.process._RemoteTraceback
    assert "raise RuntimeError(123)" in cause.tb
    with forkref.Pool(1) as p, pytest.raises(RuntimeError) as caught_pool:
        p.apply(raise_runtime)
    pool_cause = caught_pool.value.__cause__
    assert type(pool_cause) is multiprocessing.pool.RemoteTraceback  # type: ignore[attr-defined]
    assert "raise RuntimeError(123)" in str(pool_cause)


def failing_init_logging_to(path: str) -> None:
    # As CPython's test_init does: the worker's concurrent.futures logger gets a
    # handler of the test's, then the initializer fails.
    logger = logging.getLogger("concurrent.futures")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    raise ValueError("error in initializer")


@pytest.mark.parametrize("method", METHODS)
def test_failing_initializer_is_logged_as_the_stdlib_logs_it(method: str, tmp_path: Any) -> None:
    log = tmp_path / "worker.log"
    ctx = multiprocessing.get_context(method)
    with forkref.ProcessPoolExecutor(
        2, mp_context=ctx, initializer=failing_init_logging_to, initargs=(str(log),)
    ) as ex:
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(abs, 1).result(timeout=60)
        with pytest.raises(concurrent.futures.BrokenExecutor):
            ex.submit(abs, 1)
    text = log.read_text()
    assert "CRITICAL Exception in initializer:" in text
    assert "ValueError: error in initializer" in text


@pytest.mark.parametrize("method", METHODS)
def test_private_attributes_code_in_the_wild_uses(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with forkref.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert ex._max_workers == 2
        assert ex._mp_context is ctx
        assert ex._broken is False
        future = ex.submit(sleep_for, 30)
        processes = ex._processes  # CPython's test_killed_child reads this right after submit
        # As the stdlib: fork starts every worker at once, spawn/forkserver one per
        # task while none is idle (bpo-39207).
        assert len(processes) == (2 if method == "fork" else 1)
        victim = next(iter(processes.values()))
        assert victim.is_alive()
        assert victim.exitcode is None
        assert victim.pid in processes
        victim.terminate()
        victim.join(30)
        assert not victim.is_alive()
        assert victim.exitcode == -signal.SIGTERM
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            future.result(timeout=60)
        assert ex._broken
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            ex.submit(abs, 1)


def test_pool_private_attributes() -> None:
    ctx = multiprocessing.get_context("fork")
    with forkref.Pool(2, context=ctx) as p:
        assert p._processes == 2
        assert p._ctx is ctx
        assert p._state == "RUN"
        p.map(abs, range(4))
        workers = p._pool
        assert len(workers) == 2
        assert {w.pid for w in workers} == set(p.pids())
        assert all(w.is_alive() for w in workers)


@pytest.mark.parametrize("kill", [False, True], ids=["terminate_workers", "kill_workers"])
def test_terminate_and_kill_workers_python_314_api(kill: bool) -> None:
    ex = forkref.ProcessPoolExecutor(2)
    futures = [ex.submit(sleep_for, 60) for _ in range(4)]
    pids = set(ex._processes)
    assert len(pids) == 2
    (ex.kill_workers if kill else ex.terminate_workers)()
    # As Python 3.14: the futures not running are cancelled, the running ones break.
    broken = 0
    for future in futures:
        try:
            future.result(timeout=30)
        except concurrent.futures.CancelledError:
            pass
        except concurrent.futures.process.BrokenProcessPool:
            broken += 1
    assert broken >= 1
    with pytest.raises((RuntimeError, concurrent.futures.process.BrokenProcessPool)):
        ex.submit(abs, 1)
    ex.shutdown(wait=True)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


@pytest.mark.parametrize("method", METHODS)
def test_shutdown_cancel_futures_keeps_the_running_ones(method: str) -> None:
    """CPython's test_cancel_futures, which failed in one run of two (issue 8).

    ``max_workers + 1`` futures are marked running at submit, as the stdlib's
    call queue does, so shutdown(cancel_futures=True) right after the submits
    always leaves some to finish.
    """
    ctx = multiprocessing.get_context(method)
    for _ in range(3):
        ex = forkref.ProcessPoolExecutor(2, mp_context=ctx)
        futures = [ex.submit(time.sleep, 0.05) for _ in range(50)]
        ex.shutdown(cancel_futures=True)
        cancelled = [f for f in futures if f.cancelled()]
        others = [f for f in futures if not f.cancelled()]
        assert len(cancelled) > 20
        assert others
        for f in others:
            assert f.done()
            assert f.exception() is None


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_spawn_workers_start_on_demand_and_idle_ones_are_reused(method: str) -> None:
    """CPython's test_idle_process_reuse_*: a spawn worker costs far more than a fork."""
    ctx = multiprocessing.get_context(method)
    with forkref.ProcessPoolExecutor(5, mp_context=ctx) as ex:
        for _ in range(3):
            assert ex.submit(abs, -21).result(timeout=60) == 21
        assert len(ex._processes) == 1
        slow = [ex.submit(sleep_for, 0.5) for _ in range(3)]
        for future in slow:
            future.result(timeout=60)
        assert len(ex._processes) == 3  # one per task that found no idle worker


def iterable_that_raises(n: int) -> Any:
    yield from range(n)
    raise OSError("the iterable failed")


class SizedButRaising:
    def __len__(self) -> int:
        return 3

    def __iter__(self) -> Any:
        return iterable_that_raises(1)


def test_an_exception_from_the_iterable_reaches_the_caller_as_the_stdlib_does() -> None:
    """CPython's test_map_handle_iterable_exception hung; test_imap_handle_iterable_exception
    saw imap() itself raise instead of next()."""
    with forkref.Pool(2) as p:
        with pytest.raises(OSError, match="the iterable failed") as caught:
            p.map(abs, SizedButRaising(), 1)
        assert caught.value.__cause__ is None  # the caller's own exception, not a worker's
        it = p.imap(abs, iterable_that_raises(3), 1)  # does not raise here
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(OSError, match="the iterable failed"):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
        unordered = p.imap_unordered(abs, iterable_that_raises(2), 1)
        got, errors = [], 0
        while True:
            try:
                got.append(next(unordered))
            except OSError:
                errors += 1
            except StopIteration:
                break
        assert sorted(got) == [0, 1]
        assert errors == 1


def return_a_lock(_: object = None) -> Any:
    import threading

    return threading.Lock()


def test_an_unpicklable_result_is_a_maybe_encoding_error_and_fails_only_its_task() -> None:
    errors: list[BaseException] = []
    with forkref.Pool(2) as p:
        for _ in range(5):
            res = p.apply_async(return_a_lock, error_callback=errors.append)
            with pytest.raises(multiprocessing.pool.MaybeEncodingError) as caught:  # type: ignore[attr-defined]
                res.get(timeout=30)
            assert isinstance(caught.value, forkref.TaskPicklingError)
            assert "lock" in caught.value.exc
            assert caught.value.value.startswith("<unlocked _thread.lock")
            assert "cannot send the result" in str(caught.value)
        assert len(errors) == 5
        assert p.map(abs, [-1, -2]) == [1, 2]


class ExitAtPickle:
    def __reduce__(self) -> Any:
        raise SystemExit(4)


def return_exit_at_pickle(_: object = None) -> ExitAtPickle:
    return ExitAtPickle()


def test_systemexit_while_pickling_a_result_is_the_tasks_error_not_a_death() -> None:
    """CPython's test_exit_during_result_pickle_on_worker: the worker goes on."""
    with forkref.ProcessPoolExecutor(1) as ex:
        pid = ex.submit(os.getpid).result(timeout=30)
        with pytest.raises(SystemExit):
            ex.submit(return_exit_at_pickle).result(timeout=30)
        assert ex.submit(os.getpid).result(timeout=30) == pid


def test_a_running_pool_collected_warns_as_the_stdlib_does() -> None:
    p = forkref.Pool(1)
    p.apply(abs, (1,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del p
        gc.collect()
    assert any(
        issubclass(w.category, ResourceWarning)
        and "unclosed running multiprocessing pool" in str(w.message)
        for w in caught
    )


def test_stdlib_internals_views_wait_for_the_shutdown() -> None:
    """CPython's test_shutdown_no_wait reads these and joins them after shutdown(wait=False)."""
    ex = forkref.ProcessPoolExecutor(2)
    assert ex._executor_manager_thread is None  # nothing started yet, as the stdlib
    results = ex.map(abs, range(-5, 5))
    manager, call_queue, processes = ex._executor_manager_thread, ex._call_queue, ex._processes
    assert manager is not None
    assert call_queue is not None
    ex.shutdown(wait=False)
    manager.join()
    call_queue.join_thread()
    for process in processes.values():
        process.join()
        assert not process.is_alive()
    assert not manager.is_alive()
    assert list(results) == [abs(v) for v in range(-5, 5)]


def test_submit_from_an_atexit_hook_names_interpreter_shutdown(tmp_path: Any) -> None:
    import subprocess
    import sys

    script = tmp_path / "late.py"
    script.write_text(
        "import atexit, forkref\n"
        "@atexit.register\n"
        "def run_last():\n"
        "    try:\n"
        "        ex.submit(id, None)\n"
        "    except RuntimeError as err:\n"
        "        print('runtime-error:', err)\n"
        "if __name__ == '__main__':\n"
        "    ex = forkref.ProcessPoolExecutor(2)\n"
        "    ex.submit(id, 42).result()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "runtime-error: cannot schedule new futures after interpreter shutdown" in done.stdout


@pytest.mark.parametrize("ordered", [True, False], ids=["imap", "imap_unordered"])
def test_imap_computes_ahead_of_a_busy_consumer_within_its_window(ordered: bool) -> None:
    """While the consumer holds its first result, imap reads the input and runs
    tasks ahead, but never more than its window (about 512 items) beyond it."""
    read = 0

    def items() -> Any:
        nonlocal read
        for i in range(100_000):
            read += 1
            yield i

    with forkref.Pool(2) as pool:
        it = (pool.imap if ordered else pool.imap_unordered)(abs, items())
        next(it)
        last, deadline = -1, time.monotonic() + 60
        while read != last and time.monotonic() < deadline:  # until it stops reading
            last = read
            time.sleep(0.5)
        assert 100 < read <= 1024, f"read {read} items ahead of a consumer that took 1"
        assert len(list(it)) == 100_000 - 1
    assert read == 100_000
