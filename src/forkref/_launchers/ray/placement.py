"""How long a pool's worker may wait for Ray to place its actor, and what is said when Ray cannot.

Ray queues an actor that no node has the CPUs for, silently and for ever;
so would the tasks sent to it. A pool bounds that wait::

  launch: actor created ---> Ray places it on a node with the CPUs it asks for
  RayChannel: no answer from the actor after PLACEMENT_TIMEOUT s (a Deadline wakes it)
    look (dispatcher thread): does the actor have a process (Ray's actor table)?
      yes, or Ray cannot tell, or CPUs look free --> wait on, look again in RECHECK s:
                                                     a slow initializer, or a worker
                                                     process starting slowly, is no fault
      no, and too few CPUs are free -------------> the channel ends with a Shortage's
                                                     message; the engine breaks the pool
                                                     with it (BrokenPoolError)

Non-goals: no wait for anything but CPUs is bounded (custom resources,
memory, a runtime_env being installed); no actor is moved or resized once
created.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PLACEMENT_TIMEOUT", "RECHECK", "Deadline", "Shortage", "actor_placed"]

#: Seconds a worker's actor may wait for Ray to place it before the pool fails.
PLACEMENT_TIMEOUT = 30.0
#: Seconds between later looks, once a wait past the bound turned out to be no shortage.
RECHECK = 2.0


class Deadline:
    """Calls ``wake`` (from a timer thread) once ``seconds`` have passed, unless cancelled."""

    def __init__(self, seconds: float, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._at = 0.0
        self.extend(seconds)

    def due(self) -> bool:
        """The time has come (and the deadline was not cancelled)."""
        return self._timer is not None and time.monotonic() >= self._at

    def extend(self, seconds: float) -> None:
        """Wake again ``seconds`` from now instead."""
        timer = threading.Timer(seconds, self._wake)
        timer.daemon = True
        timer.name = "forkref-ray-placement"
        with self._lock:
            self.cancel_locked()
            self._at = time.monotonic() + seconds
            self._timer = timer
            timer.start()

    def cancel(self) -> None:
        """No wake-up any more. Idempotent."""
        with self._lock:
            self.cancel_locked()

    def cancel_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def actor_placed(actor_id: str) -> bool | None:
    """Whether Ray gave the actor a worker process (None: Ray would not tell).

    From the GCS actor table (``ray._private.state``: a Ray release may
    change it, hence None rather than a guess): an actor waiting for
    resources has no pid; one placed has a pid while its ``__init__``
    (the pool's initializer) runs.
    """
    try:
        from ray._private import state

        info = state.actors(actor_id)
    except Exception:
        return None
    if not isinstance(info, dict) or "State" not in info:
        return None
    waiting = info["State"] in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")
    return bool(info.get("Pid")) or not waiting


@dataclass(frozen=True)
class Shortage:
    """Why a pool's worker waits for CPUs: the figures its message gives.

    Attributes:
        processes: the pool's workers.
        running: those of them Ray placed.
        each: CPUs each worker's actor asks for.
        total: CPUs of the Ray instance.
        free: CPUs free now.
        other_pools: this process's other live ``backend="ray"`` pools holding CPUs.
        held_by_them: the CPUs they hold.
        seconds: how long the worker waited.
    """

    processes: int
    running: int
    each: float
    total: float
    free: float
    other_pools: int
    held_by_them: float
    seconds: float

    def hopeless(self) -> bool:
        """Too few CPUs are free for one more worker (else the wait is something else)."""
        return self.free < self.each

    def message(self, actor: str) -> str:
        """The pool's error: the CPUs it needs, the CPUs free, who holds them, the fixes."""
        need = self.each * self.processes
        return (
            f"Ray found no CPU for a worker of this backend='ray' pool within {self.seconds:g} s "
            f"(Ray actor {actor[:12]} is still waiting), so the pool cannot run its tasks. It "
            f"needs {_cpus(need)} for its {_count(self.processes, 'worker')} ({self.each:g} "
            f"each, {self.running} placed so far); the Ray instance has {_cpus(self.total)}, "
            f"{self.free:g} free{self._holders()}. To fix it: {self._fixes()}; then create "
            "the pool again"
        )

    def _holders(self) -> str:
        other_work = self.total - self.free - self.held_by_them - self.each * self.running
        held = []
        if self.other_pools:
            pools = _count(self.other_pools, "other backend='ray' pool")
            held.append(f"{self.held_by_them:g} held by {pools} of this process")
        if other_work >= 0.01:
            held.append(
                f"{other_work:g} held by other Ray work (tasks, actors or placement groups "
                "of this or another driver)"
            )
        return ": " + ", ".join(held) if held else ""

    def _fixes(self) -> str:
        fixes = []
        if self.other_pools:
            fixes.append("close the other pool first (close() and join(), or end its with-block)")
        if self.total - self.free - self.held_by_them > self.each * self.running + 0.01:
            fixes.append("stop that Ray work first")
        fit = math.floor((self.free + self.each * self.running) / self.each) if self.each else 0
        if 0 < fit < self.processes:
            fixes.append(f"use fewer processes ({fit} fit now)")
        elif self.total < self.each * self.processes:
            fixes.append("use fewer processes, or add nodes to the cluster")
        if not fixes:
            fixes.append("use fewer processes, or free CPUs on the Ray instance")
        return ", or ".join(fixes)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _cpus(n: float) -> str:
    return f"{n:g} CPU" if n == 1 else f"{n:g} CPUs"
