"""The Ray backend's actor side and its channel, on a real local Ray.

Modules forkref._launchers.ray (launcher, channel, objects, pickler) and
forkref._launchers.ray.actor. Tasks are pickled by the Ray encoder and driven
through the channels as the pool engine's dispatcher does
(tests/ray_harness.py); the pool-level behaviour is tested with the local
pools' tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

import ray_harness
from ray_harness import ChannelDriver, no_leftovers  # noqa: F401  (the fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

import forkref  # noqa: E402
from forkref._engine.worker import WorkerSetup  # noqa: E402
from forkref._launchers.ray.launcher import RayLauncher  # noqa: E402
from forkref._share.taskpickle import CALL, MAP  # noqa: E402

MiB = 2**20


@pytest.fixture
def launcher(ray_instance: Any) -> Iterator[RayLauncher]:
    launcher = RayLauncher(2, WorkerSetup(None, (), None, "ray", executor=False))
    try:
        yield launcher
    finally:
        launcher.close()
    assert ray.is_initialized(), "a pool on a Ray it did not start must leave it running"


def frame_reader(df: Any) -> tuple[bool, int, int, float]:
    """Whether the frame's buffer is writable, its id, this pid, and a sum."""
    column = df["a"].to_numpy()
    return bool(column.flags.writeable), id(df), os.getpid(), float(column[:1000].sum())


def uss_while_reading(df: Any) -> tuple[int, int]:
    """This worker's USS before and after touching every value of the frame."""
    import psutil

    before = psutil.Process().memory_full_info().uss
    float(df["a"].to_numpy().sum())
    return before, psutil.Process().memory_full_info().uss


def test_shared_frame_arrives_zero_copy_read_only_once_per_actor(launcher: RayLauncher) -> None:
    frame = pd.DataFrame({"a": np.arange(32 * MiB // 8, dtype=np.float64)})
    handle = forkref.share(frame)
    driver = ChannelDriver(launcher)
    channel = driver.launch()
    results = driver.run(channel, CALL, frame_reader, [((handle,), {}) for _ in range(4)])
    assert all(ok for ok, _ in results), results
    writable, ids, pids, sums = zip(*(value for _, value in results), strict=True)
    assert not any(writable), "Ray hands numpy buffers read-only"
    assert len(set(ids)) == 1, "one actor resolves a reference to one object"
    assert len(set(pids)) == 1
    assert set(sums) == {float(np.arange(1000).sum())}
    assert len(launcher.objects) == 1, "put once per pool"
    ((ok, (before, after)),) = driver.run(channel, CALL, uss_while_reading, [((handle,), {})])
    assert ok
    assert after - before < 32 * MiB // 4, "reading the frame must not copy it into the worker"


def test_big_arguments_and_captured_values_go_through_the_store(launcher: RayLauncher) -> None:
    big = np.ones(4 * MiB // 8)
    driver = ChannelDriver(launcher)
    channel = driver.launch()
    results = driver.run(channel, MAP, lambda i: float(big[i]) + i, [[0, 1, 2]])
    assert results == [(True, [1.0, 2.0, 3.0])]
    results = driver.run(channel, CALL, np.sum, [((big,), {}) for _ in range(3)])
    assert [value for _, value in results] == [float(len(big))] * 3
    assert len(launcher.objects) == 1, "the captured array and the argument: one object, one put"
    fn_blob = driver.encoder.encode_function(lambda i: big[i]).blob
    assert len(fn_blob) < 10_000, "a captured big value travels by reference"


def test_lambdas_closures_and_remote_tracebacks(launcher: RayLauncher) -> None:
    driver = ChannelDriver(launcher)
    channel = driver.launch()
    offset = 10

    def add(x: int) -> int:
        return x + offset

    assert driver.run(channel, MAP, add, [[1, 2]]) == [(True, [11, 12])]
    assert driver.run(channel, MAP, lambda x: x * offset, [[3]]) == [(True, [30])]

    def fails(x: int) -> int:
        raise KeyError(f"no {x}")

    ((ok, err),) = driver.run(channel, MAP, fails, [[7]])
    assert ok is False
    assert isinstance(err, KeyError)
    assert "in fails" in str(err.__cause__)
    assert "no 7" in str(err.__cause__)


def test_functions_of_the_drivers_main_module_work() -> None:
    """A script's own functions, lambdas and globals: Ray workers do not share its __main__."""
    script = textwrap.dedent(
        """
        import ray_harness, forkref
        from forkref._launchers.ray.launcher import RayLauncher
        from forkref._share.taskpickle import CALL, MAP
        from forkref._engine.worker import WorkerSetup

        SCALE = 3

        def scaled(x):
            return x * SCALE

        class Odd(Exception):
            pass

        def odd(x):
            raise Odd(x)

        with ray_harness.local_ray(num_cpus=1):
            launcher = RayLauncher(1, WorkerSetup(None, (), None, "ray", False))
            try:
                driver = ray_harness.ChannelDriver(launcher)
                channel = driver.launch()
                print(driver.run(channel, MAP, scaled, [[1, 2]]))
                print(driver.run(channel, MAP, lambda x: x + SCALE, [[1]]))
                ((ok, err),) = driver.run(channel, MAP, odd, [[5]])
                print(type(err) is Odd, err.args)
            finally:
                launcher.close()
        """
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, *sys.path]))
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[-3:] == ["[(True, [3, 6])]", "[(True, [4])]", "True (5,)"], out.stdout


def test_a_lost_actor_fails_its_running_batch_and_ends_the_channel(launcher: RayLauncher) -> None:
    import time

    driver = ChannelDriver(launcher)
    channel = driver.launch()
    # A slow call goes at once; the next two tasks wait and leave together, as one
    # batch, when it is done: abs(1) runs, then os._exit kills the actor.
    tasks = driver.encode(CALL, time.sleep, [((1,), {})])
    tasks += driver.encode(CALL, abs, [((1,), {})])
    tasks += driver.encode(CALL, os._exit, [((3,), {})])
    for task in tasks:
        channel.send(task)
    results = driver.collect(channel, tasks)
    assert results[0] == (True, None)
    # The batch that was running: abs(1) ran but its result is lost with the actor;
    # the last task of the batch is left to the engine, which fails it as the task
    # the worker was running when its channel ended.
    ok, err = results[1]
    assert ok is False
    assert isinstance(err, forkref.WorkerDiedError), err
    assert "Ray actor" in str(err)
    assert "result is lost" in str(err)
    assert results[2] == (None, "unsent")
    with pytest.raises(EOFError):
        channel.read()
    assert "lost" in channel.describe_exit(None)
    with pytest.raises(OSError, match="gone"):
        channel.send(tasks[0])


def test_many_tiny_tasks_travel_in_few_calls(launcher: RayLauncher) -> None:
    driver = ChannelDriver(launcher)
    channel = driver.launch()
    calls = 0
    real_flush = channel._flush

    def counting_flush() -> None:
        nonlocal calls
        calls += 1
        real_flush()

    channel._flush = counting_flush  # type: ignore[method-assign]
    results = driver.run(channel, CALL, abs, [((-i,), {}) for i in range(1000)])
    assert [value for _, value in results] == list(range(1000))
    assert calls < 250, f"{calls} actor calls for 1000 tiny tasks: they were not batched"


def test_memory_reports_each_actor_and_the_object_store(launcher: RayLauncher) -> None:
    driver = ChannelDriver(launcher)
    channels = [driver.launch(), driver.launch()]
    handle = forkref.share(np.ones(8 * MiB // 8))
    for channel in channels:
        assert driver.run(channel, CALL, len, [((handle,), {})]) == [(True, MiB)]
    report = launcher.memory({os.getpid(): "parent"})
    assert [p.role for p in report.by_role("ray worker@127.0.0.1")] == ["ray worker@127.0.0.1"] * 2
    workers = report.by_role("ray worker@127.0.0.1")
    assert {p.pid for p in workers} == {c.pid for c in channels}
    assert all(p.uss > 0 for p in workers)
    assert report.object_store_error is None
    (store,) = report.object_stores
    assert store.capacity == ray_harness.OBJECT_STORE
    assert report.by_role("parent")[0].pid == os.getpid()
