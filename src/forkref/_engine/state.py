"""One engine's settings, its shared parts and the flags they all read.

The engine's jobs are done by collaborating parts (:mod:`~forkref._engine.submission`,
:mod:`~forkref._engine.outcomes`, :mod:`~forkref._engine.workforce`,
:mod:`~forkref._engine.lifecycle`, :mod:`~forkref._engine.introspection`); each
is handed this one record instead of the engine, so none of them knows the
facade, and what they share is written down in one place.

Non-goals: no behaviour; the flags change only in the parts named on them.
"""

from __future__ import annotations

import itertools
import os
import threading
from multiprocessing.context import BaseContext

from forkref._engine.generations import Generations
from forkref._engine.launcher import Launcher
from forkref._engine.model import Task
from forkref._engine.scheduler import Scheduler
from forkref._errors import BrokenPoolError
from forkref._share.autoshare import AutoSharer

__all__ = ["EngineState"]


class EngineState:
    """What the parts of one engine share.

    Settings (fixed): ``context``, ``start_method``, ``processes``,
    ``max_tasks``, ``executor_semantics`` (a dead worker breaks the whole
    engine, as ``concurrent.futures`` does), ``task_timeout`` (seconds a task
    may run before its worker is killed; None: no limit), ``commit_window``,
    ``on_demand``.

    Parts: ``launcher``, ``sharer`` (automatic shares), ``encoder`` (task
    pickler), ``scheduler``, ``generations``, ``lock`` (guards the scheduler,
    the generations and the flags below, except where a part says otherwise).

    Flags: ``accepting`` (close() not called), ``terminated``, ``broken`` (the
    error every later submit raises), ``server_gone`` (why the last fork
    server died, while no generation replaces it), ``started`` (a first
    generation exists), ``finished`` (everything released; set once).
    """

    def __init__(
        self,
        launcher: Launcher,
        context: BaseContext,
        processes: int,
        *,
        max_tasks: int | None,
        executor_semantics: bool,
        share_threshold: int | None,
        auto_share: bool,
        task_timeout: float | None = None,
    ) -> None:
        self.launcher = launcher
        self.context = context
        self.start_method = context.get_start_method()
        self.processes = processes
        self.max_tasks = max_tasks
        self.executor_semantics = executor_semantics
        self.task_timeout = task_timeout
        by_reference = launcher.carries_references
        self.sharer = AutoSharer(share_threshold, auto_share, by_reference=by_reference)
        self.encoder = launcher.encoder(self.sharer)
        self.lock = threading.Lock()
        self.scheduler = Scheduler(self._encode_late)
        self.generations = Generations(launcher, processes)
        self.task_ids = itertools.count(1)
        self.worker_ids = itertools.count(1)
        # concurrent.futures marks max_workers + 1 queued futures running (its call queue).
        self.commit_window = processes + 1 if executor_semantics else 0
        # concurrent.futures starts a spawn/forkserver worker only when no worker is idle
        # (bpo-39207): starting one costs far more than forking.
        self.on_demand = executor_semantics and not launcher.inherits
        self.accepting = True
        self.terminated = False
        self.broken: BrokenPoolError | None = None
        self.server_gone: BrokenPoolError | None = None
        self.started = False
        self.finished = threading.Event()
        self.pid = os.getpid()  # a plain fork() child inherits this object: not its pool

    def _encode_late(self, task: Task) -> bytes:
        """The dispatcher pickles a big task only when a worker is free to take it."""
        return self.encoder.encode_late(task.kind, None, task.data, task.offset)

    def owned_by_this_process(self) -> bool:
        """False in a plain ``fork()`` child that inherited this engine."""
        return self.pid == os.getpid()
