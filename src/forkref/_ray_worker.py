"""What runs on a Ray worker: the actor behind each worker of a ``backend="ray"`` pool.

How a call flows (the driver side is :mod:`forkref._ray`)::

  driver: RayChannel                                Ray actor: RayWorker (this module)
  ------------------                                ----------------------------------
  actor created with the pool's WorkerSetup ------> initializer(*initargs)
  where() ----------------------------------------> (node, address, pid, initializer error)
                                                    -> the channel's READY or INIT_FAILED
  one call per batch of tasks:
  run(fns, calls, refs, forget, *objects) --------> Ray resolves each top-level ObjectRef
     fns:     [(fn id, pickled function)] new         in `objects` to the object, zero-copy
              to this actor                           for numpy/pandas/arrow buffers
     calls:   [(task id, fn id, pickled (kind,       (read-only); objects[ref] kept until
              data))]                                 `forget` names it
     refs:    the References first sent here        each task is unpickled with its
     objects: their ObjectRefs, one per ref           References resolved to objects[ref]
  replies, one per task (HDR + body, as <---------- [HDR(task id, OK/ERR) + pickled result
  forkref._wire frames them), RETIRE at               or (exception, traceback text)]
  max_tasks

An object reaches an actor once: the driver passes its ObjectRef the first
time a task sent to that actor refers to it, and only the Reference after
that; resolving the same Reference twice in one actor gives the same object,
as inheritance does in a forked worker. Functions are kept as a local worker
keeps them: by id, the same number of them, evicted in the same order as the
driver's channel does.

Non-goals: an actor never runs two calls at once (Ray's default for actors),
never retries a task (the driver decides what a lost actor means), and never
writes to an object Ray handed it (Ray maps array buffers read-only).
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import traceback
import types
from typing import Any

from forkref._errors import Error, NotInheritedError, ResultPicklingError
from forkref._handle import Unavailable
from forkref._registry import Reference
from forkref._taskpickle import CALL, MAP
from forkref._wire import ERR, HDR, OK, RETIRE
from forkref._worker import WorkerSetup

__all__ = ["MAX_FUNCTIONS", "RayWorker", "dumps_reply"]

#: Functions an actor keeps; the driver's channel counts the same (see RayChannel).
MAX_FUNCTIONS = 32


class _Unpickler(pickle.Unpickler):
    """Unpickles a task with its References resolved to the objects Ray handed this actor.

    Every forkref reference pickles as a call of ``forkref._handle._resolve``
    (handles and automatic shares alike); here that name resolves to a lookup
    in the actor's table instead. The driver's registry does not exist on a
    Ray worker, so there is nothing else to look in.
    """

    def __init__(self, data: bytes | memoryview, objects: dict[Reference, object]) -> None:
        super().__init__(io.BytesIO(data))
        self._objects = objects

    def find_class(self, module: str, name: str) -> Any:
        if module == "forkref._handle" and name == "_resolve":
            return self._resolve
        return super().find_class(module, name)

    def _resolve(self, ref: Reference) -> object:
        try:
            return self._objects[ref]
        except (KeyError, TypeError):
            return Unavailable(
                NotInheritedError(
                    f"cannot resolve shared {getattr(ref, 'typename', '?')!s:.200} on Ray worker "
                    f"pid {os.getpid()}: the task did not carry it. Pass the handle returned by "
                    "forkref.share() as an argument of the task (or capture it in the function)"
                )
            )


def dumps_reply(obj: object) -> bytes:
    """Pickle a result or an exception for the driver.

    Plain pickle first (fastest); then Ray's cloudpickle, which also sends
    classes defined in the driver's ``__main__`` (they reached this actor by
    value) back by value: the driver maps them to its own classes again.
    """
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:
        from ray import cloudpickle

        return bytes(cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL))


class RayWorker:
    """The actor class (``ray.remote`` is applied by :mod:`forkref._ray`, lazily)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self._setup = setup
        self._objects: dict[Reference, object] = {}
        self._blobs: dict[int, bytes] = {}
        self._functions: dict[int, Any] = {}
        self._done = 0
        self._init_error: str | None = None
        if setup.initializer is not None:
            try:
                setup.initializer(*setup.initargs)
            except BaseException:
                self._init_error = traceback.format_exc()

    def where(self) -> tuple[str, str, int, str | None]:
        """``(node id, node address, pid, initializer traceback or None)`` of this actor."""
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        return node_id, ray.util.get_node_ip_address(), os.getpid(), self._init_error

    def run(
        self,
        fns: list[tuple[int, bytes]],
        calls: list[tuple[int, int, bytes]],
        refs: list[Reference],
        forget: list[Reference],
        *objects: object,
    ) -> list[bytes]:
        """Run ``calls`` in order; one framed reply per task (see the module docstring)."""
        for ref in forget:
            self._objects.pop(ref, None)
        self._objects.update(zip(refs, objects, strict=True))
        del objects
        for fn_id, blob in fns:
            self._add_function(fn_id, blob)
        replies = []
        max_tasks = self._setup.max_tasks
        for task_id, fn_id, payload in calls:
            op, body = self._run_task(fn_id, payload)
            replies.append(HDR.pack(task_id, op) + body)
            self._done += 1
            if max_tasks is not None and self._done >= max_tasks:
                replies.append(HDR.pack(0, RETIRE))  # the driver sends no more than that
                break
        return replies

    def memory(self) -> tuple[str, int, int, int, int, int]:
        """``(node id, pid, rss, uss, pss, swap)`` of this actor's process, in bytes."""
        import psutil
        import ray

        info = psutil.Process().memory_full_info()
        node = ray.get_runtime_context().get_node_id()
        swap = int(getattr(info, "swap", 0))
        return node, os.getpid(), int(info.rss), int(info.uss), int(info.pss), swap

    # -- functions -----------------------------------------------------------------

    def _add_function(self, fn_id: int, blob: bytes) -> None:
        self._blobs[fn_id] = blob
        if len(self._blobs) > MAX_FUNCTIONS:
            oldest = next(iter(self._blobs))
            del self._blobs[oldest]
            self._functions.pop(oldest, None)

    def _function(self, fn_id: int) -> Any:
        """A task's function; plain functions and classes are unpickled once, as locally."""
        fn = self._functions.get(fn_id)
        if fn is not None:
            return fn
        fn = _Unpickler(self._blobs[fn_id], self._objects).load()
        if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
            self._functions[fn_id] = fn
        return fn

    # -- one task ------------------------------------------------------------------

    def _run_task(self, fn_id: int, payload: bytes) -> tuple[int, bytes]:
        try:
            kind, data = _Unpickler(payload, self._objects).load()
            fn = self._function(fn_id)
        except BaseException as err:
            wrapped = Error(
                f"Ray worker pid {os.getpid()} could not unpickle its task: {err!r}. Functions "
                "and classes that the driver pickles by name (those of importable modules) must "
                "be importable on every Ray worker: install their package on the nodes, or ship "
                "it with ray.init(runtime_env={'py_modules': [...]})"
            )
            return _error_reply(wrapped)
        try:
            if kind == CALL:
                args, kwargs = data
                result = fn(*args, **kwargs)
            elif kind == MAP:
                result = list(map(fn, data))
            else:
                result = list(itertools.starmap(fn, data))
        except BaseException as err:
            return _error_reply(err)
        del data, fn
        try:
            return OK, dumps_reply(result)
        except Exception as err:
            cls = type(result)
            return _error_reply(
                ResultPicklingError(
                    f"cannot send the result ({cls.__module__}.{cls.__qualname__}) back from Ray "
                    f"worker pid {os.getpid()}: pickling failed with {err!r}. Return picklable "
                    "data",
                    err,
                    result,
                )
            )
        except BaseException as err:  # SystemExit from a __reduce__: the task's error, as locally
            return _error_reply(err)


def _error_reply(err: BaseException) -> tuple[int, bytes]:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    tb = f'\n"""\n{tb}"""'
    try:
        return ERR, dumps_reply((err, tb))
    except Exception as why:
        stand_in = Error(
            f"the task raised {type(err).__qualname__}: {str(err)[:1000]} "
            f"(the exception could not be pickled to send it back: {why!r})"
        )
        return ERR, pickle.dumps((stand_in, tb), pickle.HIGHEST_PROTOCOL)
