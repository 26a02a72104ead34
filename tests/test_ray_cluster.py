"""``backend="ray"`` on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster).

Each test gets its own cluster: a head node and a second node, one CPU each,
so a pool of two has one actor on each node. Documented behaviour checked
here: a shared object is put once and read (zero-copy) on both nodes; when a
node is removed in the middle of a map, the tasks it was running fail with
:class:`forkref.WorkerDiedError` naming the lost node, the others complete on
the remaining node, and nothing hangs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

import ray_harness
from ray_harness import no_leftovers  # noqa: F401  (the fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")
np = pytest.importorskip("numpy")

import forkref  # noqa: E402

pytestmark = pytest.mark.timeout(180)
MiB = 2**20


@pytest.fixture
def cluster() -> Iterator[Any]:
    with ray_harness.two_node_cluster() as c:
        yield c


def node_and_sum(arr: Any, part: int) -> tuple[str, int, float]:
    """The node this runs on, this worker's USS after reading, and a sum over a slice."""
    import psutil

    total = float(arr[part::4].sum())
    node = ray.get_runtime_context().get_node_id()
    return node, psutil.Process().memory_full_info().uss, total


def node_after(seconds: float, i: int) -> tuple[str, int]:
    time.sleep(seconds)
    return ray.get_runtime_context().get_node_id(), i


def test_an_object_is_put_once_and_read_on_both_nodes(cluster: Any) -> None:
    arr = np.arange(32 * MiB // 8, dtype=np.float64)
    handle = forkref.share(arr)
    with forkref.Pool(2, backend="ray") as pool:
        pool.map(abs, [1, 2], chunksize=1)  # both actors up
        baseline = {pid: uss for pid, uss in _worker_uss(pool).items()}
        results = pool.starmap(node_and_sum, [(handle, i % 4) for i in range(16)], chunksize=1)
        assert len(pool._engine.launcher.objects) == 1, "put once for the whole pool"
        report = pool.memory()
    nodes = {node for node, _, _ in results}
    assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, "both nodes read it"
    assert [total for _, _, total in results] == [float(arr[i % 4 :: 4].sum()) for i in range(16)]
    assert all(uss - min(baseline.values()) < 32 * MiB // 2 for _, uss, _ in results), (
        "each node reads the object from its store, not a private copy"
    )
    assert len(report.object_stores) == 2
    assert report.object_store_error is None


def _worker_uss(pool: forkref.Pool) -> dict[int, int]:
    return {p.pid: p.uss for p in pool.memory().processes if p.role.startswith("ray worker")}


def test_removing_a_node_mid_map_fails_its_tasks_clearly_and_never_hangs(cluster: Any) -> None:
    (second,) = cluster.worker_nodes
    second_id = second.node_id
    with forkref.Pool(2, backend="ray") as pool:
        pool.map(abs, [1, 2], chunksize=1)
        results = [pool.apply_async(node_after, (1.0, i)) for i in range(8)]
        deadline = time.monotonic() + 60
        while not any(r.ready() for r in results) and time.monotonic() < deadline:
            time.sleep(0.05)  # both actors are busy now
        cluster.remove_node(second)
        outcomes = []
        for r in results:
            try:
                outcomes.append(("ok", r.get(timeout=120)))
            except forkref.WorkerDiedError as err:
                outcomes.append(("lost", str(err)))
        lost = [text for kind, text in outcomes if kind == "lost"]
        done = [value for kind, value in outcomes if kind == "ok"]
        assert lost, "the task running on the removed node fails"
        assert all("Ray actor" in t and second_id[:12] in t for t in lost), lost
        assert all("node" in t for t in lost), lost
        assert len(done) + len(lost) == 8
        assert any(node != second_id for node, _ in done), "the other node goes on"
        assert pool.map(abs, [-1, -2]) == [1, 2], "the pool still works on the head node"


def test_a_node_lost_breaks_the_executor_with_a_clear_error(cluster: Any) -> None:
    (second,) = cluster.worker_nodes
    with forkref.ProcessPoolExecutor(2, backend="ray") as ex:
        list(ex.map(abs, [1, 2]))
        futures = [ex.submit(node_after, 1.0, i) for i in range(4)]
        while not any(f.running() for f in futures):
            time.sleep(0.05)
        cluster.remove_node(second)
        errors = []
        for f in futures:
            try:
                f.result(timeout=120)
            except forkref.BrokenPoolError as err:
                errors.append(str(err))
        assert errors, "a lost node breaks the executor, as a lost worker breaks the stdlib's"
        assert any("Ray actor" in e for e in errors), errors


def test_no_ray_process_is_left_after_the_cluster_goes() -> None:
    with ray_harness.two_node_cluster(), forkref.Pool(2, backend="ray") as pool:
        assert pool.map(abs, [-3]) == [3]
    assert ray_harness.ray_processes_alive() == []
    assert not ray.is_initialized()
    assert os.environ.get("RAY_TMPDIR") is None or "frray-" not in os.environ["RAY_TMPDIR"]
