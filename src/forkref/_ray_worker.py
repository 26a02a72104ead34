"""What runs on a Ray worker: the actor behind each worker of a ``backend="ray"`` pool.

How a call flows (the driver side is :mod:`forkref._ray`)::

  driver: RayChannel                              Ray actor: RayWorker (this module)
  ------------------                              ----------------------------------
  tasks queued for this actor, sent as one call:
  actor.run(calls, refs, forget, *objects) ------> Ray resolves each top-level ObjectRef in
     calls:   [(task id, pickled task), ...]      `objects` to the object, zero-copy for
     refs:    the References first sent here        numpy/pandas/arrow buffers (read-only)
     objects: their ObjectRefs, one per ref         objects[ref] kept until `forget` names it
                                                  each task is unpickled with its References
                                                  resolved to objects[ref], then run
  replies, one per task (HDR + body, as  <-------- [HDR(task id, OK/ERR) + pickled result or
  forkref._wire frames them)                        (exception, traceback text)]

An object reaches an actor once: the driver passes its ObjectRef the first
time a task sent to that actor refers to it, and only the Reference after
that; resolving the same Reference twice in one actor gives the same object,
as inheritance does in a forked worker.

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
from collections.abc import Callable
from typing import Any

from forkref._errors import Error, NotInheritedError, TaskPicklingError
from forkref._handle import Unavailable
from forkref._registry import Reference
from forkref._taskpickle import CALL, MAP
from forkref._wire import ERR, HDR, INIT_FAILED, OK, RETIRE

__all__ = ["RayWorker", "dumps_reply"]


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
    """The actor class (``ray.remote`` is applied by :mod:`forkref._ray`, lazily).

    ``setup`` is ``(initializer, initargs, max_tasks)``, as for a local worker.
    """

    def __init__(self, setup: tuple[Callable[..., object] | None, tuple[Any, ...], int | None]):
        initializer, initargs, max_tasks = setup
        self._objects: dict[Reference, object] = {}
        self._max_tasks = max_tasks
        self._done = 0
        self._init_error: str | None = None
        self._last_function: tuple[bytes, Any] | None = None
        if initializer is not None:
            try:
                initializer(*initargs)
            except BaseException:
                self._init_error = traceback.format_exc()

    def where(self) -> tuple[str, str, int]:
        """``(node id, node IP address, pid)`` of this actor."""
        import ray

        context = ray.get_runtime_context()
        return context.get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def run(
        self,
        calls: list[tuple[int, bytes]],
        refs: list[Reference],
        forget: list[Reference],
        *objects: object,
    ) -> list[bytes]:
        """Run ``calls`` in order; one framed reply per task (see the module docstring)."""
        if self._init_error is not None:
            return [HDR.pack(0, INIT_FAILED) + self._init_error.encode()]
        for ref in forget:
            self._objects.pop(ref, None)
        self._objects.update(zip(refs, objects, strict=True))
        del objects
        replies = []
        for task_id, payload in calls:
            op, body = self._run_task(payload)
            replies.append(HDR.pack(task_id, op) + body)
            self._done += 1
            if self._max_tasks is not None and self._done >= self._max_tasks:
                replies.append(HDR.pack(0, RETIRE))
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

    # -- one task ------------------------------------------------------------------

    def _run_task(self, payload: bytes) -> tuple[int, bytes]:
        try:
            kind, fn_blob, data = _Unpickler(payload, self._objects).load()
            fn = self._load_function(fn_blob)
        except BaseException as err:
            wrapped = Error(
                f"Ray worker pid {os.getpid()} could not unpickle its task: {err!r}. The "
                "function's module must be importable on the Ray workers (install it on every "
                "node, or ship it with ray.init(runtime_env=...))"
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
                TaskPicklingError(
                    f"cannot send the result ({cls.__module__}.{cls.__qualname__}) back from Ray "
                    f"worker pid {os.getpid()}: pickling failed with {err!r}; return picklable data"
                )
            )

    def _load_function(self, blob: bytes) -> Any:
        """Unpickle a task's function; a plain function is reused while the same one comes."""
        last = self._last_function
        if last is not None and last[0] == blob:
            return last[1]
        fn = _Unpickler(blob, self._objects).load()
        if isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
            self._last_function = (blob, fn)
        return fn


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
