"""What runs on a Ray worker: the actor behind each worker of a ``backend="ray"`` pool.

How a call flows (the driver side is :mod:`forkref._launchers.ray.channel`)::

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
  replies, one per task (HDR + body, as <---------- ([HDR(task id, OK/ERR) + pickled result
  forkref._engine.wire frames them), RETIRE at               or (exception, traceback text)],
  max_tasks; big result parts beside them                the big parts of those results:
  (forkref._launchers.ray.results)                        numpy/pandas/arrow >= threshold,
                                                          through the object store)

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

import os
import pickle
import traceback

from forkref._engine.wire import HDR, RETIRE
from forkref._engine.worker import Functions, WorkerSetup, error_reply, execute
from forkref._errors import Error
from forkref._launchers.ray import results
from forkref._refs.registry import Reference, set_pool_worker
from forkref._share.handle import supplied

__all__ = ["RayWorker", "dumps_reply"]


def dumps_reply(obj: object) -> bytes:
    """Pickle a result or an exception for the driver, whole (no part left out).

    Plain pickle first (fastest); then Ray's cloudpickle, which also sends
    classes defined in the driver's ``__main__`` (they reached this actor by
    value) back by value: the driver maps them to its own classes again.
    """
    return results.dumps(obj, None, [])


class RayWorker:
    """The actor class (``ray.remote`` is applied lazily, by the driver side)."""

    def __init__(self, setup: WorkerSetup) -> None:
        self._setup = setup
        self._objects: dict[Reference, object] = {}
        self._functions = Functions()
        self._done = 0
        self._init_error: str | None = None
        set_pool_worker("ray")
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
    ) -> tuple[list[bytes], results.Parts]:
        """Run ``calls`` in order: one framed reply per task, and the big parts of their
        results, returned beside them (see the module docstring)."""
        for ref in forget:
            self._objects.pop(ref, None)
        self._objects.update(zip(refs, objects, strict=True))
        del objects
        for fn_id, blob in fns:
            self._functions.add(fn_id, blob)
        replies = []
        parts: results.Parts = []
        max_tasks = self._setup.max_tasks
        for task_id, fn_id, payload in calls:
            op, body = self._run_task(fn_id, payload, parts)
            replies.append(HDR.pack(task_id, op) + body)
            self._done += 1
            if max_tasks is not None and self._done >= max_tasks:
                replies.append(HDR.pack(0, RETIRE))  # the driver sends no more than that
                break
        return replies, parts

    def memory(self) -> tuple[str, int, int, int, int, int]:
        """``(node id, pid, rss, uss, pss, swap)`` of this actor's process, in bytes."""
        import psutil
        import ray

        info = psutil.Process().memory_full_info()
        node = ray.get_runtime_context().get_node_id()
        swap = int(getattr(info, "swap", 0))
        return node, os.getpid(), int(info.rss), int(info.uss), int(info.pss), swap

    # -- one task ------------------------------------------------------------------

    def _run_task(self, fn_id: int, payload: bytes, parts: results.Parts) -> tuple[int, bytes]:
        # References in the task (and any a task unpickles itself) resolve to the
        # objects Ray handed this actor: there is no registry of the driver's here.
        with supplied(self._objects):
            try:
                kind, data = pickle.loads(payload)
                fn = self._functions.get(fn_id)
            except BaseException as err:
                wrapped = Error(
                    f"Ray worker pid {os.getpid()} could not unpickle its task: {err!r}. "
                    "Functions and classes that the driver pickles by name (those of importable "
                    "modules) must be importable on every Ray worker: install their package on "
                    "the nodes, or ship it with ray.init(runtime_env={'py_modules': [...]})"
                )
                return error_reply(wrapped, dumps_reply)
            threshold = self._setup.result_threshold
            return execute(
                kind,
                fn,
                data,
                lambda obj: results.dumps(obj, threshold, parts),
                who="Ray worker",
            )
