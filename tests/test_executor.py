"""forkref.ProcessPoolExecutor run the way CPython's test_concurrent_futures runs the stdlib one.

Real forked (and, where it applies, spawned) workers; the autouse
``no_leftovers`` fixture (conftest) fails a test that leaves a child behind.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

import forkref
from helpers import pid_of, sigkill_self

pytestmark = pytest.mark.timeout(60)


def mul(x: int, y: int) -> int:
    return x * y


def sleep_and_return(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def raising(msg: str) -> None:
    raise ValueError(msg)


_state: list[Any] = []


def init(value: Any) -> None:
    _state.append(value)


def get_state(_: object = None) -> list[Any]:
    return list(_state)


def bad_init() -> None:
    raise RuntimeError("init failed here")


CONTEXTS = ["fork", "forkserver", "spawn"]


@pytest.fixture(params=CONTEXTS)
def executor(request: pytest.FixtureRequest) -> Any:
    ctx = multiprocessing.get_context(request.param)
    with forkref.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        yield ex


@pytest.mark.smoke
def test_submit_and_result(executor: forkref.ProcessPoolExecutor) -> None:
    future = executor.submit(mul, 6, 7)
    assert future.result(timeout=30) == 42
    assert executor.submit(mul, x=2, y=3).result(timeout=30) == 6
    assert future.done()
    assert not future.cancelled()
    assert future.exception() is None


def test_map_order_chunks_and_multiple_iterables(executor: forkref.ProcessPoolExecutor) -> None:
    assert list(executor.map(mul, range(10), range(10))) == [x * x for x in range(10)]
    assert list(executor.map(mul, range(100), range(100), chunksize=7)) == [
        x * x for x in range(100)
    ]
    assert list(executor.map(mul, range(5), range(3))) == [0, 1, 4]  # zip semantics
    with pytest.raises(ValueError, match="chunksize"):
        executor.map(mul, [1], [1], chunksize=0)


def test_exception_reaches_the_caller_with_the_worker_traceback(
    executor: forkref.ProcessPoolExecutor,
) -> None:
    future = executor.submit(raising, "oops")
    with pytest.raises(ValueError, match="oops") as info:
        future.result(timeout=30)
    assert "in raising" in str(info.value.__cause__)
    assert isinstance(future.exception(), ValueError)
    it = executor.map(raising, ["a", "b"])
    with pytest.raises(ValueError, match="a"):
        next(it)


def test_map_timeout() -> None:
    ex = forkref.ProcessPoolExecutor(1)
    try:
        it = ex.map(sleep_and_return, [0, 10.0], timeout=0.5)
        assert next(it) is None
        with pytest.raises(concurrent.futures.TimeoutError):  # builtin TimeoutError from 3.11
            next(it)
    finally:
        ex._engine.terminate()  # do not wait for the sleeping task


def test_as_completed_wait_and_done_callbacks(executor: forkref.ProcessPoolExecutor) -> None:
    seen: list[int] = []
    futures = [executor.submit(mul, i, 1) for i in range(8)]
    futures[0].add_done_callback(lambda f: seen.append(f.result()))
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures, timeout=30)) == list(
        range(8)
    )
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert len(done) == 8
    assert not not_done
    assert seen == [0]


def test_cancel_a_queued_future_and_shutdown_cancel_futures() -> None:
    ex = forkref.ProcessPoolExecutor(1)
    running = ex.submit(sleep_and_return, 0.5, "first")
    while not running.running():  # in the call window (max_workers + 1), as the stdlib has it
        time.sleep(0.001)
    queued = [ex.submit(mul, i, 1) for i in range(20)]
    assert queued[-1].cancel()
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "first"
    assert queued[-1].cancelled()
    assert any(f.cancelled() for f in queued[:-1])  # most never started
    for f in queued:
        assert f.cancelled() or f.result() == queued.index(f)


def test_shutdown_semantics() -> None:
    ex = forkref.ProcessPoolExecutor(2)
    futures = [ex.submit(sleep_and_return, 0.05, i) for i in range(6)]
    ex.shutdown(wait=True)
    assert [f.result() for f in futures] == list(range(6))  # pending work completed
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(mul, 1, 1)
    ex.shutdown()  # idempotent
    nowait = forkref.ProcessPoolExecutor(2)
    late = nowait.submit(sleep_and_return, 0.2, "done")
    nowait.shutdown(wait=False)
    assert late.result(timeout=30) == "done"  # still runs after shutdown(wait=False)
    nowait.shutdown(wait=True)


def test_executor_collected_without_shutdown_finishes_its_work() -> None:
    ex = forkref.ProcessPoolExecutor(1)
    future = ex.submit(sleep_and_return, 0.2, 5)
    engine = ex._engine
    del ex
    assert future.result(timeout=30) == 5
    assert engine.join(timeout=30)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        forkref.ProcessPoolExecutor(0)
    with pytest.raises(TypeError, match="initializer"):
        forkref.ProcessPoolExecutor(1, initializer=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integer"):
        forkref.ProcessPoolExecutor(1, max_tasks_per_child=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        forkref.ProcessPoolExecutor(1, max_tasks_per_child=0)


@pytest.mark.parametrize("method", CONTEXTS)
def test_initializer(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with forkref.ProcessPoolExecutor(2, mp_context=ctx, initializer=init, initargs=("x",)) as ex:
        assert all(s == ["x"] for s in ex.map(get_state, range(6)))


@pytest.mark.parametrize("method", CONTEXTS)
def test_failing_initializer_breaks_the_executor(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with forkref.ProcessPoolExecutor(2, mp_context=ctx, initializer=bad_init) as ex:
        future = ex.submit(mul, 1, 1)
        with pytest.raises(BrokenProcessPool, match="init failed here"):
            future.result(timeout=30)
        with pytest.raises(forkref.BrokenPoolError):
            ex.submit(mul, 1, 1)


def test_max_tasks_per_child_works_with_fork() -> None:
    # The stdlib refuses this combination ("incompatible with the 'fork' start method").
    with forkref.ProcessPoolExecutor(2, max_tasks_per_child=2) as ex:
        pids = [f.result() for f in [ex.submit(pid_of) for _ in range(12)]]
        assert len(set(pids)) >= 6
        assert all(pids.count(p) <= 2 for p in pids)


@pytest.mark.smoke
def sigkill_self_once_exists(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    sigkill_self()


def test_sigkilled_worker_breaks_the_executor_like_the_stdlib(tmp_path: Any) -> None:
    ex = forkref.ProcessPoolExecutor(2)
    try:
        assert ex.submit(mul, 2, 2).result(timeout=30) == 4
        go = str(tmp_path / "go")
        crash = ex.submit(sigkill_self_once_exists, go)
        pending = [ex.submit(sleep_and_return, 5.0) for _ in range(4)]
        open(go, "w").close()  # the crash comes after the submits
        with pytest.raises(forkref.WorkerDiedError, match="SIGKILL") as info:
            crash.result(timeout=30)
        err = info.value
        assert isinstance(err, BrokenProcessPool)
        assert isinstance(err, forkref.Error)
        assert err.exitcode == -signal.SIGKILL
        assert err.pid is not None
        for f in pending:
            with pytest.raises(BrokenProcessPool):
                f.result(timeout=30)
        with pytest.raises(forkref.BrokenPoolError, match="terminated abruptly"):
            ex.submit(mul, 1, 1)
    finally:
        ex.shutdown(wait=True)


def test_submit_from_many_threads() -> None:
    with forkref.ProcessPoolExecutor(2) as ex:
        assert ex.submit(mul, 1, 1).result(timeout=30) == 1  # fork before the threads start
        results: list[int] = []
        lock = threading.Lock()

        def client(k: int) -> None:
            for i in range(20):
                value = ex.submit(mul, k, i).result(timeout=30)
                with lock:
                    results.append(value)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == sorted(k * i for k in range(4) for i in range(20))


def test_lambda_works_under_fork_and_fails_clearly_under_spawn() -> None:
    factor = 3
    with forkref.ProcessPoolExecutor(1) as ex:
        assert ex.submit(lambda x: x * factor, 5).result(timeout=30) == 15
    with forkref.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        future = ex.submit(lambda: 1)
        with pytest.raises(forkref.TaskPicklingError, match="'spawn' start method"):
            future.result(timeout=30)


def test_unpicklable_argument_is_set_on_the_future() -> None:
    with forkref.ProcessPoolExecutor(1, share_threshold=None) as ex:
        future = ex.submit(mul, threading.Lock(), 1)
        with pytest.raises(forkref.TaskPicklingError, match=r"argument 0 \(_thread.lock\)"):
            future.result(timeout=30)
        assert ex.submit(mul, 2, 3).result(timeout=30) == 6


def inc(x: int) -> int:
    return x + 1


def test_done_callback_that_submits_while_the_caller_forks_does_not_deadlock() -> None:
    """Review finding 1 (e20): the stdlib lets a done-callback submit follow-up work.

    The caller's submits fork a generation each (a fresh shared object), which
    pauses the dispatcher while it may be running ``chain``.
    """
    with forkref.ProcessPoolExecutor(2) as ex:
        chained: list[concurrent.futures.Future[int]] = []

        def chain(f: concurrent.futures.Future[int]) -> None:
            chained.append(ex.submit(inc, f.result()))

        firsts = []
        for i in range(12):
            late = forkref.share(bytearray(i + 1))
            firsts.append(ex.submit(len, late))
            firsts[-1].add_done_callback(chain)
        assert [f.result(timeout=30) for f in firsts] == list(range(1, 13))
        deadline = time.monotonic() + 30  # result() returns before the callbacks ran
        while len(chained) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(f.result(timeout=30) for f in chained) == list(range(2, 14))


def test_dead_fork_server_breaks_the_executor_without_forking_from_a_thread() -> None:
    """Review finding 9 (e12): no replacement worker is forked from the dispatcher thread."""
    ex = forkref.ProcessPoolExecutor(2)
    assert ex.submit(mul, 2, 3).result(timeout=30) == 6
    [zygote] = ex._engine.zygote_pids()
    os.kill(zygote, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not ex._broken and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "fork server" in str(ex._broken)
    with pytest.raises(BrokenProcessPool):
        ex.submit(mul, 1, 1)
    assert all(psutil_ppid(pid) != os.getpid() for pid in ex.pids())
    ex.shutdown()


def psutil_ppid(pid: int) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None
