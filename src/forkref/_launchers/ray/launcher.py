"""The Ray backend's launcher: a pool's workers as Ray actors, shared objects in Ray's store.

How data flows (``backend="ray"``)::

  caller thread          dispatcher thread (engine)          Ray              actor
  -------------          --------------------------          ---              -----
  submit(fn, args)
   pickle the task
   (RayTaskEncoder):
   big args, share()
   handles, big captured
   values -> References
                         RayChannel.send(task): queue it;
                         one call per batch of tasks:
                          each Reference -> ObjectTable:
                          ray.put once per pool ----------> object store
                          actor.run(calls, refs, forget,    (a copy per node
                                    *ObjectRefs) ---------> that needs it) --> run
                         RayChannel.read() <- pipe byte <- completion <------- replies
                          replies in call order,             callback
                          framed as forkref._engine.wire does

The parts, one module each: :mod:`~forkref._launchers.ray.session` (the Ray
instance), :mod:`~forkref._launchers.ray.pickler` (RayTaskEncoder),
:mod:`~forkref._launchers.ray.objects` (ObjectTable),
:mod:`~forkref._launchers.ray.channel` (RayChannel: batches, loss),
:mod:`~forkref._launchers.ray.memory` (reports), and
:mod:`~forkref._launchers.ray.actor` (what runs in the actor).

* **Once per pool, once per actor.** An object is put when a task first
  refers to it and its ObjectRef kept until the pool closes or the object
  is released; an actor receives the ObjectRef (top-level, so Ray resolves
  it zero-copy) with the first task that needs it and keeps the object
  while the driver keeps the ObjectRef.

Non-goals: no Ray task retries or actor restarts (a lost task is an error,
as in the local pools); no Ray Client (``ray://``) specifics; objects in the
store are read-only snapshots, never synchronised back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from forkref._engine.launcher import Launcher, LaunchError
from forkref._engine.model import Channel, Generation
from forkref._engine.worker import WorkerSetup
from forkref._errors import Error
from forkref._launchers.ray import placement
from forkref._launchers.ray.channel import PoolSide, RayChannel
from forkref._launchers.ray.memory import RayMemoryReport, object_store_use
from forkref._launchers.ray.objects import ObjectTable
from forkref._launchers.ray.pickler import RayTaskEncoder
from forkref._launchers.ray.placement import Shortage, actor_placed
from forkref._launchers.ray.session import RaySession, import_ray
from forkref._memory.report import ProcessMemory, memory_report
from forkref._share.autoshare import AutoSharer
from forkref._share.taskpickle import TaskEncoder

__all__ = ["RayLauncher"]


class RayLauncher(Launcher):
    """Starts a pool's workers as Ray actors: the engine's launcher for ``backend="ray"``.

    Workers do not inherit the parent (``inherits = False``) but references
    still travel (``carries_references``): every shared object a task refers
    to goes through the object store, once per pool.
    """

    name = "ray"
    inherits = False
    start_method = "ray"

    def __init__(
        self,
        processes: int,
        setup: WorkerSetup,
        *,
        address: str | None = None,
        init_options: Mapping[str, Any] | None = None,
        actor_options: Mapping[str, Any] | None = None,
        placement_timeout: float | None = None,
    ) -> None:
        """Join or start Ray now, in the pool's constructor, and size the workers' actors.

        ``placement_timeout``: seconds a worker's actor may wait for Ray to
        place it; None: :data:`~forkref._launchers.ray.placement.PLACEMENT_TIMEOUT`
        as it is when the pool is made.

        Raises:
            Error: Ray is missing, cannot be started or reached, or has fewer
                CPUs than the pool's workers ask for.
        """
        self.ray = import_ray()  # at the pool's creation: a missing Ray is said at once
        self.processes = processes
        self.setup = setup
        if placement_timeout is None:
            placement_timeout = placement.PLACEMENT_TIMEOUT
        self.actor_options: dict[str, Any] = {
            "max_restarts": 0,
            "max_task_retries": 0,
            # One worker per node before two on one: a pool of N on a cluster spreads out.
            "scheduling_strategy": "SPREAD",
        }
        self.actor_options.update(actor_options or {})
        self.objects = ObjectTable(self.ray)
        self.channels: list[RayChannel] = []
        self.session = RaySession(address, init_options)
        try:
            self.actor_options["num_cpus"] = self._cpus_per_worker()
            self.local_node: str | None = self.ray.get_runtime_context().get_node_id()
            from forkref._launchers.ray.actor import RayWorker

            self._actor_class = self.ray.remote(RayWorker).options(**self.actor_options)
        except BaseException:
            self.session.close()
            raise
        self._pool = PoolSide(
            self.ray, self.objects, self.local_node, placement_timeout, self._why_unplaced
        )

    def _cpus_per_worker(self) -> float:
        """The CPUs each actor asks for (:func:`~forkref._launchers.ray.session.cpus_per_worker`).

        A cluster the user chose (not the private instance, which is sized
        to the machine and shared) must have a CPU per worker, as
        ``ray.util.multiprocessing.Pool`` requires: more workers than CPUs
        there is a sizing mistake to say at once.
        """
        asked = self.actor_options.get("num_cpus")
        total, _ = self.session.cpus()
        need = self.processes * (1 if asked is None else asked)
        if total < need and (asked is not None or not self.session.private):
            raise Error(
                f"the Ray cluster has {total:g} CPUs and a backend='ray' pool of "
                f"{self.processes} workers needs {need:g} (one per worker): its workers would "
                "wait for ever. Use fewer processes, or add nodes to the cluster"
            )
        return self.session.claim(self.processes, asked)

    @property
    def carries_references(self) -> bool:
        """References travel: through the object store."""
        return True

    def encoder(self, sharer: AutoSharer) -> TaskEncoder:
        """The cloudpickle-based encoder (see :class:`RayTaskEncoder`)."""
        return RayTaskEncoder(sharer)

    def start_generation(self, gen: Generation) -> None:
        """Nothing to start: Ray was joined in the constructor, and there is one generation."""

    def launch(self, gen: Generation, wid: int) -> Channel | None:
        """Create one actor (Ray schedules it asynchronously) and its channel.

        None (the engine tries again at its next round) while the cluster has
        no free CPU for it: after a node is lost, an actor created then would
        wait for resources, and the tasks sent to it with it; the pool runs
        on the workers it has meanwhile. The first actor is always created:
        if Ray cannot place it, its channel says so after the bound.
        """
        if self.channels and not self._room_for_one():
            return None
        try:
            actor = self._actor_class.remote(self.setup)
        except Exception as err:
            raise LaunchError(
                f"cannot create a Ray actor for a pool worker: {err!r}. The initializer and "
                "its arguments must be serializable by Ray (cloudpickle)"
            ) from err
        channel = RayChannel(self._pool, wid, actor)
        self.channels.append(channel)
        return channel

    def _room_for_one(self) -> bool:
        try:
            _, free = self.session.cpus()
        except Exception:  # cannot tell: let Ray queue it
            return True
        return bool(free >= self.actor_options["num_cpus"])

    @staticmethod
    def _placed(channel: RayChannel) -> bool:
        """The channel's actor has its CPUs: it answered, or Ray gave it a process."""
        return channel.ready or (channel.alive() and actor_placed(channel.actor_id) is True)

    def _why_unplaced(self, channel: RayChannel) -> str | None:
        """The pool's error if ``channel``'s actor waits for CPUs that are not free; else None."""
        if actor_placed(channel.actor_id) is not False:
            return None  # placed (its initializer may be slow), or Ray would not tell
        total, free = self.session.cpus()
        pools, held = self.session.other_pools()
        shortage = Shortage(
            processes=self.processes,
            running=sum(1 for c in self.channels if c is not channel and self._placed(c)),
            each=self.actor_options["num_cpus"],
            total=total,
            free=free,
            other_pools=pools,
            held_by_them=held,
            seconds=round(time.monotonic() - channel.created),
        )
        return shortage.message(channel.actor_id) if shortage.hopeless() else None

    def startup_hint(self) -> str:
        return (
            "while Ray started its actor: the actor's log on its node (in the Ray session "
            "directory, logs/worker-*.err) names the error"
        )

    def memory(self, roles: dict[int, str]) -> RayMemoryReport:
        """The parent (psutil here), each actor (measured in the actor), each node's store."""
        parent = memory_report({os.getpid(): roles.get(os.getpid(), "parent")})
        actors, missing = self._actor_memory()
        stores, why = object_store_use(self.ray)
        return RayMemoryReport(parent.processes + actors, parent.missing + missing, stores, why)

    def _actor_memory(
        self, timeout: float = 10.0
    ) -> tuple[tuple[ProcessMemory, ...], tuple[int, ...]]:
        live = [c for c in self.channels if c._actor is not None and c.alive()]
        futures = [c._actor.memory.remote() for c in live]
        ready, _ = self.ray.wait(futures, num_returns=len(futures), timeout=timeout)
        done = set(ready)
        processes, missing = [], []
        for channel, future in zip(live, futures, strict=True):
            try:
                if future not in done:
                    raise TimeoutError
                node, pid, rss, uss, pss, swap = self.ray.get(future)
            except Exception:  # gone meanwhile, or too slow to answer
                if channel.pid is not None:
                    missing.append(channel.pid)
                continue
            role = f"ray worker@{channel.node_ip or str(node)[:12]}"
            processes.append(ProcessMemory(pid, role, rss, uss, pss, rss - uss, swap))
        return tuple(processes), tuple(missing)

    def close(self) -> None:
        """Kill what is left, drop the objects, shut Ray down if forkref started it. Idempotent."""
        for channel in self.channels:
            channel.kill()
            channel.close()
        self.channels.clear()
        self.objects.clear()
        self.session.close()
