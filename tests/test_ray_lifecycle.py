"""How a ``backend="ray"`` pool finds, starts and leaves Ray.

* Ray missing: an error that gives the install command (runs without Ray).
* No address and no Ray in this process: the pool starts a private local Ray
  sized to the machine, in its constructor, and shuts it down when it closes,
  leaving no process (tests/test_ray_coexist.py: several pools share it).
* An address: the pool connects, and at close disconnects and leaves the
  cluster running.
"""

from __future__ import annotations

import sys

import pytest

import forkref
import ray_harness
from ray_harness import no_leftovers  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(300)


@pytest.mark.smoke
def test_without_ray_the_error_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(forkref.Error, match=r"pip install 'forkref\[ray\]'"):
        forkref.Pool(2, backend="ray")
    with pytest.raises(forkref.Error, match=r"pip install 'forkref\[ray\]'"):
        forkref.ProcessPoolExecutor(2, backend="ray")


def cpus_of_the_cluster(_: object = None) -> float:
    import ray

    return float(ray.cluster_resources()["CPU"])


def machine_cpus() -> float:
    """The CPUs a bare ``ray.init()`` gives a local Ray here (cgroup limits included)."""
    from ray._private import utils

    return float(utils.get_num_cpus())


@pytest.mark.smoke
def test_no_address_starts_a_private_ray_sized_to_the_machine_and_stops_it() -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")
    assert not ray.is_initialized()
    cpus = machine_cpus()
    with ray_harness.private_ray():
        with forkref.Pool(3, backend="ray") as pool:
            assert ray.is_initialized(), "Ray starts in the constructor, not at the first map"
            assert ray_harness.ray_processes_alive()
            assert pool.map(cpus_of_the_cluster, range(3)) == [cpus] * 3
        assert not ray.is_initialized(), "the pool started Ray: it shuts it down"
        assert ray_harness.ray_processes_alive() == []


def test_an_address_is_joined_and_left_running() -> None:
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")
    with ray_harness.two_node_cluster(connect=False) as cluster:
        with forkref.ProcessPoolExecutor(2, backend="ray", address=cluster.address) as ex:
            assert list(ex.map(cpus_of_the_cluster, range(2))) == [2.0, 2.0]
        assert not ray.is_initialized(), "this process disconnected"
        assert cluster.head_node.remaining_processes_alive(), "the cluster is left running"
        with forkref.Pool(1, backend="ray", address=cluster.address) as pool:  # and again
            assert pool.apply(cpus_of_the_cluster) == 2.0
