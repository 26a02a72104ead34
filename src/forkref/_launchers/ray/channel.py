"""One Ray actor behind the engine's worker interface: :class:`RayChannel`.

How a task travels (the launcher makes the channels; the actor side is
:mod:`forkref._launchers.ray.actor`)::

  dispatcher thread (engine)                 Ray                    actor
  --------------------------                 ---                    -----
  RayChannel.send(task): queue it;
  one call per batch of tasks:
   each Reference -> ObjectTable.get ------> object store (put once per pool)
   actor.run(fns, calls, refs, forget,
             *ObjectRefs) -----------------> the call ------------> run the tasks
  RayChannel.read() <- a byte on a pipe <--- completion callback <- replies
   replies in call order, framed as
   forkref._engine.wire does

* **Batches.** A channel has one call in flight per actor; tasks sent
  meanwhile wait and leave together in the next call. Quick tasks thus
  travel many to a call (Ray's cost is about 0.2-0.4 ms per call here,
  0.01 ms per task in a batch of 32), while a task sent to an idle actor
  leaves at once.
* **Placement.** Tasks are sent at once and wait in Ray until the actor
  starts; if Ray has not placed the actor after the pool's bound (see
  :mod:`forkref._launchers.ray.placement`), the channel ends before READY
  with its :attr:`~forkref._engine.launcher.Channel.startup_error` and the
  engine breaks the pool with it.
* **Big results.** A call returns its replies and, beside them, the big
  numpy/pandas/arrow parts of their results (:mod:`forkref._launchers.ray.results`):
  Ray keeps that return in its store, owned by this driver. The channel holds
  the call's ObjectRef until the value is read (Ray's completion callback
  cannot fetch a stored return whose reference is gone), then files the parts
  for the engine's decode of the replies.
* **Loss.** An actor that dies (its process, or its node) fails its call
  with ``RayActorError``; every task of that call gets a
  :class:`~forkref.WorkerDiedError` reply (they may have run: they are
  never run twice), then the channel ends, and
  :meth:`RayChannel.describe_exit` says what was lost. Tasks still waiting
  in the channel never reached Ray: the engine sends them elsewhere. One
  call at a time is what makes this exact: with a second call queued on the
  actor, Ray reports both failed when the actor dies right after the first
  returned (its reply still in flight), and the call that killed it could
  not be told from one that never started.

Non-goals: no Ray task retries or actor restarts (a lost task is an error,
as in the local pools).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import pickle
import threading
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from forkref._engine.model import Channel, Task
from forkref._engine.wire import ERR, HDR, INIT_FAILED, OWN_FDS, READY, RETIRE, close_fd
from forkref._engine.worker import MAX_FUNCTIONS
from forkref._errors import NotInheritedError, TaskPicklingError, WorkerDiedError
from forkref._launchers.ray import results
from forkref._launchers.ray.objects import ObjectTable
from forkref._launchers.ray.placement import RECHECK, Deadline
from forkref._refs.registry import Reference
from forkref._share.taskpickle import FnBlob

__all__ = ["PoolSide", "RayChannel"]

_CALLS_IN_FLIGHT = 1  # per actor: see "Loss" above


@dataclass(frozen=True)
class PoolSide:
    """What every channel of one pool uses: the pool's side of Ray.

    Attributes:
        ray: the Ray module.
        objects: the pool's objects in the store.
        local_node: the driver's node id (a pid means something only there).
        placement_timeout: seconds an actor may wait to be placed.
        why_unplaced: the pool's error if the channel's actor waits for
            CPUs that are not there, else None (it waits on).
    """

    ray: types.ModuleType
    objects: ObjectTable
    local_node: str | None
    placement_timeout: float
    why_unplaced: Callable[[RayChannel], str | None]


@dataclass
class _Sent:
    """A task as it leaves: what the scheduler's Task holds at ``send`` (it may drop the pickle)."""

    id: int
    fn: FnBlob
    payload: bytes
    refs: list[Reference]


@dataclass
class _Call:
    """One ``actor.run`` call: its tasks, those answered here, and its outcome once done."""

    task_ids: list[int]
    answered: dict[int, bytes] = field(default_factory=dict)  # failed before leaving
    done: bool = False
    replies: list[bytes] = field(default_factory=list)
    parts: results.Parts = field(default_factory=list)  # big parts of the results
    # The call's ObjectRef, held until its value is read: a return value in the
    # object store (big parts) must have a live reference when Ray's completion
    # callback fetches it, or its owner (this driver) no longer knows it.
    ref: Any = None
    error: BaseException | None = None


class RayChannel(Channel):
    """One Ray actor behind the engine's worker interface.

    ``fd`` becomes readable when the actor has answered (a byte on a pipe,
    written by Ray's completion callback); :meth:`read` returns READY (or
    INIT_FAILED) first, then the replies in the order the tasks were sent,
    and raises ``EOFError`` once the actor is gone and everything was read.

    When the actor is lost, every task of the call it was running fails with
    :class:`~forkref.WorkerDiedError` (they may have run: none is run twice)
    but the last, which the engine fails itself as the task the worker was
    running when its channel ended; the tasks still waiting here never
    reached Ray, and the engine sends them to another worker.
    """

    def __init__(self, pool: PoolSide, wid: int, actor: Any) -> None:
        self.wid = wid
        self.pid = None
        self.node_id: str | None = None
        self.node_ip: str | None = None
        self.prefetch_max = 64 << 20  # Ray queues what is sent; the depth limits it
        self._actor = actor
        self.actor_id = _actor_hex(actor)
        self.created = time.monotonic()
        self._ray = pool.ray
        self._objects = pool.objects
        self._local_node = pool.local_node
        self._why_unplaced = pool.why_unplaced
        read_end, self._wake_w = os.pipe()
        self.fd = read_end
        os.set_blocking(read_end, False)
        os.set_blocking(self._wake_w, False)  # a full pipe already says "wake up"
        OWN_FDS.update((read_end, self._wake_w))
        # Ray's callbacks write to the pipe: never to a closed (and maybe reused) fd number.
        self._pipe_lock = threading.Lock()
        self._outbox: list[_Sent] = []
        self._calls: collections.deque[_Call] = collections.deque()
        self._functions: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._sent: set[Reference] = set()  # References whose object this actor holds
        self._forgotten = 0  # how much of ObjectTable.dropped this actor was told
        self._filed: set[str] = set()  # tokens of big parts handed on, maybe not received yet
        self._started: Any = None  # where()'s answer, or the error that ended the actor
        self._ready = False
        self._lost = False
        self._ended = False
        self._stopping = False
        self._terminating = False
        self._exit = ""
        self._placement = Deadline(pool.placement_timeout, self._wake)
        actor.where.remote()._on_completed(self._on_where)

    # -- the engine's side (dispatcher thread) -------------------------------------------

    def send(self, task: Task) -> None:
        """Queue ``task``; it leaves at once if the actor has no call in flight.

        Raises:
            OSError: the actor is gone (its end is being reported).
        """
        if self._lost or self._ended:
            raise BrokenPipeError(f"{self.describe()} is gone")
        assert task.payload is not None
        self._outbox.append(_Sent(task.id, task.fn, task.payload, list(task.refs)))
        if len(self._calls) < _CALLS_IN_FLIGHT:
            self._flush()

    def read(self) -> list[bytearray]:
        """READY first, then replies of completed calls in send order.

        Raises:
            EOFError: the actor is gone and everything it replied was read.
        """
        with contextlib.suppress(OSError):
            os.read(self.fd or -1, 4096)
        if self._placement.due() and self._started is None and self.alive():
            self._check_placement()
        replies = self._started_replies()
        while self._ready and self._calls and self._calls[0].done and not self._lost:
            call = self._calls.popleft()
            call.ref = None
            if call.error is None:
                replies += self._in_order(call)
            else:
                replies += self._call_lost(call)
        if self._outbox and len(self._calls) < _CALLS_IN_FLIGHT and self.alive():
            self._flush()
        self._terminate_when_idle()
        if replies:
            return [bytearray(r) for r in replies]
        if self._lost or self._ended:
            raise EOFError
        return []

    def stop(self) -> None:
        """No more tasks: the actor ends once the calls it holds are done."""
        if self._stopping:
            return
        self._stopping = True
        self._terminate_when_idle()

    def kill(self) -> None:
        """End the actor now (``ray.kill``); the channel ends with it.

        The engine has given up on what the actor held; an idle actor would
        answer nothing more, so the end is reported at once, not waited for.
        """
        self._stopping = True
        if self._actor is not None:
            with contextlib.suppress(Exception):
                self._ray.kill(self._actor, no_restart=True)
        if self.alive():
            self._ended = True
            self._exit = self._exit or f"{self.describe()} killed"
            self._wake()

    def describe_exit(self, status: int | None) -> str:
        """How the actor ended: ``Ray actor 3f2a... on node 10.0.0.5 (9c1e...) lost: ...``."""
        return self._exit or f"{self.describe()} ended"

    @property
    def ready(self) -> bool:
        """The actor answered: it was placed, started and ran the pool's initializer."""
        return self._ready

    def close(self) -> None:
        """Release the pipe and the actor handle. Idempotent."""
        self._placement.cancel()
        # Replies handed on were decoded by now: parts left are of dropped replies.
        results.discard(self._filed)
        self._filed = set()
        with self._pipe_lock:
            for fd in (self.fd, self._wake_w):
                close_fd(fd)
            self.fd = None
            self._wake_w = -1
        self._actor = None

    def describe(self) -> str:
        """``Ray actor <id> on node <address> (<node id>)``, with what is known so far."""
        where = f" on node {self.node_ip} ({(self.node_id or '?')[:12]})" if self.node_ip else ""
        return f"Ray actor {self.actor_id[:12]}{where}"

    # -- calls ----------------------------------------------------------------------------

    def alive(self) -> bool:
        """Neither lost nor ended."""
        return not (self._lost or self._ended)

    def _terminate_when_idle(self) -> None:
        """Once stopping and nothing is left to run, end the actor (gracefully)."""
        if not self._stopping or self._calls or self._outbox or self._terminating:
            return
        if self.alive() and self._actor is not None:
            self._terminating = True
            self._actor.__ray_terminate__.remote()._on_completed(self._on_terminated)

    def _flush(self) -> None:
        tasks, self._outbox = self._outbox, []
        call = _Call([t.id for t in tasks])
        fns: list[tuple[int, bytes]] = []
        refs: list[Reference] = []
        objects: list[Any] = []
        calls = []
        for task in tasks:
            try:
                self._carry(task.refs, refs, objects)
            except TaskPicklingError as err:
                call.answered[task.id] = _error_frame(task.id, err)
                continue
            self._carry_function(task.fn, fns)
            calls.append((task.id, task.fn.id, task.payload))
        self._calls.append(call)
        if not calls:
            self._on_call_done(call, [])
            return
        call.ref = self._actor.run.remote(fns, calls, refs, self._to_forget(), *objects)
        call.ref._on_completed(functools.partial(self._on_call_done, call))

    def _carry(
        self, task_refs: Iterable[Reference], refs: list[Reference], objects: list[Any]
    ) -> None:
        """Add the ObjectRefs of ``task_refs`` that this actor does not hold yet."""
        for ref in task_refs:
            if ref in self._sent:
                continue
            try:
                objects.append(self._objects.get(ref))
            except NotInheritedError:
                continue  # not registered here: the worker's placeholder says so on use
            refs.append(ref)
            self._sent.add(ref)

    def _carry_function(self, fn: FnBlob, fns: list[tuple[int, bytes]]) -> None:
        """Send the function once per actor; evict as the actor does (same count, same order)."""
        if fn.id in self._functions:
            return
        fns.append((fn.id, fn.blob))
        self._functions[fn.id] = None
        if len(self._functions) > MAX_FUNCTIONS:
            self._functions.popitem(last=False)

    def _to_forget(self) -> list[Reference]:
        dropped = self._objects.dropped
        forget = [r for r in dropped[self._forgotten :] if r in self._sent]
        self._forgotten = len(dropped)
        self._sent.difference_update(forget)
        return forget

    def _check_placement(self) -> None:
        """Past the bound and not started: end with the pool's error if Ray lacks the CPUs."""
        why = self._why_unplaced(self)
        if why is None:  # placed and starting slowly, or no shortage: look again later
            self._placement.extend(RECHECK)
            return
        self._placement.cancel()
        self.startup_error = why
        self._exit = f"{self.describe()} was never placed"
        self.kill()

    # -- replies --------------------------------------------------------------------------

    def _started_replies(self) -> list[bytes]:
        """READY or INIT_FAILED once the actor has answered ``where()``; or its loss."""
        started = self._started
        if self._ready or started is None:
            return []
        if isinstance(started, BaseException):
            self._lost = True
            self._exit = f"{self.describe()} could not start: {_death_text(started)}"
            return []
        node_id, self.node_ip, pid, init_error = started
        self.node_id = node_id
        if node_id == self._local_node:  # a pid means something here only on this node
            self.pid = pid
        self._ready = True
        if init_error is not None:
            return [HDR.pack(0, INIT_FAILED) + init_error.encode()]
        return [HDR.pack(0, READY)]

    def _in_order(self, call: _Call) -> list[bytes]:
        if call.parts:  # filed before the replies naming them are decoded
            self._filed = results.arrive(call.parts, self._filed)
            call.parts = []  # the store's views live in the table only, until received
        by_id = dict(call.answered)
        control = []
        for reply in call.replies:
            task_id, op = HDR.unpack_from(reply)
            if op == RETIRE:  # max_tasks reached: the actor is done
                control.append(reply)
                self._retire()
            else:
                by_id[task_id] = reply
        return [by_id[t] for t in call.task_ids if t in by_id] + control

    def _call_lost(self, call: _Call) -> list[bytes]:
        """The actor was lost while running ``call``: fail its tasks but the last (see class)."""
        self._lost = True
        self._exit = f"{self.describe()} lost: {_death_text(call.error)}"
        message = (
            f"{self._exit}. This task was in the batch of tasks it was running, so its result "
            "is lost (it may have run). A crash in native code, os._exit(), the OOM killer or "
            "the loss of the node does this; check the task, or the node's logs"
        )
        self._wake()  # the end of the channel is read next
        return [
            call.answered.get(t) or _error_frame(t, WorkerDiedError(message, self.pid))
            for t in call.task_ids[:-1]
        ]

    def _retire(self) -> None:
        self.kill()
        self._ended = True
        self._exit = f"{self.describe()} retired after maxtasksperchild tasks"
        self._wake()

    # -- Ray's threads (completion callbacks): record, then wake the dispatcher ----------

    def _on_call_done(self, call: _Call, value: Any) -> None:
        if isinstance(value, BaseException):
            call.error = value
        else:
            call.replies, call.parts = value
        call.done = True
        self._wake()

    def _on_where(self, value: Any) -> None:
        self._placement.cancel()
        self._started = value
        self._wake()

    def _on_terminated(self, value: Any) -> None:
        self._ended = True
        self._exit = self._exit or f"{self.describe()} stopped"
        self._wake()

    def _wake(self) -> None:
        with self._pipe_lock, contextlib.suppress(OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")


def _actor_hex(actor: Any) -> str:
    try:
        return str(actor._actor_id.hex())
    except Exception:
        return "?"


def _error_frame(task_id: int, err: BaseException) -> bytes:
    return HDR.pack(task_id, ERR) + pickle.dumps((err, ""), pickle.HIGHEST_PROTOCOL)


def _death_text(err: BaseException | None) -> str:
    """The cause Ray gives for a lost actor, without its field dump."""
    text = str(err or "unknown cause")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("\t")]
    useful = [ln for ln in lines if not ln.startswith("The actor died unexpectedly before")]
    # Ray's own list of usual causes follows; forkref's message gives its own.
    text = " ".join(useful or lines).split(" Some common causes include")[0]
    return text[:300]
