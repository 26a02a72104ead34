"""``task_timeout=``: a task running too long fails alone, its worker is replaced, the pool goes on.

Real pools under every start method. The tasks that must time out sleep a
minute against a timeout of a second or two; the bounds given to ``get``
only keep a broken build from hanging the suite, they time nothing.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
import re
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

import forkref
from conftest import wait_until

METHODS = ["fork", "forkserver", "spawn"]
_HANG = 60.0  # a task that would run this long is stopped by the timeout
_BOUND = 30.0  # seconds before a broken build counts as hung


def nap(x: Any) -> Any:
    """Returns ``x`` at once, or sleeps a minute for ``"slow"``."""
    if x == "slow":
        time.sleep(_HANG)
    return x


def nap_for(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def wait_for_file(path: str) -> str:
    """Block until ``path`` exists (the test creates it), at most ``_BOUND`` seconds."""
    deadline = time.monotonic() + _BOUND
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "never released"
        time.sleep(0.01)
    return "released"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(params=METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


def test_a_task_past_the_timeout_fails_alone_and_its_worker_is_replaced(
    ctx: Any, tmp_path: Path
) -> None:
    flag = str(tmp_path / "release")
    # The other task starts 3 s into the slow one's 4 s and ends when the slow one
    # has been failed: its own clock has 3 s to spare for a loaded machine.
    pool = forkref.Pool(2, context=ctx, task_timeout=4)
    try:
        assert pool.map(abs, range(-4, 0)) == [4, 3, 2, 1]  # both workers up
        before = set(pool.pids())
        slow = pool.apply_async(nap, ("slow",))
        time.sleep(3)  # so the other task's own clock ends well after the slow one's
        # Runs in the other worker while the slow one is stopped; returns once released.
        other = pool.apply_async(wait_for_file, (flag,))
        with pytest.raises(forkref.TaskTimeoutError) as info:
            slow.get(_BOUND)
        Path(flag).touch()
        assert other.get(_BOUND) == "released"
        message = str(info.value)
        assert message.startswith("the task nap() ran past task_timeout=4 (seconds)")
        assert message.endswith("raise task_timeout, or split the work into shorter tasks")
        assert "chunksize" not in message  # not a map: no advice about chunks
        killed = int(re.search(r"\(pid (\d+)\)", message).group(1))  # type: ignore[union-attr]
        assert killed in before
        assert wait_until(lambda: gone(killed))
        # The pool goes on, with a replacement.
        assert pool.map(abs, range(-20, 0)) == list(range(20, 0, -1))
        assert wait_until(lambda: len(pool.pids()) == 2)
        assert killed not in pool.pids()
    finally:
        pool.close()
        pool.join()


def test_the_tasks_queued_behind_a_timed_out_one_run_on_its_replacement(ctx: Any) -> None:
    pool = forkref.Pool(1, context=ctx, task_timeout=1)
    try:
        slow = pool.apply_async(nap, ("slow",))
        behind = [pool.apply_async(nap, (i,)) for i in range(5)]  # one is sent behind it
        with pytest.raises(forkref.TaskTimeoutError):
            slow.get(_BOUND)
        assert [r.get(_BOUND) for r in behind] == [0, 1, 2, 3, 4]
    finally:
        pool.close()
        pool.join()


def test_the_error_is_a_forkref_error_and_a_timeout_error_that_pickles() -> None:
    err = forkref.TaskTimeoutError("the task f() ran past task_timeout=1 (seconds)")
    assert isinstance(err, forkref.Error)
    assert isinstance(err, TimeoutError)
    assert type(err).__module__ == "forkref"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is forkref.TaskTimeoutError
    assert str(again) == str(err)


def test_a_map_item_past_the_timeout_is_named_and_the_next_map_is_right(ctx: Any) -> None:
    with forkref.Pool(2, context=ctx, task_timeout=1) as pool:
        with pytest.raises(forkref.TaskTimeoutError, match=r"^item 2 of the map of nap\(\)"):
            pool.map(nap, [0, 1, "slow", 3])
        assert pool.map(nap, range(10)) == list(range(10))
        it = pool.imap(nap, [0, 1, "slow", 3, 4])
        assert [next(it), next(it)] == [0, 1]
        with pytest.raises(forkref.TaskTimeoutError, match="item 2 of the map"):
            next(it)
        assert list(it) == [3, 4]
        got, errors = [], []
        unordered = pool.imap_unordered(nap, [0, 1, "slow", 3, 4])
        while True:
            try:
                got.append(next(unordered))
            except StopIteration:
                break
            except forkref.TaskTimeoutError as err:
                errors.append(err)
        assert sorted(got) == [0, 1, 3, 4]
        assert len(errors) == 1
        failed = pool.map_async(nap, ["slow", 1])
        with pytest.raises(forkref.TaskTimeoutError):
            failed.get(_BOUND)
        assert pool.starmap(nap_for, [(0, "a"), (0, "b")]) == ["a", "b"]


def test_with_chunks_the_timeout_applies_to_each_chunk_as_one_task(ctx: Any) -> None:
    with forkref.Pool(2, context=ctx, task_timeout=1) as pool:
        with pytest.raises(forkref.TaskTimeoutError) as info:
            pool.map(nap, [0, 1, 2, "slow", 4, 5], chunksize=2)
        message = str(info.value)
        assert message.startswith("the chunk of items 2 to 3 of the map of nap()")
        assert "use a smaller chunksize" in message
        assert pool.map(nap, range(9), chunksize=3) == list(range(9))


def test_the_clock_starts_when_the_worker_starts_the_task_not_when_it_is_queued(
    ctx: Any,
) -> None:
    # One worker, four tasks of 2 s, each sent (two deep) or queued long before
    # it starts: each would run past the timeout if waiting counted.
    with forkref.Pool(1, context=ctx, task_timeout=3) as pool:
        assert pool.starmap(nap_for, [(2.0, i) for i in range(4)], chunksize=1) == [0, 1, 2, 3]


def test_a_slow_initializer_does_not_count_against_the_first_task(ctx: Any) -> None:
    with forkref.Pool(1, time.sleep, (2,), context=ctx, task_timeout=1) as pool:
        assert pool.apply(abs, (-1,)) == 1


def test_an_executor_future_past_the_timeout_fails_and_the_executor_goes_on(ctx: Any) -> None:
    with forkref.ProcessPoolExecutor(2, mp_context=ctx, task_timeout=1) as ex:
        slow = ex.submit(nap, "slow")
        quick = [ex.submit(nap_for, 0.1, i) for i in range(4)]
        err = slow.exception(_BOUND)
        assert isinstance(err, forkref.TaskTimeoutError)
        assert isinstance(err, TimeoutError)
        assert "the task nap()" in str(err)
        assert [f.result(_BOUND) for f in quick] == [0, 1, 2, 3]
        # Not broken: only that future failed.
        assert ex.submit(abs, -5).result(_BOUND) == 5
        results = ex.map(nap, [0, "slow", 2])
        assert next(results) == 0
        with pytest.raises(forkref.TaskTimeoutError, match=r"^item 1 of the map of nap\(\)"):
            next(results)
        assert list(ex.map(abs, range(-3, 0))) == [3, 2, 1]
        done, _ = concurrent.futures.wait([ex.submit(abs, -1)], timeout=_BOUND)
        assert len(done) == 1


@pytest.mark.parametrize("bad", [0, -1.5, float("nan")])
def test_a_timeout_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="task_timeout must be seconds > 0, or None"):
        forkref.Pool(1, task_timeout=bad)
    with pytest.raises(ValueError, match="task_timeout must be seconds > 0, or None"):
        forkref.ProcessPoolExecutor(1, task_timeout=bad)


@pytest.mark.parametrize("bad", ["1", True, [1]])
def test_a_timeout_must_be_a_number(bad: Any) -> None:
    with pytest.raises(TypeError, match="task_timeout must be a number of seconds or None"):
        forkref.Pool(1, task_timeout=bad)


def test_the_ray_backend_refuses_a_timeout_at_construction() -> None:
    with pytest.raises(ValueError, match="task_timeout is not supported with backend='ray'"):
        forkref.Pool(1, backend="ray", task_timeout=5)
    with pytest.raises(ValueError, match="task_timeout is not supported with backend='ray'"):
        forkref.ProcessPoolExecutor(1, backend="ray", task_timeout=5)
