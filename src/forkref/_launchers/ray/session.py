"""The Ray instance ``backend="ray"`` pools run on, and the CPUs this process's pools hold of it.

Which instance, decided in the pool's constructor (so that Ray's start-up,
5-7 s, is not paid by the first map)::

  Ray already initialised in this process ---------> use it, leave it as it is
    (by the user, or for an earlier pool)            (or as the pool that started it says)
  address= given, or RAY_ADDRESS set --------------> connect; the last pool to close
                                                     disconnects; the cluster runs on
  otherwise ---------------------------------------> start ONE private local instance for
                                                     every pool of this process, sized to
                                                     the machine (ray.init's default);
                                                     the last pool to close shuts it down

A process has one Ray connection, so every live session is on the same
instance; the sessions count its users and record the CPUs each pool's
workers ask for (:meth:`RaySession.claim`), so that pools of this process
never wait for each other's CPUs (see :func:`cpus_per_worker`).

Ray is imported here, lazily (:func:`import_ray`), never at import.

Non-goals: no Ray Client (``ray://``) specifics; a cluster forkref did not
start is never shut down; the CPUs held by Ray work that is not a forkref
pool of this process are Ray's to share, not forkref's.
"""

from __future__ import annotations

import math
import os
import threading
import types
from collections.abc import Mapping
from typing import Any

from forkref._errors import Error

__all__ = ["INSTALL", "RaySession", "cpus_per_worker", "import_ray"]

INSTALL = "pip install 'forkref[ray]'"

#: Ray accepts fractional resources down to this step.
_CPU_STEP = 0.0001


def import_ray() -> types.ModuleType:
    """Import Ray (lazily: only a ``backend="ray"`` pool needs it).

    Raises:
        Error: Ray is not installed; the message gives the install command.
    """
    try:
        import ray
    except ImportError as err:
        raise Error(
            f"backend='ray' needs Ray, which cannot be imported here ({err}); install it with "
            f"{INSTALL} (Ray 2.60 or later), or use the local backend (the default)"
        ) from err
    module: types.ModuleType = ray
    return module


def cpus_per_worker(total: float, held_by_our_pools: float, processes: int) -> float:
    """The CPUs each worker actor of a new pool asks Ray for.

    One per worker while the pool fits beside this process's other pools;
    otherwise an equal share of what they left (down to zero), as
    ``ray.util.multiprocessing.Pool`` runs its actors at ``num_cpus=0``: the
    operating system shares the cores, as it does between two local pools.
    """
    left = max(total - held_by_our_pools, 0.0)
    if left >= processes:
        return 1.0
    return round(math.floor(left / processes / _CPU_STEP) * _CPU_STEP, 4)


class _Users:
    """The sessions of this process (under ``lock``): how many, and the CPUs each pool holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ours = 0  # sessions on the instance forkref started or connected to
        self.gcs: str | None = None  # that instance's address, to know it again
        self.private = False  # that instance is a local one forkref started
        self.claims: dict[int, float] = {}  # id(session) -> CPUs its pool's workers ask for

    def started(self, private: bool, gcs: str) -> None:
        """forkref started (or joined) a new instance: what was counted went with the old one."""
        self.ours, self.gcs, self.private = 0, gcs, private
        self.claims.clear()


_USERS = _Users()


class RaySession:
    """Ray as one pool uses it: joined (or started) in the pool's constructor, left at close.

    Attributes:
        ours: forkref started this instance or connected to it (and so
            shuts it down or disconnects when its last pool closes).
        private: the instance is the private local one forkref started,
            sized to the machine (not a cluster the user chose).

    ``init_options`` go to ``ray.init`` as they are (``object_store_memory``,
    ``runtime_env``, ...).
    """

    def __init__(self, address: str | None, init_options: Mapping[str, Any] | None = None) -> None:
        self.ray = ray = import_ray()
        self._closed = False
        with _USERS.lock:
            if ray.is_initialized():
                # Ray that forkref started and still counts users of; not one that
                # the user started after shutting forkref's down.
                self.gcs = ray.get_runtime_context().gcs_address
                self.ours = _USERS.ours > 0 and self.gcs == _USERS.gcs
            else:
                private = _start(ray, address, init_options)
                self.gcs = ray.get_runtime_context().gcs_address
                _USERS.started(private, self.gcs)
                self.ours = True
            self.private = self.ours and _USERS.private
            if self.ours:
                _USERS.ours += 1

    def cpus(self) -> tuple[float, float]:
        """``(total, free)`` CPUs of the instance, as Ray reports them now."""
        total = float(self.ray.cluster_resources().get("CPU", 0))
        free = float(self.ray.available_resources().get("CPU", 0))
        return total, free

    def claim(self, processes: int, each: float | None = None) -> float:
        """Record this pool's workers; return the CPUs each asks for.

        ``each``: what the caller asked for; None: :func:`cpus_per_worker`.
        """
        total, _ = self.cpus()
        with _USERS.lock:
            if each is None:
                held = sum(c for k, c in _USERS.claims.items() if k != id(self))
                each = cpus_per_worker(total, held, processes)
            _USERS.claims[id(self)] = each * processes
        return each

    def other_pools(self) -> tuple[int, float]:
        """``(pools, CPUs)``: this process's other live pools that hold CPUs, and how many."""
        with _USERS.lock:
            held = [c for k, c in _USERS.claims.items() if k != id(self) and c > 0]
        return len(held), sum(held)

    def close(self) -> None:
        """Shut Ray down if this was the last pool on an instance forkref started. Idempotent.

        On a cluster forkref connected to, the shutdown only disconnects
        this process; the cluster runs on.
        """
        if self._closed:
            return
        self._closed = True
        with _USERS.lock:
            _USERS.claims.pop(id(self), None)
            if not self.ours or self.gcs != _USERS.gcs:  # not ours, or gone and replaced
                return
            _USERS.ours -= 1
            if _USERS.ours == 0:
                _USERS.private = False
                if self.ray.is_initialized():
                    self.ray.shutdown()


def _start(
    ray: types.ModuleType, address: str | None, init_options: Mapping[str, Any] | None
) -> bool:
    """``ray.init`` for the first pool; True when it started the private local instance.

    The private instance is started with ``address="local"``: never attach
    to another user's instance on this machine by accident. It is not sized
    to the pool (the next pool of this process shares it): Ray counts the
    machine's CPUs, as a bare ``ray.init()`` does.
    """
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    options.update(init_options or {})
    private = address == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))
    if private:
        address = "local"
    try:
        ray.init(address=address, **options)
    except Exception as err:
        where = "start a local Ray instance" if private else (
            f"connect to the Ray cluster at {address or os.environ['RAY_ADDRESS']!r}"
        )
        raise Error(
            f"cannot {where} for a backend='ray' pool: {err!r}; check the address "
            "(`ray status` on the head node prints it) and that this Ray and "
            "Python match the cluster's"
        ) from err
    return private
