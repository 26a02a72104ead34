"""Several ``backend="ray"`` pools in one process, and a pool whose workers Ray cannot place.

Modules forkref._launchers.ray.session and forkref._launchers.ray.placement,
on a real local Ray. Documented behaviour (docs/guide/ray.md):

* the pools of one process share one private local Ray, sized to the machine,
  started by the first pool's constructor and shut down when the last one
  closes, leaving no Ray process;
* their actors share the CPUs, so two and then three pools complete their
  maps on a machine whose CPUs the first pool alone asks for;
* a worker whose actor Ray cannot place (other Ray work holds the CPUs)
  fails the pool with a clear :class:`forkref.BrokenPoolError` after the
  placement bound; a worker that was placed but starts slowly (a long
  initializer) is never failed for it.
"""

from __future__ import annotations

import contextlib
import time

import pytest

import ray_harness
from ray_harness import no_leftovers  # noqa: F401  (the fixture)

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'forkref[ray]'")

import forkref  # noqa: E402
from forkref._launchers.ray import placement  # noqa: E402
from forkref._launchers.ray.session import cpus_per_worker  # noqa: E402

# Ray starts in 5-10 s and actors in 1-3 s each on a loaded 2-core machine: generous
# bounds, never timing claims.
pytestmark = pytest.mark.timeout(300)
WAIT = 120


def machine_cpus() -> float:
    """The CPUs a bare ``ray.init()`` gives a local Ray here (cgroup limits included)."""
    from ray._private import utils

    return float(utils.get_num_cpus())


@pytest.mark.smoke
def test_cpus_per_worker_is_one_while_it_fits_then_a_share_of_what_is_left() -> None:
    assert cpus_per_worker(total=2, held_by_our_pools=0, processes=2) == 1
    assert cpus_per_worker(total=8, held_by_our_pools=2, processes=4) == 1
    assert cpus_per_worker(total=2, held_by_our_pools=0, processes=3) == 0.6666
    assert cpus_per_worker(total=4, held_by_our_pools=3, processes=2) == 0.5
    assert cpus_per_worker(total=2, held_by_our_pools=2, processes=2) == 0
    assert cpus_per_worker(total=2, held_by_our_pools=5, processes=1) == 0


def test_two_then_three_pools_in_one_process_share_one_private_ray() -> None:
    assert not ray.is_initialized()
    with ray_harness.private_ray(), contextlib.ExitStack() as pools:
        first = pools.enter_context(forkref.Pool(2, backend="ray"))
        assert ray.is_initialized(), "Ray starts in the constructor, not at the first map"
        assert ray.cluster_resources()["CPU"] == machine_cpus(), "sized to the machine"
        assert first.map_async(abs, [-1, -2]).get(timeout=WAIT) == [1, 2]
        # The reported bug: this one waited for ever for a CPU the first pool held.
        second = pools.enter_context(forkref.Pool(2, backend="ray"))
        assert second.apply_async(abs, (-3,)).get(timeout=WAIT) == 3
        third = pools.enter_context(forkref.ProcessPoolExecutor(2, backend="ray"))
        assert list(third.map(abs, [-4, -5], timeout=WAIT)) == [4, 5]
        # All three at once, on the one instance.
        maps = [p.map_async(abs, range(-20, 0), chunksize=1) for p in (first, second)]
        futures = [third.submit(abs, -i) for i in range(20)]
        assert all(m.get(timeout=WAIT) == list(range(20, 0, -1)) for m in maps)
        assert [f.result(timeout=WAIT) for f in futures] == list(range(20))
        assert ray.cluster_resources()["CPU"] == machine_cpus(), "still the one instance"

        first.close()
        first.join()
        assert ray.is_initialized(), "the other pools still use it"
        assert second.map_async(abs, [-6]).get(timeout=WAIT) == [6]
        second.close()
        second.join()
        third.shutdown()
        assert not ray.is_initialized(), "the last pool shut the private Ray down"
        assert ray_harness.ray_processes_alive() == []


def test_a_pool_whose_worker_ray_cannot_place_fails_clearly_within_the_bound() -> None:
    with ray_harness.local_ray(num_cpus=2):

        @ray.remote(num_cpus=2)
        class Hog:  # other Ray work of this driver, holding every CPU
            def ping(self) -> int:
                return 1

        hog = Hog.remote()  # type: ignore[attr-defined]
        try:
            ray.get(hog.ping.remote(), timeout=WAIT)
            with forkref.Pool(1, backend="ray") as pool:
                result = pool.apply_async(abs, (-3,))
                with pytest.raises(forkref.BrokenPoolError) as info:
                    result.get(timeout=placement.PLACEMENT_TIMEOUT + 30)
                with pytest.raises(forkref.BrokenPoolError, match="no CPU"):
                    pool.apply_async(abs, (-4,)).get(timeout=WAIT)  # broken for later tasks
        finally:
            ray.kill(hog)
        text = str(info.value)
        assert "Ray found no CPU for a worker of this backend='ray' pool" in text
        assert "It needs 1 CPU for its 1 worker" in text, text
        assert "the Ray instance has 2 CPUs, 0 free: 2 held by other Ray work" in text, text
        assert "To fix it: stop that Ray work first" in text, text
        with forkref.Pool(2, backend="ray") as pool:  # the CPUs free again: a pool runs
            assert pool.map_async(abs, [-1, -2]).get(timeout=WAIT) == [1, 2]


def test_a_worker_placed_but_slow_to_start_is_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bound shorter than the initializer; every CPU is the pool's, none is free.
    monkeypatch.setattr(placement, "PLACEMENT_TIMEOUT", 2.0)
    with (
        ray_harness.local_ray(num_cpus=2),
        forkref.Pool(2, initializer=time.sleep, initargs=(8,), backend="ray") as pool,
    ):
        assert pool.map_async(abs, [-1, -2], chunksize=1).get(timeout=WAIT) == [1, 2]
