"""``forkref.explain(obj)``: how an object would travel to a ``forkref.Pool`` worker.

It asks the pool's own policy, without registering, pickling or sending
anything:

* :func:`forkref._share.autoshare.estimate_size` and ``is_immutable`` (what
  ``AutoSharer.consider`` uses for every task argument): small, unknown-size
  and big mutable objects are pickled; big immutable ones, and big mutable
  ones under ``auto_share=True``, go by fork reference;
* the engine's late-object policy, :func:`forkref._engine.generations.late_object_route`
  (a pure function): an object that first appears after the workers forked
  goes through shared memory when one export is cheaper than forking a new
  generation of workers.

Costs are estimates from constants measured on the project's machine (see
the README), not a measurement on this one; ``forkref bench`` measures.

A function or class says how it travels: by qualified name (as the stdlib
does), or, where the stdlib cannot pickle it (lambdas, closures, ``__main__``
under spawn), by value.

Non-goals: no measurement of pickling.
"""

from __future__ import annotations

import os
import textwrap
import types
from dataclasses import dataclass
from multiprocessing.context import BaseContext

from forkref._engine.generations import (
    EXPORT_SECONDS_PER_BYTE,
    FORK_SECONDS_PER_BYTE,
    Route,
    exports_cleanly,
    late_object_route,
)
from forkref._fork.safe import default_context
from forkref._share.autoshare import estimate_size, is_immutable
from forkref._share.handle import Shared
from forkref._share.taskpickle import importable

__all__ = ["FORK_REFERENCE", "PICKLE", "SHARED_MEMORY", "Explanation", "explain"]

FORK_REFERENCE = "fork reference"
SHARED_MEMORY = "shared memory"
PICKLE = "pickle"

#: Pickle, pipe and unpickle of a DataFrame per task: 2.94 s per GiB
#: (benchmarks/bench_core.py, 1 GiB frame, 2 fork workers, this project's machine).
_PICKLE_SECONDS_PER_BYTE = 2.94 / 2**30
#: A reference per task: pickling ~170 bytes and one keyed-hash check (same benchmark).
_REFERENCE_SECONDS = 3e-5
_DEFAULT_THRESHOLD = 2**20
_SCALARS = (int, float, bool, complex, type(None))


@dataclass(frozen=True, repr=False)
class Explanation:
    """How one object would reach a ``forkref.Pool``'s workers, and what it costs.

    Attributes:
        what: the object's type and estimated size, in words.
        size: the estimated size in bytes (None: unknown without pickling).
        route: ``"fork reference"`` (workers forked after it get the object
            itself), ``"shared memory"`` (pickled once into a segment each
            worker maps) or ``"pickle"`` (pickled with every task).
        seconds: the estimated cost of that route, in seconds.
        per: how often ``seconds`` is paid: ``"task"`` (with every task that
            uses the object) or ``"once"`` (per object, whatever the tasks).
        reason: why the pool takes this route.
        late_route: the route if the object first appears after the workers
            forked (a late object): ``"shared memory"``, ``"fork reference"``
            (through a new generation of workers) or ``"pickle"``.
        late_seconds: the estimated cost of the late route.
        late_per: ``"task"`` or ``"once"``, as ``per``.
        late_reason: why, for a late object.
        fix: how to get a cheaper route, or None when there is none to get.
    """

    __module__ = "forkref"

    what: str
    size: int | None
    route: str
    seconds: float | None
    per: str
    reason: str
    late_route: str
    late_seconds: float | None
    late_per: str
    late_reason: str
    fix: str | None

    def __repr__(self) -> str:
        return (
            f"<forkref.Explanation {self.what}: {self.route}, {_cost(self.seconds, self.per)}; "
            "print() it for why and the fix>"
        )

    def __str__(self) -> str:
        parts = [
            ("", f"{self.what}: {self.route}, {_cost(self.seconds, self.per)}"),
            ("  why: ", self.reason),
            (
                "  if the workers had already forked: ",
                f"{self.late_route}, {_cost(self.late_seconds, self.late_per)}; "
                f"{self.late_reason}",
            ),
        ]
        if self.fix:
            parts.append(("  fix: ", self.fix))
        return "\n".join(
            textwrap.fill(text, 88, initial_indent=head, subsequent_indent="       ")
            for head, text in parts
        )


def _cost(seconds: float | None, per: str) -> str:
    if seconds is None:
        return "cost unknown"
    return f"about {_duration(seconds)} " + ("per task" if per == "task" else "once")


def _duration(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 10:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms" if ms < 1000 else f"{seconds:.1f} s"


def _size_words(size: int | None) -> str:
    if size is None:
        return "of unknown size"
    if size >= 2**30:
        return f"of about {size / 2**30:.2f} GiB"
    if size >= 2**20:
        return f"of about {size / 2**20:.1f} MiB"
    return f"of about {size / 2**10:.1f} KiB"


def explain(
    obj: object,
    *,
    processes: int | None = None,
    context: BaseContext | None = None,
    share_threshold: int | None = _DEFAULT_THRESHOLD,
    auto_share: bool = False,
) -> Explanation:
    """Say how ``obj`` would travel to the workers of ``forkref.Pool(processes, ...)``.

    The keyword arguments are the pool's. Nothing is registered, pickled or
    sent. ``print(forkref.explain(df))`` gives a short paragraph; the fields
    of the returned :class:`Explanation` carry the same facts.
    """
    processes = processes if processes is not None else (os.cpu_count() or 1)
    ctx = context if context is not None else default_context()
    forked = ctx.get_start_method() == "fork"
    target = obj.get() if isinstance(obj, Shared) else obj
    size = estimate_size(target)
    cls = type(target)
    what = f"{cls.__module__}.{cls.__qualname__} {_size_words(size)}"
    by_code = _function(target, forked) if not isinstance(obj, Shared) else None
    if by_code is not None:
        first = by_code
    elif isinstance(obj, Shared):
        first = _explicit(size, forked, processes)
    else:
        first = _automatic(target, size, forked, share_threshold, auto_share)
    route, seconds, per, reason, fix = first
    if route == FORK_REFERENCE:
        late_route, late_seconds, late_reason = _late(target, size, processes)
        late = (late_route, late_seconds, "once", late_reason)
    else:
        late = (route, seconds, per, "the same route as above")
    return Explanation(what, size, route, seconds, per, reason, *late, fix)


_Route = tuple[str, float | None, str, str, str | None]


def _explicit(size: int | None, forked: bool, processes: int) -> _Route:
    if forked:
        return (
            FORK_REFERENCE,
            _REFERENCE_SECONDS,
            "task",
            "an explicit forkref.share() handle: about 170 bytes per task; workers forked "
            "after the share get the object itself",
            None,
        )
    export = size * EXPORT_SECONDS_PER_BYTE if size is not None else None
    return (
        SHARED_MEMORY,
        export,
        "once",
        "workers started by spawn or forkserver do not inherit it: the object is pickled "
        f"once into shared memory and each of the {processes} workers maps it (zero-copy "
        "for numpy, pandas and arrow buffers)",
        "use the fork start method (forkref.Pool's default) to skip the export",
    )


def _function(obj: object, forked: bool) -> _Route | None:
    """How a function or class travels (by name, or by value where the stdlib cannot), or None."""
    if not isinstance(obj, (types.FunctionType, type)):
        return None
    kind = "class" if isinstance(obj, type) else "function"
    if importable(obj, forked):
        return (PICKLE, None, "task", f"a {kind} of an importable module: pickled by its "
                "qualified name (a few bytes), as the stdlib does", None)
    if forked:
        return (PICKLE, None, "task", f"a lambda, closure or local {kind}, which the stdlib "
                "cannot pickle: forkref sends its code and captured values with the call "
                "(captured values above share_threshold by reference)", None)
    if getattr(obj, "__module__", None) == "__main__":
        return (PICKLE, None, "task", f"a {kind} of __main__ (a notebook, a script, python "
                "-c), which workers started by spawn or forkserver cannot import: forkref "
                "sends it by value with cloudpickle, with the globals it uses", None)
    return (PICKLE, None, "task", f"it cannot be sent: workers started by spawn or "
            f"forkserver get a {kind} by its qualified name, and this one has none",
            "define it at module level, or use the fork start method (forkref.Pool's "
            "default), which sends it by value")


def _automatic(
    obj: object, size: int | None, forked: bool, threshold: int | None, auto_share: bool
) -> _Route:
    per_task = size * _PICKLE_SECONDS_PER_BYTE if size is not None else None
    share_fix = "pass forkref.share(obj) instead: a ~170-byte reference per task"
    if threshold is None:
        return (PICKLE, per_task, "task", "share_threshold=None turns automatic by-reference "
                "off: plain arguments are pickled as the stdlib would", share_fix)
    if not forked:
        return (PICKLE, per_task, "task", "the workers are not forked (spawn or forkserver): "
                "plain arguments are pickled as the stdlib would",
                share_fix + " (it then goes through shared memory once)")
    if size is None and type(obj) in _SCALARS:
        return (PICKLE, None, "task", "a plain scalar: a few bytes to pickle", None)
    if size is None:
        return (PICKLE, None, "task", "its size cannot be estimated without pickling it, and "
                "forkref pickles objects of unknown size as the stdlib does",
                "if it is big, " + share_fix)
    if size <= threshold:
        return (PICKLE, per_task, "task", f"small: under share_threshold ({threshold:,} "
                "bytes), pickling it costs less than anything else", None)
    if is_immutable(obj):
        return (FORK_REFERENCE, _REFERENCE_SECONDS, "task", "big and immutable: sent by "
                "reference automatically, whatever auto_share says", None)
    if auto_share:
        return (FORK_REFERENCE, _REFERENCE_SECONDS, "task", "big and mutable, and "
                "auto_share=True: sent by reference; workers see it as it was when they "
                "forked (a snapshot)", None)
    return (
        PICKLE,
        per_task,
        "task",
        "big but mutable, and auto_share is off: pickled for every task that uses it "
        "(the pool warns once with a PerformanceWarning)",
        share_fix + ", or create the pool with auto_share=True",
    )


def _parent_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _late(obj: object, size: int | None, processes: int) -> tuple[str, float | None, str]:
    """The engine's late-object policy: one shared-memory export, or a new generation."""
    clean = exports_cleanly(obj)
    rss = _parent_rss()
    route = late_object_route(
        registered=1,  # registered after the current generation started: a late object
        generation=0,
        exports_cleanly=clean,
        size=size,
        parent_rss=rss,
        processes=processes,
    )
    fork_seconds = (1 + processes) * rss * FORK_SECONDS_PER_BYTE
    if route is Route.SHARED_MEMORY:
        assert size is not None
        return (
            SHARED_MEMORY,
            size * EXPORT_SECONDS_PER_BYTE,
            "one export into shared memory costs less than forking a new generation "
            f"(about {_duration(fork_seconds)} here); the running workers map it",
        )
    reason = (
        f"a new generation of workers is forked (1 + {processes} forks of this "
        "process, each copying its page tables)"
    )
    if not clean:
        reason += (
            f"; a {type(obj).__qualname__} does not go through shared memory (only bytes, "
            "numpy, pandas without object columns, and arrow do)"
        )
    elif size is not None:
        reason += (
            "; cheaper here than exporting it "
            f"(about {_duration(size * EXPORT_SECONDS_PER_BYTE)})"
        )
    return FORK_REFERENCE, fork_seconds, reason
