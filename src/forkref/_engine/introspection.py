"""What an engine tells about itself: pids, settledness, process views, memory.

Read by the pools' public ``pids()`` and ``memory()``, and by the private
attributes code written for the stdlib pools reaches into (``_processes``,
``_pool``). Everything is read under the engine lock, as a snapshot.

Non-goals: no control; stopping a worker goes through the lifecycle.
"""

from __future__ import annotations

import os
from typing import Any

from forkref._engine.procview import process_view
from forkref._engine.state import EngineState
from forkref._memory.report import MemoryReport

__all__ = ["Introspection"]


class Introspection:
    """Snapshots of one engine's workers and fork servers."""

    def __init__(self, state: EngineState) -> None:
        self._state = state

    def pids(self) -> list[int]:
        """Pids of the live workers (all generations)."""
        with self._state.lock:
            return self._state.generations.pids()

    def zygote_pids(self) -> list[int]:
        """Pids of the generations' fork servers."""
        with self._state.lock:
            return self._state.generations.server_pids()

    def generation(self) -> int:
        """Number of the current generation (0 before the first task)."""
        with self._state.lock:
            return self._state.generations.number

    def settled(self) -> bool:
        """The dispatcher has placed what was submitted and every worker it started has a pid."""
        state = self._state
        with state.lock:
            if state.scheduler.incoming or state.finished.is_set():
                return state.finished.is_set()
            gen = state.generations.current()
            if gen is None:
                return True
            if any(w.pid is None for w in gen.workers):
                return False
            started = sum(1 for w in gen.workers if w.accepting())
            if state.on_demand:
                return started == state.processes or not state.scheduler.queue
            return started == state.processes

    def worker_processes(self) -> dict[int, Any]:
        """pid -> a process object (``multiprocessing.Process`` or a forked-worker view)."""
        with self._state.lock:
            gens = self._state.generations.all
            workers = [w for g in gens for w in g.workers if w.pid is not None]
        return {w.pid: process_view(w) for w in workers if w.pid is not None}

    def memory(self) -> MemoryReport:
        """USS/PSS of the parent, the workers and the generations' fork servers."""
        roles = {os.getpid(): "parent"}
        roles.update(dict.fromkeys(self.zygote_pids(), "fork server"))
        roles.update(dict.fromkeys(self.pids(), "worker"))
        return self._state.launcher.memory(roles)
