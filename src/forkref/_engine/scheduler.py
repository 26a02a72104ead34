"""Which task goes to which worker, and when: the engine's queue and in-flight bookkeeping.

::

    submit (caller thread)                     dispatcher thread
    ----------------------                     -----------------
    Task(payload=bytes)   small: pickled now
    Task(payload=None)    big: pickled later --> incoming --> queue --> dispatch():
                                                                  pick the least loaded worker
                                                                  that may take one more task,
                                                                  pickle a big task now, send it
                                               reply(worker, message) -> (task, op, body)
                                               worker gone -> its running task fails,
                                                              the rest go back to the queue

Bounded memory: a task whose pickle is big (over
:data:`forkref._share.taskpickle.INLINE_LIMIT`) keeps its arguments, not their
pickle, until a worker is free to take it; it is then pickled, sent (the
send returns once the worker has read it) and its bytes dropped. The parent
therefore holds at most one big pickle per worker being fed, as the stdlib's
pools do, instead of one per task.

A worker holds at most ``_DEPTH_SLOW`` tasks (``_DEPTH_FAST`` while tasks take
under ``FAST_TASK``: then the round trip through the dispatcher would starve
it), and what waits behind its running task must fit in its channel's
``prefetch_max`` bytes, so a send never blocks while others have results.

Non-goals: no work stealing, no priorities; tasks run in submission order.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from forkref._engine.model import FAST_TASK, Cancelled, Completion, Generation, Task, Worker
from forkref._engine.wire import HDR, INIT_FAILED, READY, RETIRE, STARTED

__all__ = ["Scheduler"]

_DEPTH_SLOW, _DEPTH_FAST = 2, 32  # tasks in flight per worker; fast: service time < FAST_TASK


class Scheduler:
    """The queue of tasks not yet sent, and what each worker holds.

    All methods but :meth:`submit` run under the engine's lock.
    """

    def __init__(self, encode_late: Callable[[Task], bytes]) -> None:
        self._encode_late = encode_late
        self.queue: collections.deque[Task] = collections.deque()
        # Submitters append here without the lock (deque appends are atomic), so
        # a map being pickled never waits for the dispatcher; it drains this.
        self.incoming: collections.deque[Task] = collections.deque()

    def submit(self, tasks: list[Task]) -> None:
        """Hand tasks to the dispatcher (lock-free)."""
        self.incoming.extend(tasks)

    def drain_incoming(self) -> None:
        """Move submitted tasks into the queue."""
        incoming = self.incoming
        while incoming:
            self.queue.append(incoming.popleft())

    def pending(self) -> bool:
        """Whether any task waits to be sent."""
        return bool(self.queue or self.incoming)

    def take_all(self) -> list[Task]:
        """Empty the queue (the engine breaks or terminates)."""
        self.drain_incoming()
        tasks = list(self.queue)
        self.queue.clear()
        return tasks

    def commit(self, window: int, completions: list[Completion]) -> None:
        """Mark the first ``window`` queued tasks as started (``on_start``).

        ``concurrent.futures`` semantics: a future is *running* once it is
        in the executor's call queue (``max_workers + 1`` deep), whether or
        not a worker has taken it yet; ``shutdown(cancel_futures=True)``
        cancels only the others. A task cancelled before this is dropped.
        """
        queue, i = self.queue, 0
        while i < min(window, len(queue)):
            task = queue[i]
            if not task.started:
                task.started = True
                if task.on_start is not None and not task.on_start():
                    del queue[i]
                    completions.append((task, -1, Cancelled()))
                    continue
            i += 1

    def cancel_queued(self) -> list[Task]:
        """Remove and return the tasks not started (see :meth:`commit`)."""
        self.drain_incoming()
        cancelled = [t for t in self.queue if not t.started]
        self.queue = collections.deque(t for t in self.queue if t.started)
        return cancelled

    def dispatch(
        self, gen: Generation, completions: list[Completion], max_depth: int | None = None
    ) -> None:
        """Send queued tasks to the workers of ``gen`` that may take them (``max_depth`` each)."""
        # One depth for the generation, from its slowest worker: a depth per worker
        # let one that had run a few quick tasks take 32 slow ones while the
        # others idled (a fair share of the queue is what the stdlib gives).
        slowest = max((w.service for w in gen.workers if w.live()), default=FAST_TASK)
        depth = _DEPTH_FAST if slowest < FAST_TASK else _DEPTH_SLOW
        if max_depth is not None:
            depth = min(depth, max_depth)
        while self.queue:
            w = self._pick_worker(gen, self.queue[0].size, depth)
            if w is None:
                return
            task = self.queue.popleft()
            if not task.started:
                task.started = True
                if task.on_start is not None and not task.on_start():
                    completions.append((task, -1, Cancelled()))
                    continue
            if not self._send(w, task, completions):
                continue

    def _send(self, w: Worker, task: Task, completions: list[Completion]) -> bool:
        late = task.payload is None
        if late:
            try:
                task.payload = self._encode_late(task)
            except BaseException as err:  # the arguments changed since submit, or raise
                completions.append((task, -1, err))
                return False
        try:
            w.channel.send(task)
        except OSError:  # the worker just died: its end follows; the task waits for another
            self.queue.appendleft(task)
            w.stopping = True
            return False
        if late:
            task.payload = None  # sent: do not hold the big pickle while it runs
        task.sent_at = time.monotonic()
        w.inflight.append(task)
        w.inflight_bytes += task.size
        if w.budget is not None:
            w.budget -= 1
        return True

    @staticmethod
    def _pick_worker(gen: Generation, size: int, depth: int) -> Worker | None:
        """The least loaded worker that may take one more task now, if any."""
        best: Worker | None = None
        for w in gen.workers:
            if not w.accepting():
                continue
            n = len(w.inflight)
            if n >= depth or (n and w.inflight_bytes + size > w.channel.prefetch_max):
                continue
            if best is None or n < len(best.inflight):
                best = w
        return best

    def reply(self, w: Worker, message: bytearray) -> Completion | int | None:
        """A message from worker ``w``: a finished task, or a control op (READY, ...).

        None: nothing to act on (a task's STARTED, noted on the task; a stray reply).
        """
        task_id, op = HDR.unpack_from(message)
        if op in (READY, RETIRE, INIT_FAILED):
            return int(op)
        if not w.inflight or w.inflight[0].id != task_id:
            return None  # not what it holds (cannot happen with a sane worker): ignore
        if op == STARTED:  # the worker calls the task's function now (task_timeout's clock)
            w.inflight[0].running_at = time.monotonic()
            return None
        task = w.inflight.popleft()
        w.inflight_bytes -= task.size
        now = time.monotonic()
        w.service = 0.7 * w.service + 0.3 * (now - max(task.sent_at, w.last_done))
        w.last_done = now
        body: Any = memoryview(message)[HDR.size :]
        return task, int(op), body

    def worker_gone(self, w: Worker) -> Task | None:
        """Worker ``w`` is gone: return the task it was running, requeue the ones behind it.

        A worker runs its tasks in order and reports each before reading the
        next, so only the first one it held was running; the others never
        started and go back to the front of the queue.
        """
        if not w.inflight:
            return None
        running = w.inflight.popleft()
        self.queue.extendleft(reversed(w.inflight))
        w.inflight.clear()
        w.inflight_bytes = 0
        return running

