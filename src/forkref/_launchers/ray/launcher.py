"""The Ray backend: a pool's workers as Ray actors, shared objects in Ray's object store.

How data flows (``backend="ray"``; the actor side is :mod:`forkref._launchers.ray.actor`)::

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

* **Once per pool, once per actor.** An object is put when a task first
  refers to it and its ObjectRef kept until the pool closes or the object
  is released; an actor receives the ObjectRef (top-level, so Ray resolves
  it zero-copy) with the first task that needs it and keeps the object
  while the driver keeps the ObjectRef.
* **Batches.** A channel has one call in flight per actor; tasks sent
  meanwhile wait and leave together in the next call. Quick tasks thus
  travel many to a call (Ray's cost is about 0.2-0.4 ms per call here,
  0.01 ms per task in a batch of 32), while a task sent to an idle actor
  leaves at once.
* **Loss.** An actor that dies (its process, or its node) fails its call
  with ``RayActorError``; every task of that call gets a
  :class:`~forkref.WorkerDiedError` reply (they may have run: they are
  never run twice), then the channel ends, and
  :meth:`RayChannel.exit_text` says what was lost. Tasks still waiting in
  the channel never reached Ray: the engine sends them elsewhere. One call
  at a time is what makes this exact: with a second call queued on the
  actor, Ray reports both failed when the actor dies right after the first
  returned (its reply still in flight), and the call that killed it could
  not be told from one that never started.

Non-goals: no Ray task retries or actor restarts (a lost task is an error,
as in the local pools); no Ray Client (``ray://``) specifics; objects in the
store are read-only snapshots, never synchronised back.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import pickle
import threading
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkref._engine.launcher import Channel, Launcher, LaunchError
from forkref._engine.wire import ERR, HDR, INIT_FAILED, OWN_FDS, READY, RETIRE, close_fd
from forkref._engine.worker import MAX_FUNCTIONS, WorkerSetup
from forkref._errors import Error, NotInheritedError, TaskPicklingError, WorkerDiedError
from forkref._memory.report import MemoryReport, ProcessMemory, memory_report
from forkref._refs.registry import Reference, registry
from forkref._share.autoshare import AutoSharer
from forkref._share.taskpickle import FnBlob, TaskEncoder

if TYPE_CHECKING:
    from forkref._engine.generations import Generation
    from forkref._engine.scheduler import Task

__all__ = [
    "INSTALL",
    "ObjectStoreUse",
    "ObjectTable",
    "RayChannel",
    "RayLauncher",
    "RayMemoryReport",
    "RaySession",
    "RayTaskEncoder",
    "import_ray",
]

INSTALL = "pip install 'forkref[ray]'"
_CALLS_IN_FLIGHT = 1  # per actor: see "Loss" above


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


# -- the Ray instance a pool runs on ----------------------------------------------------

_session_lock = threading.Lock()
_started_by_us = 0  # pools using a Ray instance that forkref started or connected to


class RaySession:
    """Ray as one pool uses it: connected (or started) at the pool's start.

    * Ray already initialised in this process: use it; leave it as it is.
    * ``address`` given (or ``RAY_ADDRESS`` set, Ray's own variable): connect;
      at close, disconnect this process, and leave the cluster running.
    * Otherwise start a private local Ray instance with ``num_cpus=processes``
      (``address="local"``: never attach to another user's instance on this
      machine by accident) and shut it down when the last pool using it closes.

    ``init_options`` go to ``ray.init`` as they are (``object_store_memory``,
    ``runtime_env``, ...).
    """

    def __init__(
        self, processes: int, address: str | None, init_options: Mapping[str, Any] | None = None
    ) -> None:
        global _started_by_us
        self.ray = ray = import_ray()
        self._closed = False
        with _session_lock:
            if ray.is_initialized():
                self.ours = _started_by_us > 0
            else:
                options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
                options.update(init_options or {})
                if address is None and not os.environ.get("RAY_ADDRESS"):
                    options.setdefault("num_cpus", processes)
                    address = "local"
                try:
                    ray.init(address=address, **options)
                except Exception as err:
                    where = "start a local Ray instance" if address == "local" else (
                        f"connect to the Ray cluster at {address or os.environ['RAY_ADDRESS']!r}"
                    )
                    raise Error(
                        f"cannot {where} for a backend='ray' pool: {err!r}; check the address "
                        "(`ray status` on the head node prints it) and that this Ray and "
                        "Python match the cluster's"
                    ) from err
                self.ours = True
            if self.ours:
                _started_by_us += 1

    def close(self) -> None:
        """Shut Ray down if this was the last pool on an instance forkref started. Idempotent."""
        global _started_by_us
        if self._closed:
            return
        self._closed = True
        if not self.ours:
            return
        with _session_lock:
            _started_by_us -= 1
            if _started_by_us == 0 and self.ray.is_initialized():
                self.ray.shutdown()


# -- pickling tasks for Ray workers --------------------------------------------------------


class RayTaskEncoder(TaskEncoder):
    """The task encoder for Ray workers: functions go through cloudpickle.

    A Ray worker does not share the driver's ``__main__``, so the fork path's
    functions-by-value (code over the worker's copy of the module's globals)
    would miss the driver's globals. Functions and classes that cannot be
    imported by name on a worker (lambdas, closures, anything from
    ``__main__``) are pickled by cloudpickle instead, with the globals they use;
    the values they capture go through the pool's policy as in the fork
    path: above ``share_threshold`` they travel by reference, through the
    object store.
    """

    def __init__(self, sharer: AutoSharer) -> None:
        super().__init__(sharer, fork=False, start_method="ray")
        self.pickler_class = _pickler_class()

    destination = "a Ray worker (cloudpickle)"

    def _fix(self, culprit: str, fn: Any) -> str:
        return "make it picklable, or create it in the worker (an initializer, or inside the task)"


_PICKLER: Any = None


def _pickler_class() -> Any:
    """The cloudpickle-based task pickler (made once: it subclasses Ray's cloudpickle)."""
    global _PICKLER
    if _PICKLER is None:
        from ray import cloudpickle

        class RayTaskPickler(cloudpickle.Pickler):  # type: ignore[misc]
            def __init__(self, file: Any, encoder: TaskEncoder) -> None:
                super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
                self._encoder = encoder

            def reducer_override(self, obj: Any) -> Any:
                reduced = self._encoder._reduce(obj)
                if reduced is NotImplemented:
                    return super().reducer_override(obj)
                return reduced

            def _dynamic_function_reduce(self, func: Any) -> Any:
                # What the function captures (closure cells, globals it uses,
                # defaults) goes by reference above share_threshold, as in the
                # fork path: a lambda over a big frame sends the frame once.
                reduced = super()._dynamic_function_reduce(func)
                _, slotstate = reduced[2]
                captured = self._encoder.sharer.consider_captured
                where = lambda: f"a value captured by {func.__qualname__}"  # noqa: E731
                closure = slotstate.get("__closure__")
                if closure:
                    slotstate["__closure__"] = tuple(
                        _captured_cell(c, captured, where) for c in closure
                    )
                slotstate["__globals__"] = {
                    k: captured(v, where) for k, v in slotstate["__globals__"].items()
                }
                if slotstate.get("__defaults__"):
                    slotstate["__defaults__"] = tuple(
                        captured(v, where) for v in slotstate["__defaults__"]
                    )
                return reduced

        _PICKLER = RayTaskPickler
    return _PICKLER


def _captured_cell(cell: Any, captured: Callable[..., object], where: Callable[[], str]) -> Any:
    try:
        value = cell.cell_contents
    except ValueError:  # an empty cell (a variable not assigned yet)
        return cell
    new = captured(value, where)
    return cell if new is value else types.CellType(new)


# -- objects in the store ---------------------------------------------------------------


class ObjectTable:
    """Each shared object of one pool, put into Ray's object store once.

    Keyed by :class:`~forkref._refs.registry.Reference`: the object is looked up
    in this process's registry (it is registered here while a handle or an
    automatic share holds it) and put at its first use. An entry whose
    object is no longer registered is dropped at the next put; actors are
    told to forget it with their next call.
    """

    def __init__(self, ray: types.ModuleType) -> None:
        self._ray = ray
        self._lock = threading.Lock()
        self._refs: dict[Reference, Any] = {}  # Reference -> ObjectRef
        self.dropped: list[Reference] = []  # forgotten here; actors forget them at their next call

    def get(self, ref: Reference) -> Any:
        """The ObjectRef of ``ref``'s object, put now if it is the first use.

        Raises:
            NotInheritedError: ``ref`` is not registered in this process.
            TaskPicklingError: Ray cannot serialize the object.
        """
        with self._lock:
            found = self._refs.get(ref)
            if found is not None:
                return found
            obj = registry().lookup(ref)
            self._prune()
            try:
                found = self._refs[ref] = self._ray.put(obj)
            except Exception as err:
                raise TaskPicklingError(
                    f"cannot put the shared {ref.typename} into Ray's object store: {err!r}; "
                    "a backend='ray' pool sends shared objects through the store, so they must "
                    "be serializable by Ray (cloudpickle)"
                ) from err
            return found

    def _prune(self) -> None:
        reg = registry()
        for ref in list(self._refs):
            try:
                reg.serial(ref)
            except NotInheritedError:
                del self._refs[ref]
                self.dropped.append(ref)

    def clear(self) -> None:
        """Drop every ObjectRef (Ray frees the objects no task uses any more)."""
        with self._lock:
            self.dropped.extend(self._refs)
            self._refs.clear()

    def __len__(self) -> int:
        return len(self._refs)


# -- one actor as the dispatcher sees it --------------------------------------------------


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

    def __init__(self, launcher: RayLauncher, wid: int, actor: Any) -> None:
        self.wid = wid
        self.pid = None
        self.node_id: str | None = None
        self.node_ip: str | None = None
        self.prefetch_max = 64 << 20  # Ray queues what is sent; the depth limits it
        self._actor = actor
        self._actor_id = _actor_hex(actor)
        self._ray = launcher.ray
        self._objects = launcher.objects
        self._local_node = launcher.local_node
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
        self._started: Any = None  # where()'s answer, or the error that ended the actor
        self._ready = False
        self._lost = False
        self._ended = False
        self._stopping = False
        self._terminating = False
        self._exit = ""
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
        replies = self._started_replies()
        while self._ready and self._calls and self._calls[0].done and not self._lost:
            call = self._calls.popleft()
            if call.error is None:
                replies += self._in_order(call)
            else:
                replies += self._call_lost(call)
        if self._outbox and len(self._calls) < _CALLS_IN_FLIGHT and self._alive():
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
        if self._alive():
            self._ended = True
            self._exit = self._exit or f"{self.describe()} killed"
            self._wake()

    def describe_exit(self, status: int | None) -> str:
        """How the actor ended: ``Ray actor 3f2a... on node 10.0.0.5 (9c1e...) lost: ...``."""
        return self._exit or f"{self.describe()} ended"

    def close(self) -> None:
        """Release the pipe and the actor handle. Idempotent."""
        with self._pipe_lock:
            for fd in (self.fd, self._wake_w):
                close_fd(fd)
            self.fd = None
            self._wake_w = -1
        self._actor = None

    def describe(self) -> str:
        """``Ray actor <id> on node <address> (<node id>)``, with what is known so far."""
        where = f" on node {self.node_ip} ({(self.node_id or '?')[:12]})" if self.node_ip else ""
        return f"Ray actor {self._actor_id[:12]}{where}"

    # -- calls ----------------------------------------------------------------------------

    def _alive(self) -> bool:
        return not (self._lost or self._ended)

    def _terminate_when_idle(self) -> None:
        """Once stopping and nothing is left to run, end the actor (gracefully)."""
        if not self._stopping or self._calls or self._outbox or self._terminating:
            return
        if self._alive() and self._actor is not None:
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
        future = self._actor.run.remote(fns, calls, refs, self._to_forget(), *objects)
        future._on_completed(functools.partial(self._on_call_done, call))

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
            call.replies = value
        call.done = True
        self._wake()

    def _on_where(self, value: Any) -> None:
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


# -- the launcher -----------------------------------------------------------------------------


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
    ) -> None:
        self.ray = import_ray()  # at the pool's creation: a missing Ray is said at once
        self.processes = processes
        self.setup = setup
        self.address = address
        self.init_options = dict(init_options or {})
        self.actor_options: dict[str, Any] = {
            "num_cpus": 1,
            "max_restarts": 0,
            "max_task_retries": 0,
            # One worker per node before two on one: a pool of N on a cluster spreads out.
            "scheduling_strategy": "SPREAD",
        }
        self.actor_options.update(actor_options or {})
        self.session: RaySession | None = None
        self.objects = ObjectTable(self.ray)
        self.local_node: str | None = None
        self._actor_class: Any = None
        self.channels: list[RayChannel] = []

    @property
    def carries_references(self) -> bool:
        """References travel: through the object store."""
        return True

    def encoder(self, sharer: AutoSharer) -> TaskEncoder:
        """The cloudpickle-based encoder (see :class:`RayTaskEncoder`)."""
        return RayTaskEncoder(sharer)

    def start_generation(self, gen: Generation) -> None:
        """Connect to Ray (or start it), at the pool's first task; there is one generation.

        Raises:
            Error: Ray cannot be started or reached, or has fewer CPUs than workers.
        """
        if self.session is not None:
            return
        self.session = RaySession(self.processes, self.address, self.init_options)
        ray = self.ray
        cpus = ray.cluster_resources().get("CPU", 0)
        need = self.processes * self.actor_options.get("num_cpus", 1)
        if cpus < need:
            self.session.close()
            self.session = None
            raise Error(
                f"the Ray cluster has {cpus:g} CPUs and a backend='ray' pool of "
                f"{self.processes} workers needs {need:g} (one per worker): its workers would "
                "wait for ever. Use fewer processes, or add nodes to the cluster"
            )
        self.local_node = ray.get_runtime_context().get_node_id()
        from forkref._launchers.ray.actor import RayWorker

        self._actor_class = ray.remote(RayWorker).options(**self.actor_options)

    def launch(self, gen: Generation, wid: int) -> Channel | None:
        """Create one actor (Ray schedules it asynchronously) and its channel.

        None (the engine tries again at its next round) while the cluster has
        no free CPU for it: after a node is lost, an actor created then would
        wait for resources, and the tasks sent to it with it; the pool runs
        on the workers it has meanwhile.
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
        channel = RayChannel(self, wid, actor)
        self.channels.append(channel)
        return channel

    def _room_for_one(self) -> bool:
        try:
            free = self.ray.available_resources().get("CPU", 0)
        except Exception:  # cannot tell: let Ray queue it
            return True
        return bool(free >= self.actor_options.get("num_cpus", 1))

    def startup_hint(self) -> str:
        return (
            "while Ray started its actor: the actor's log on its node (in the Ray session "
            "directory, logs/worker-*.err) names the error"
        )

    def memory(self, roles: dict[int, str]) -> RayMemoryReport:
        """The parent (psutil here), each actor (measured in the actor), each node's store."""
        parent = memory_report({os.getpid(): roles.get(os.getpid(), "parent")})
        actors, missing = self._actor_memory()
        stores, why = object_store_use(self.ray) if self.session else ((), "Ray is not started")
        return RayMemoryReport(parent.processes + actors, parent.missing + missing, stores, why)

    def _actor_memory(
        self, timeout: float = 10.0
    ) -> tuple[tuple[ProcessMemory, ...], tuple[int, ...]]:
        live = [c for c in self.channels if c._actor is not None and c._alive()]
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
        if self.session is not None:
            self.session.close()


# -- memory --------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ObjectStoreUse:
    """One Ray node's object store, in bytes, as its raylet last reported it (about every second).

    Attributes:
        node_id: Ray's id of the node (hex).
        node_ip: the node's address.
        used: bytes held in the node's store: objects put there and copies
            fetched for tasks that ran on the node.
        capacity: the store's size (``object_store_memory``).
    """

    __module__ = "forkref"

    node_id: str
    node_ip: str
    used: int
    capacity: int

    def __repr__(self) -> str:
        return (
            f"<forkref.ObjectStoreUse node {self.node_ip} ({self.node_id[:8]}): "
            f"{self.used / 2**20:,.1f} of {self.capacity / 2**20:,.1f} MiB used>"
        )


@dataclass(frozen=True, repr=False)
class RayMemoryReport(MemoryReport):
    """:class:`forkref.MemoryReport` of a Ray pool's workers, plus the object stores.

    ``processes`` holds one record per live actor (role
    ``"ray worker@<node ip>"``), measured by psutil inside the actor: its
    pid is a pid on that node. ``object_stores`` has one record per alive
    node; it is empty, and ``object_store_error`` says why, when Ray would
    not tell (the figures come from ``ray._private.state``, which a Ray
    release may change).
    """

    __module__ = "forkref"

    object_stores: tuple[ObjectStoreUse, ...] = ()
    object_store_error: str | None = None

    def table(self) -> str:
        """The workers' table, then one line per node's object store (or why there is none)."""
        lines = [super().table()]
        for store in self.object_stores:
            lines.append(
                f"object store {store.node_ip}: {store.used / 2**20:,.1f} of "
                f"{store.capacity / 2**20:,.1f} MiB used"
            )
        if self.object_store_error:
            lines.append(f"object stores: {self.object_store_error}")
        return "\n".join(lines)

    def _repr_extra(self) -> str:
        used = sum(store.used for store in self.object_stores)
        return f"{super()._repr_extra()}, object stores {used / 2**20:,.1f} MiB used"


def object_store_use(ray: types.ModuleType) -> tuple[tuple[ObjectStoreUse, ...], str | None]:
    """Per-node object store use, or ``((), why)`` if Ray would not tell."""
    try:
        from ray._private import state

        total = state.total_resources_per_node()
        free = state.available_resources_per_node()
        stores = []
        for node in ray.nodes():
            node_id = node["NodeID"]
            if not node.get("Alive") or node_id not in total:
                continue
            capacity = int(total[node_id].get("object_store_memory", 0))
            available = int(free.get(node_id, {}).get("object_store_memory", capacity))
            ip = str(node["NodeManagerAddress"])
            stores.append(ObjectStoreUse(node_id, ip, capacity - available, capacity))
        return tuple(stores), None
    except Exception as err:
        return (), f"Ray did not report its object stores ({err!r})"
