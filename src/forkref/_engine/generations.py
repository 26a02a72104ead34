"""Generations of workers, and the late-object policy that decides when a new one forks.

A generation is one snapshot of the parent: under ``fork`` its workers are
forked (through its fork server) from the parent as it was when the
generation started, so every shared object registered before that moment
resolves in them by inheritance. Its life::

    start (caller's thread, FORK_LOCK, forkref threads paused)
      -> current: the dispatcher launches up to ``processes`` workers from it
      -> retiring: a newer generation started (or closing): its workers get
         no new tasks, finish what they hold and exit; its server follows
      -> done: no worker, no server; dropped

**The late-object policy** (:func:`late_object_route`, a pure function):
a task refers to shared objects by :class:`~forkref._refs.registry.Reference`.
One registered before the current generation started, or alive when it
forked (the fork record of :mod:`forkref._refs.forkrecord`), is inherited. Any
other ("late") travels one of two ways, never pickled per task:

* **shared memory**: the sharing process exports it once and the current
  workers fetch it (:mod:`forkref._shm.export`), when the object rebuilds
  zero-copy (bytes, numpy/pandas without object columns, arrow) and one
  export costs less than forking ``1 + processes`` times a parent of this
  size;
* **a new generation** otherwise: one fork of the parent, then one per worker.

Workers that do not inherit (spawn, forkserver, remote) need no policy: every
shared object reaches them through their launcher's transport.

Non-goals: the cost model is two constants measured on one machine
(``FORK_SECONDS_PER_BYTE``, ``EXPORT_SECONDS_PER_BYTE``), not a measurement
of the user's; it only chooses between two correct routes.
"""

from __future__ import annotations

import enum

from forkref._engine.launcher import Launcher
from forkref._engine.model import Generation
from forkref._errors import NotInheritedError
from forkref._refs import forkrecord
from forkref._refs.registry import Reference, registry
from forkref._share.autoshare import estimate_size
from forkref._shm import export as _export

__all__ = [
    "EXPORT_SECONDS_PER_BYTE",
    "FORK_SECONDS_PER_BYTE",
    "Generations",
    "Route",
    "exports_cleanly",
    "late_object_route",
]

#: A fork copies the page tables of the parent: about 20 ms per GiB resident (4 KiB pages, here).
FORK_SECONDS_PER_BYTE = 0.020 / 2**30
#: An export writes the object once into fresh tmpfs pages; measured ~3 GB/s, counted at 2.
EXPORT_SECONDS_PER_BYTE = 1 / 2.0e9


class Route(enum.Enum):
    """How a shared object reaches the workers of a pool."""

    INHERITED = "fork reference"
    SHARED_MEMORY = "shared memory"
    NEW_GENERATION = "new generation"


def late_object_route(
    *,
    registered: int,
    generation: int,
    exports_cleanly: bool,
    size: int | None,
    parent_rss: int,
    processes: int,
) -> Route:
    """The route of one shared object to the current generation's workers.

    Args:
        registered: the object's registration serial (``registry().serial(ref)``).
        generation: the serial the current generation started at.
        exports_cleanly: the object rebuilds zero-copy from shared memory.
        size: its estimated size in bytes (None: unknown).
        parent_rss: the parent's resident memory in bytes (what a fork copies tables for).
        processes: workers per generation.
    """
    if registered <= generation:
        return Route.INHERITED
    if not exports_cleanly or size is None:
        return Route.NEW_GENERATION
    fork_seconds = (1 + processes) * parent_rss * FORK_SECONDS_PER_BYTE
    if size * EXPORT_SECONDS_PER_BYTE < fork_seconds:
        return Route.SHARED_MEMORY
    return Route.NEW_GENERATION


def exports_cleanly(obj: object) -> bool:
    """Objects the shared-memory transport rebuilds zero-copy and can always pickle:
    bytes, numpy arrays and pandas objects without object dtype, pyarrow data."""
    if type(obj) is bytes:
        return True
    module = type(obj).__module__.partition(".")[0]
    if module == "pyarrow":
        return True
    if module == "numpy":
        return getattr(getattr(obj, "dtype", None), "kind", "O") != "O"
    if module == "pandas":
        dtypes = getattr(obj, "dtypes", None)
        if dtypes is None:
            return False
        kinds = [dtypes.kind] if hasattr(dtypes, "kind") else [d.kind for d in dtypes]
        return "O" not in kinds
    return False


def _own_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class Generations:
    """The engine's generations: which one is current, starting, retiring, reaping.

    Every method runs under the engine's lock except :meth:`start`, which
    the engine calls from the caller's thread under FORK_LOCK.
    """

    def __init__(self, launcher: Launcher, processes: int) -> None:
        self.launcher = launcher
        self.processes = processes
        self.all: list[Generation] = []
        self._numbers = 0
        # Late references the current generation fetches through shared memory:
        # the route is chosen once per reference, not on every task.
        self._via_shm: set[Reference] = set()
        self._via_shm_serial = -1

    def current(self) -> Generation | None:
        """The generation new tasks go to (None before the first, or when it retired)."""
        gen = self.all[-1] if self.all else None
        return None if gen is None or gen.retiring else gen

    @property
    def number(self) -> int:
        """Number of the newest generation (0 before the first task)."""
        return self.all[-1].number if self.all else 0

    def start(self) -> Generation:
        """Start a new generation now (caller's thread, FORK_LOCK held).

        Raises:
            ForkError: its fork server could not be forked; the previous
                generation stays current.
        """
        gen = Generation(self._numbers + 1, registry().last_serial())
        self.launcher.start_generation(gen)
        if self.launcher.inherits:  # forked from this thread: objects it recorded are inherited
            gen.fork_seq = forkrecord.last_fork()
        self._numbers += 1
        return gen

    def adopt(self, gen: Generation) -> None:
        """Make a started generation current; the others retire (under the lock)."""
        for old in self.all:
            self.retire(old)
        self.all.append(gen)

    def retire(self, gen: Generation) -> None:
        """No new tasks or workers for ``gen``; its workers exit when idle."""
        if gen.retiring:
            return
        gen.retiring = True
        for w in gen.workers:
            w.stop()
        self.launcher.retire(gen)

    def prune(self) -> None:
        """Forget retired generations that are completely gone."""
        self.all = [g for g in self.all if not (g.retiring and self.done(g))]

    def done(self, gen: Generation) -> bool:
        """No worker left and no fork server."""
        return not gen.workers and self.launcher.server_done(gen)

    def needs_new(self, refs: list[Reference], accepting: bool) -> bool:
        """Whether a task carrying ``refs`` needs a new generation first (the policy).

        Late references that go through shared memory are made servable here.
        """
        if not self.launcher.inherits:
            return not self.all and accepting
        current = self.current()
        if current is None:  # none yet, or it retired (its fork server died)
            return accepting
        if self._via_shm_serial != current.serial:  # a new generation inherited those
            self._via_shm, self._via_shm_serial = set(), current.serial
        rss: list[int] = []  # read once, only if needed
        return any(self._late_needs_fork(ref, current, rss) for ref in refs)

    def _late_needs_fork(self, ref: Reference, current: Generation, rss: list[int]) -> bool:
        if ref in self._via_shm:
            _export.ensure_serving(ref, start=False)  # cheap; the dispatcher starts the thread
            return False
        reg = registry()
        try:
            registered = reg.serial(ref)
            # Registered before the fork, or alive (fork record) at it.
            if reg.inherited(ref, current.serial, current.fork_seq):
                return False
            obj = reg.lookup(ref)
        except NotInheritedError:
            return False  # not ours to provide: the task fails with a clear error in the worker
        clean = exports_cleanly(obj)
        if clean and not rss:
            rss.append(_own_rss())
        route = late_object_route(
            registered=registered,
            generation=current.serial,
            exports_cleanly=clean,
            size=estimate_size(obj) if clean else None,
            parent_rss=rss[0] if rss else 0,
            processes=self.processes,
        )
        if route is Route.NEW_GENERATION:
            return True
        # The current workers fetch it from this process through shared memory;
        # the dispatcher starts the export thread when the first one asks.
        _export.ensure_serving(ref, start=False)
        self._via_shm.add(ref)
        return False

    def pids(self) -> list[int]:
        """Pids of the live workers of every generation."""
        return [w.pid for g in self.all for w in g.workers if w.pid is not None and w.live()]

    def server_pids(self) -> list[int]:
        """Pids of the generations' fork servers."""
        return [pid for g in self.all for pid in self.launcher.server_pids(g)]

