"""forkref.Pool and forkref.ProcessPoolExecutor with ``backend="ray"``, on a real local Ray.

The local pools' behaviour tests that take a ``pool`` or ``executor`` fixture
are imported from test_pool.py and test_executor.py and run here again, the
same functions with the same expected results, on pools whose workers are
Ray actors. The tests below them cover what those modules test with pools
of their own (initializer, maxtasksperchild, lost workers, shutdown,
lambdas), with the same task functions, plus what is Ray's own: shared
objects through the object store, memory reports, the Ray lifecycle.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import pytest

import ray_harness
from ray_harness import no_leftovers  # noqa: F401  (the fixture, sparing the module's Ray)

pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

import forkref  # noqa: E402

# The local pools' behaviour tests, collected here again with this module's fixtures.
from test_executor import (  # noqa: E402, F401
    bad_init,
    get_state,
    init,
    sleep_and_return,
    test_as_completed_wait_and_done_callbacks,
    test_exception_reaches_the_caller_with_the_worker_traceback,
    test_map_order_chunks_and_multiple_iterables,
    test_submit_and_result,
)
from test_pool import (  # noqa: E402, F401
    exit_now,
    mul,
    pid_of,
    raising,
    sqr,
    test_apply,
    test_async_results_and_callbacks,
    test_close_then_join_and_not_running,
    test_context_manager_terminates,
    test_error_callback_and_exception_with_worker_traceback,
    test_failing_initializer_breaks_the_pool_instead_of_respawning_forever,
    test_imap_infinite_generator_is_consumed_lazily,
    test_imap_ordered_and_unordered,
    test_imap_raises_at_the_failing_item,
    test_imap_unordered_goes_on_after_failing_items,
    test_initializer_runs_in_every_worker,
    test_map_and_starmap_keep_order,
    test_map_of_nothing,
    test_maxtasksperchild_replaces_workers,
    test_pool_size_and_worker_pids,
    test_successful_before_ready_raises,
    test_terminate_fails_pending_results_instead_of_hanging,
    test_timeouts,
)

# Actors start in 1-3 s each on a loaded 2-core machine: generous, never a timing claim.
# One local Ray for the module: pools join it and leave it running.
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("ray_instance")]

MiB = 2**20


@pytest.fixture
def make_pool() -> Any:
    """``forkref.Pool(...)`` on the Ray backend (what test_pool.py makes per start method)."""
    return functools.partial(forkref.Pool, backend="ray")


@pytest.fixture
def pool() -> Iterator[forkref.Pool]:
    with forkref.Pool(2, backend="ray") as p:
        yield p
        p.close()
        p.join()


@pytest.fixture
def executor() -> Iterator[forkref.ProcessPoolExecutor]:
    with forkref.ProcessPoolExecutor(2, backend="ray") as ex:
        yield ex


# -- what the local pools' modules test with pools of their own ---------------------------


def test_executor_initializer_runs_in_every_worker() -> None:
    with forkref.ProcessPoolExecutor(2, initializer=init, initargs=("x",), backend="ray") as ex:
        assert all(s == ["x"] for s in ex.map(get_state, range(6)))


def test_failing_initializer_breaks_the_executor() -> None:
    with (
        forkref.ProcessPoolExecutor(2, initializer=bad_init, backend="ray") as ex,
        pytest.raises(BrokenProcessPool, match="init failed here"),
    ):
        ex.submit(mul, 1, 1).result(timeout=60)


def test_max_tasks_per_child_replaces_executor_workers() -> None:
    with forkref.ProcessPoolExecutor(2, max_tasks_per_child=2, backend="ray") as ex:
        pids = [f.result() for f in [ex.submit(pid_of) for _ in range(4)]]
    assert len(set(pids)) >= 2


def test_a_lost_worker_fails_its_task_and_the_pool_goes_on() -> None:
    with forkref.Pool(2, backend="ray") as p:
        with pytest.raises(forkref.WorkerDiedError, match=r"Ray actor .* lost") as info:
            p.apply(exit_now, (3,))
        assert "worker process has died" in str(info.value)
        assert p.map(sqr, range(10)) == [x * x for x in range(10)]


def test_a_lost_worker_breaks_the_executor_like_the_stdlib() -> None:
    with forkref.ProcessPoolExecutor(2, backend="ray") as ex:
        assert ex.submit(mul, 2, 3).result(timeout=60) == 6
        with pytest.raises(BrokenProcessPool):
            ex.submit(exit_now, 3).result(timeout=60)
        with pytest.raises(forkref.BrokenPoolError):
            ex.submit(mul, 1, 1)


def test_cancel_and_shutdown_cancel_futures() -> None:
    ex = forkref.ProcessPoolExecutor(1, backend="ray")
    running = ex.submit(sleep_and_return, 0.5, "first")
    while not running.running():  # a worker took it (a state, not a timing assumption)
        time.sleep(0.001)
    queued = [ex.submit(mul, i, 1) for i in range(20)]
    assert queued[-1].cancel()
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result() == "first"
    assert queued[-1].cancelled()
    for f in queued:
        assert f.cancelled() or f.result() == queued.index(f)


def test_shutdown_without_wait_still_runs_pending_work() -> None:
    ex = forkref.ProcessPoolExecutor(2, backend="ray")
    futures = [ex.submit(sleep_and_return, 0.05, i) for i in range(6)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=60) for f in futures] == list(range(6))
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(mul, 1, 1)
    ex.shutdown(wait=True)


def test_lambdas_closures_and_local_functions_work() -> None:
    offset = 10

    def add(x: int) -> int:
        return x + offset

    with forkref.Pool(2, backend="ray") as p:
        assert p.map(add, range(3)) == [10, 11, 12]
        assert p.map(lambda x: x * offset, range(3)) == [0, 10, 20]
    with forkref.ProcessPoolExecutor(2, backend="ray") as ex:
        assert list(ex.map(lambda x, y: x - y, [5, 6], [1, 1])) == [4, 5]


def test_errors_keep_their_type_and_the_remote_traceback() -> None:
    with forkref.Pool(2, backend="ray") as p, pytest.raises(KeyError, match="key 3") as info:
        p.apply(raising, (3,))
    cause = info.value.__cause__
    assert cause is not None
    assert "in raising" in str(cause)


def test_unpicklable_result_is_an_error_not_a_hang() -> None:
    with (
        forkref.Pool(1, backend="ray") as p,
        pytest.raises(forkref.ResultPicklingError, match="cannot send the result"),
    ):
        p.apply(threading_lock)


def threading_lock() -> Any:
    import threading

    return threading.Lock()


# -- Ray's own: objects through the store -------------------------------------------------


def column_stats(df: Any, part: int) -> tuple[bool, int, float]:
    """Whether the frame's buffer is writable, this worker's pid, the sum of a slice."""
    column = df["a"].to_numpy()
    return bool(column.flags.writeable), os.getpid(), float(column[part::16].sum())


def test_a_shared_frame_is_put_once_and_read_zero_copy() -> None:
    frame = pd.DataFrame({"a": np.arange(16 * MiB // 8, dtype=np.float64)})
    handle = forkref.share(frame)
    with forkref.Pool(2, backend="ray") as p:
        results = p.starmap(column_stats, [(handle, i) for i in range(16)])
        launcher = p._engine.launcher
        assert len(launcher.objects) == 1, "one put for 16 tasks"
        report = p.memory()
    assert [total for _, _, total in results] == [
        float(frame["a"].to_numpy()[i::16].sum()) for i in range(16)
    ]
    assert not any(writable for writable, _, _ in results), "Ray hands numpy buffers read-only"
    assert isinstance(report, forkref.RayMemoryReport)
    assert {pid for _, pid, _ in results} <= {w.pid for w in report.by_role("ray worker@127.0.0.1")}
    (store,) = report.object_stores
    assert store.capacity == ray_harness.OBJECT_STORE


def test_big_arguments_go_by_reference_as_in_the_local_pools() -> None:
    big = bytes(4 * MiB)  # immutable: by reference without auto_share
    with forkref.Pool(2, backend="ray") as p:
        assert p.map(len, [big] * 6) == [len(big)] * 6
        assert len(p._engine.launcher.objects) == 1
    frame = np.ones(4 * MiB // 8)  # mutable: pickled unless auto_share
    with forkref.Pool(2, backend="ray", auto_share=True) as p:
        assert p.map(np.sum, [frame] * 4) == [float(len(frame))] * 4
        assert len(p._engine.launcher.objects) == 1


def test_automatic_shares_of_a_loop_do_not_pile_up() -> None:
    """No generation fork releases idle automatic shares on Ray: new ones do."""
    with forkref.Pool(2, backend="ray") as p:
        for i in range(6):
            big = bytes([i]) * (2 * MiB)  # a new immutable object per call: by reference
            assert p.apply(len, (big,)) == len(big)
            del big
        assert len(p._engine.sharer) <= 2  # the last one, and at most one not yet idle


def test_many_tiny_tasks() -> None:
    with forkref.Pool(2, backend="ray") as p:
        assert p.map(abs, range(-1000, 0), chunksize=1) == list(range(1000, 0, -1))
        results = [p.apply_async(abs, (-i,)) for i in range(300)]
        assert [r.get(timeout=60) for r in results] == list(range(300))


def test_concurrent_futures_helpers_work_on_ray_futures() -> None:
    with forkref.ProcessPoolExecutor(2, backend="ray") as ex:
        futures = [ex.submit(mul, i, 2) for i in range(10)]
        done = concurrent.futures.as_completed(futures, timeout=60)
        assert sorted(f.result() for f in done) == [2 * i for i in range(10)]


def test_a_pool_on_an_initialised_ray_leaves_it_running() -> None:
    import ray

    with forkref.Pool(2, backend="ray") as p:
        assert p.map(sqr, [3]) == [9]
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 2


def test_backend_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        forkref.Pool(1, backend="dask")
    with pytest.raises(ValueError, match="address= is for backend='ray'"):
        forkref.ProcessPoolExecutor(1, address="127.0.0.1:6379")


def test_context_does_not_apply() -> None:
    # Ray starts its own workers: the multiprocessing context is accepted and unused.
    with forkref.Pool(1, context=multiprocessing.get_context("spawn"), backend="ray") as p:
        assert p.apply(sqr, (4,)) == 16


def test_a_cluster_with_fewer_cpus_than_workers_is_refused_clearly() -> None:
    import ray

    # The module's Ray has 2 CPUs: said by the constructor, before any task waits.
    with pytest.raises(forkref.Error, match=r"has 2 CPUs .* 3 workers needs 3"):
        forkref.Pool(3, backend="ray")
    assert ray.is_initialized(), "a Ray the pool did not start is left running"
    with forkref.Pool(2, backend="ray") as p:  # and the refused pool holds no CPU
        assert p.map(sqr, [1, 2]) == [1, 4]
